"""Synthetic label noise and response noise with known truth, for measuring detection (benchmarks, tests).

Two kinds:

- `uniform_flips`: a random share of rows gets a random other label (the demo's planted errors:
  easy, because a flip rarely lands on a plausible label).
- `confusion_flips`: instance-dependent noise, as real annotators make it. A classifier trained on
  the other folds (`probs`: out-of-fold probabilities on the clean labels) names, for each row, the
  label it most confuses the row with; rows are drawn for flipping with probability proportional to
  that confusion, and flipped to it. Ambiguous rows and confusable classes get the errors.

Response noise (`plant_response_noise`) for generation data, the ways paired data goes bad: a response
that belongs to another row (misaligned), a response in another language, a copy of the prompt (an
untranslated target, a summary that is the dialogue's first turn) and a response cut off mid-way.
"""

from __future__ import annotations

import numpy as np

RESPONSE_NOISE_KINDS = ("misaligned", "wrong_language", "copy", "truncated")


def uniform_flips(labels: np.ndarray, n_classes: int, rate: float, seed: int = 0) -> np.ndarray:
    """Integer labels with round(rate * n) of them changed to a uniformly drawn other class."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = labels.copy()
    idx = rng.choice(len(labels), int(round(rate * len(labels))), replace=False)
    out[idx] = (labels[idx] + rng.integers(1, n_classes, len(idx))) % n_classes
    return out


def confusion_flips(labels: np.ndarray, probs: np.ndarray, rate: float, seed: int = 0) -> np.ndarray:
    """Integer labels with round(rate * n) rows flipped to the class `probs` confuses them with most.

    `probs` (rows x classes) must be out-of-fold on the clean labels. Rows are drawn without
    replacement with probability proportional to the confusing class's probability.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    other = np.asarray(probs, dtype=float).copy()
    other[np.arange(len(labels)), labels] = -1.0
    confused = other.argmax(axis=1)
    weight = np.clip(other.max(axis=1), 1e-12, None)
    idx = rng.choice(len(labels), int(round(rate * len(labels))), replace=False, p=weight / weight.sum())
    out = labels.copy()
    out[idx] = confused[idx]
    return out


def detection_quality(wrong: np.ndarray, flags, queue=None, at: tuple[int, ...] = (50, 100, 200, 500)) -> dict:
    """How well label-issue flags and scores find the rows in `wrong` (bool per row of `flags`).

    precision / recall of `is_label_issue`; AUROC of `label_score` (low score = likely wrong);
    `recall_at_precision_0.75`: the share of wrong rows found when reviewing the lowest-scored rows as
    deep as the running precision stays >= 0.75; with the review queue, the measured precision of its
    first N label issues next to the report's estimate (`estimated_precision_at_rank`).
    """
    from sklearn.metrics import roc_auc_score

    wrong = np.asarray(wrong, dtype=bool)
    flagged = flags["is_label_issue"].to_numpy(dtype=bool)
    score = flags["label_score"].astype(float).fillna(1.0).to_numpy()
    tp = int((flagged & wrong).sum())
    order = np.argsort(score, kind="stable")
    hits = np.cumsum(wrong[order])
    running = hits / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(running >= 0.75)
    out = {"wrong": int(wrong.sum()), "flagged": int(flagged.sum()), "true_positives": tp,
           "precision": round(tp / max(1, int(flagged.sum())), 4), "recall": round(tp / max(1, int(wrong.sum())), 4),
           "auroc": round(float(roc_auc_score(wrong, -score)), 4) if 0 < wrong.sum() < len(wrong) else None,
           # the same ranking by cleanlab's default score (self_confidence = 1 - error_probability)
           "auroc_self_confidence": (round(float(roc_auc_score(wrong, flags["error_probability"].astype(float).fillna(0.0))), 4)
                                     if "error_probability" in flags and 0 < wrong.sum() < len(wrong) else None),
           "recall_at_precision_0.75": round(float(hits[ok.max()] / max(1, wrong.sum())), 4) if len(ok) else 0.0}
    if queue is not None:
        is_wrong = dict(zip(flags["example_id"].astype(str), wrong))
        labels = queue[queue["is_label_issue"].astype(bool)]
        hit = labels["example_id"].astype(str).map(is_wrong).fillna(False).to_numpy(dtype=bool)
        est = labels["estimated_precision_at_rank"].to_numpy(dtype=float)
        out["precision_at"] = {str(n): {"measured": round(float(hit[:n].mean()), 4), "estimated": round(float(est[n - 1]), 4)}
                               for n in at if n <= len(hit)}
    return out


def _copied_part(prompt: str) -> str:
    """What an echoing annotator or a broken export copies: the prompt's first non-blank line when it has
    several (a dialogue's first turn), else the whole prompt (an untranslated sentence)."""
    lines = [line for line in prompt.split("\n") if line.strip()]
    return lines[0] if len(lines) > 1 else prompt


def plant_response_noise(prompts: list[str], responses: list[str], rates: dict[str, float], seed: int = 0,
                         other_language: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Responses with round(rate * n) rows of each kind in `rates` (RESPONSE_NOISE_KINDS) made bad, on
    disjoint rows; returns (responses, kind planted per row, "" where clean).

    misaligned: another row's response (a different text); wrong_language: `other_language[i]`, the same
    content in another language (needed for that kind); copy: `_copied_part` of the prompt; truncated:
    the response cut at a word boundary between 30% and 70% of its words (rows of 4 words or more).
    """
    unknown = set(rates) - set(RESPONSE_NOISE_KINDS)
    if unknown:
        raise ValueError(f"unknown response noise kinds {sorted(unknown)}; known: {RESPONSE_NOISE_KINDS}")
    if "wrong_language" in rates and (other_language is None or len(other_language) != len(responses)):
        raise ValueError("wrong_language noise needs other_language: one response per row in another language")
    rng = np.random.default_rng(seed)
    n = len(responses)
    out, kinds = list(responses), [""] * n
    free = np.ones(n, dtype=bool)
    for kind in RESPONSE_NOISE_KINDS:
        if kind not in rates:
            continue
        eligible = free.copy()
        if kind == "truncated":
            eligible &= np.array([len(r.split()) >= 4 for r in responses])
        if kind == "copy":
            eligible &= np.array([_copied_part(p).strip() != r.strip() for p, r in zip(prompts, responses)])
        want = int(round(rates[kind] * n))
        pool = np.flatnonzero(eligible)
        if want > len(pool):
            raise ValueError(f"{kind}: {want} rows wanted, {len(pool)} eligible")
        for i in rng.choice(pool, want, replace=False):
            if kind == "misaligned":
                j = int(rng.integers(n))
                while j == i or responses[j].strip() == responses[i].strip():
                    j = int(rng.integers(n))
                out[i] = responses[j]
            elif kind == "wrong_language":
                out[i] = other_language[i]
            elif kind == "copy":
                out[i] = _copied_part(prompts[i])
            else:
                words = responses[i].split()
                keep = int(rng.integers(max(1, int(0.3 * len(words))), max(2, int(0.7 * len(words))) + 1))
                out[i] = " ".join(words[:min(keep, len(words) - 1)])
            kinds[i], free[i] = kind, False
    return out, kinds
