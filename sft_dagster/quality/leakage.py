"""Leakage across splits: a validation or test row that nearly repeats a train row.

The splits already keep rows whose prompts are the same text up to case, punctuation and spacing in
one split (`splits.assign_splits`), so exact leakage cannot happen there. What can: a near copy or
light paraphrase of a test prompt in train ("the" for "this", a word added, a clause reordered),
which lets the model score on text it was trained on. Two neighbour relations find them:

- cleanlab's near-duplicate sets (`near_duplicate_of` in the label-issue flags, on the features
  cleanlab was given: TF-IDF or sentence embeddings), computed before curation: a set that holds an
  evaluation row and a train row that curation kept;
- the TF-IDF vectors cleanlab's tfidf view uses (`label_issues.tfidf_vectors`: hashed word 1-2 grams
  and char 4-grams): an evaluation prompt whose cosine similarity to a train prompt reaches
  `LEAKAGE_SIMILARITY`.

Curation keeps test rows as labelled (never cleaned silently), so the fix is on the train side: with
`near_duplicates: drop` curation quarantines the train rows `leaking_pairs` names; with `keep`, or on
splits made elsewhere, the check on the splits fails naming them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .check_registry import FAILING_ROWS_SHOWN, CheckOutcome
from .duplicates import SEPARATOR
from .label_issues import tfidf_vectors

# Cosine similarity of TF-IDF vectors above which a train prompt counts as a copy of an evaluation
# prompt. On the demo reviews (templated sentences that differ in product and opinion) the closest test
# and train prompts of the 240-row set reach 0.85; in the 1200-row set four pairs reach 0.91-0.96, each
# the same sentence with another opener ("Well, the toaster ..." / "The toaster ..."): copies.
LEAKAGE_SIMILARITY = 0.9
EVALUATION_SPLITS = ("validation", "test")
CHUNK_CELLS = 20_000_000  # evaluation rows x train rows per sparse product


def nearest_rows(texts: pd.Series, queries: np.ndarray, among: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position in `queries`, the position in `among` (disjoint from `queries`) of its most
    similar row and that cosine similarity, on TF-IDF vectors; -1 and 0.0 when `among` is empty."""
    best, similarity = np.full(len(queries), -1), np.zeros(len(queries), dtype=np.float32)
    if len(queries) == 0 or len(among) == 0:
        return best, similarity
    vectors = tfidf_vectors(texts.reset_index(drop=True))
    targets = vectors[among].T.tocsc()
    step = max(1, CHUNK_CELLS // len(among))
    for start in range(0, len(queries), step):
        chunk = slice(start, start + step)
        sims = (vectors[queries[chunk]] @ targets).toarray()
        top = sims.argmax(axis=1)
        best[chunk], similarity[chunk] = among[top], sims[np.arange(len(top)), top]
    return best, similarity


def leaking_pairs(df: pd.DataFrame, flags: pd.DataFrame | None = None,
                  threshold: float = LEAKAGE_SIMILARITY) -> pd.DataFrame:
    """Every train row of `df` (with `split`) that nearly repeats a validation/test row: train_id,
    evaluation_id, similarity (TF-IDF cosine of the prompts) and `by` (text_similarity or cleanlab)."""
    frame = df.reset_index(drop=True)
    split = frame["split"].astype("string")
    ids = frame["example_id"].astype(str).to_numpy()
    train = np.flatnonzero((split == "train").fillna(False).to_numpy())
    evaluation = np.flatnonzero(split.isin(EVALUATION_SPLITS).fillna(False).to_numpy())
    nearest, similarity = nearest_rows(frame["prompt"].fillna("").astype(str), train, evaluation)
    hit = (similarity >= threshold) & (nearest >= 0)
    pairs = [pd.DataFrame({"train_id": ids[train[hit]], "evaluation_id": ids[nearest[hit]],
                           "similarity": np.round(similarity[hit].astype(float), 4), "by": "text_similarity"})]
    if flags is not None and "near_duplicate_of" in flags:
        sets = flags.assign(example_id=flags["example_id"].astype(str)).drop_duplicates("example_id")
        members = pd.Series(ids[train]).map(sets.set_index("example_id")["near_duplicate_of"]).fillna("").astype(str)
        in_evaluation = set(ids[evaluation])
        found = [(t, e) for t, m in zip(ids[train], members) for e in m.split(SEPARATOR) if e in in_evaluation]
        pairs.append(pd.DataFrame(found, columns=["train_id", "evaluation_id"]).assign(similarity=np.nan, by="cleanlab"))
    out = pd.concat([p for p in pairs if len(p)], ignore_index=True) if any(len(p) for p in pairs) else pairs[0]
    return out.drop_duplicates(["train_id", "evaluation_id"]).reset_index(drop=True)


def check_split_neighbours(name: str, df: pd.DataFrame, flags: pd.DataFrame | None = None, *,
                           threshold: float = LEAKAGE_SIMILARITY, blocking: bool = True,
                           description: str = "") -> CheckOutcome:
    """Fails when a validation/test row of `df` (with `split`) is nearly repeated by a train row
    (`leaking_pairs`), or when there are no train rows at all; the failing rows name the train row."""
    frame = df.reset_index(drop=True)
    pairs = leaking_pairs(frame, flags, threshold)
    first = pairs.drop_duplicates("evaluation_id").set_index("evaluation_id")
    ids = frame["example_id"].astype(str)
    failing = ids.isin(set(first.index))
    prompts = dict(zip(ids, frame["prompt"]))
    shown = frame[failing.to_numpy()].assign(
        train_example_id=ids[failing].map(first["train_id"]).to_numpy(),
        similarity=ids[failing].map(first["similarity"]).to_numpy(), by=ids[failing].map(first["by"]).to_numpy())
    shown["train_prompt"] = shown["train_example_id"].map(prompts)
    columns = ["example_id", "split", "prompt", "train_example_id", "train_prompt", "similarity", "by", "source_file",
               "source_line"]
    train_rows = int((frame["split"] == "train").sum())
    split = frame["split"].astype("string")
    metadata = {
        "leaked_rows_by_split": {s: int((failing & (split == s)).sum()) for s in EVALUATION_SPLITS},
        "train_rows_repeating_them": int(pairs["train_id"].nunique()),
        "by": {str(k): int(v) for k, v in first["by"].value_counts().items()},
        "similarity_threshold": threshold, "train_rows": train_rows,
    }
    return CheckOutcome(
        name=name, passed=not failing.any() and train_rows > 0, blocking=blocking, description=description,
        metadata=metadata, failing_ids=ids[failing].tolist(),
        failing_rows=shown[[c for c in columns if c in shown]].head(FAILING_ROWS_SHOWN))
