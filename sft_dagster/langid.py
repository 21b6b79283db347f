"""The language identifier (py3langid, its model inside the wheel: nothing is downloaded), loaded once.

Used by the spec (`task.response_language` / `task.prompt_language` must be codes it knows) and by the
`wrong_language` response finding (quality/response_issues.py). Loading decompresses the model: about
1-2 s, once per process.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=8)
def identifier(languages: tuple[str, ...] | None = None):
    """A py3langid identifier with probabilities (norm_probs), restricted to `languages` when given.

    Cached per language set: `set_languages` changes an identifier in place, so each set has its own.
    """
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    if languages:
        ident.set_languages(list(languages))
    return ident


@functools.lru_cache(maxsize=1)
def known_languages() -> frozenset[str]:
    """Every language code the identifier can name (ISO 639-1 where one exists, else 639-3)."""
    return frozenset(identifier().labels)
