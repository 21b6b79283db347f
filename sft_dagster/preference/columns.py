"""Column contracts of the preference stages, and the content hashes that name prompts and replies.

candidates: one row per sampled (or written) reply to a prompt, the input of ranking.
pairs: one row per (prompt, chosen, rejected) comparison, from rankings or an imported data set.
"""

from __future__ import annotations

import json

import pandas as pd

from ..schema import content_hash

CANDIDATE_COLUMNS = [
    "prompt_id",  # content hash of (system, prompt, history)
    "candidate_id",  # content hash of (prompt_id, response)
    "prompt",
    "system",  # may be null
    "history",  # earlier turns of a chat (JSON), null for one exchange
    "response",
    "sample_index",  # which of the K samples (the first one kept when samples repeat)
    "finished",  # the reply ended with the end-of-turn token (False: cut at max_new_tokens)
    "n_response_tokens",
    "model",  # what wrote the reply: the base model (and adapter), or a named writer
    "seed",
    "temperature",
    "top_p",
    "max_new_tokens",
]
REQUIRED_CANDIDATE_COLUMNS = ["prompt_id", "candidate_id", "prompt", "response"]

PAIR_COLUMNS = [
    "pair_id",  # content hash of (prompt_id, chosen, rejected, author, origin): unique per judgement
    "prompt_id",
    "prompt",
    "system",
    "history",
    "chosen",
    "rejected",
    "chosen_id",  # candidate ids when the pair comes from a ranking; null for imported pairs
    "rejected_id",
    "tie",  # the two replies were ranked equal: no preference to learn
    "author",  # who judged (null when an imported data set does not say)
    "origin",  # "ranking" or "import"
    "split",  # train / validation / test when the source gives one (imports), else null
    "source_file",
    "source_line",
]


def _text(value) -> str | None:
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def prompt_id_of(prompt: str, system: str | None = None, history=None) -> str:
    """Equal for the same system text, earlier turns and prompt; candidates and pairs meet on it."""
    if isinstance(history, list):
        history = json.dumps(history, ensure_ascii=False)
    return content_hash("prompt", _text(system), _text(prompt), _text(history))


def candidate_id_of(prompt_id: str, response: str) -> str:
    return content_hash("candidate", prompt_id, response)


def pair_id_of(prompt_id: str, chosen: str, rejected: str, author: str | None, origin: str) -> str:
    return content_hash("pair", prompt_id, chosen, rejected, author, origin)
