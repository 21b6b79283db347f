"""Leakage across splits: a validation or test row that nearly repeats a train row.

The splits already keep rows whose prompts are the same text up to case, punctuation and spacing in
one split (`splits.assign_splits`), so exact leakage cannot happen there. What can: a near copy of a
test prompt in train (another opener, a word swapped), which lets the model score on text it was
trained on. Two neighbour relations find them:

- cleanlab's near-duplicate sets (`near_duplicate_of` in the label-issue flags, on the features
  cleanlab was given: TF-IDF or sentence embeddings), computed before curation: a set that holds an
  evaluation row and a train row that curation kept;
- the TF-IDF features cleanlab's tfidf view uses (`label_issues.text_features`: hashed word 1-2 grams
  and char 4-grams, and their dense projection to find candidates): a train prompt whose cosine
  similarity to an evaluation prompt reaches `LEAKAGE_SIMILARITY`. A looser paraphrase of a short
  prompt (a few words reworded) stays under it; embedding features make cleanlab's sets semantic.

Curation keeps test rows as labelled (never cleaned silently), so the fix is on the train side: with
`near_duplicates: drop` curation quarantines the train rows `leaking_pairs` names; with `keep`, or on
splits made elsewhere, the check on the splits fails naming them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .check_registry import FAILING_ROWS_SHOWN, CheckOutcome
from .duplicates import SEPARATOR
from .label_issues import text_features

# Cosine similarity of TF-IDF vectors above which a train prompt counts as a copy of an evaluation
# prompt. On the demo reviews (templated sentences that differ in product and opinion) the closest test
# and train prompts of the 240-row set reach 0.85; in the 1200-row set four pairs reach 0.91-0.96, each
# the same sentence with another opener ("Well, the toaster ..." / "The toaster ..."): copies.
LEAKAGE_SIMILARITY = 0.9
EVALUATION_SPLITS = ("validation", "test")
CHUNK_CELLS = 20_000_000  # evaluation rows x train rows per dense product
CANDIDATES = 10  # nearest train rows by the dense projection, scored exactly


def numbers_of(texts: pd.Series) -> np.ndarray:
    """The numbers a text states, in order ("3|8"): two prompts that differ in them ask different things."""
    return texts.fillna("").astype(str).str.findall(r"\d+").str.join("|").to_numpy()


def nearest_rows(texts: pd.Series, queries: np.ndarray, among: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position in `queries`, the position in `among` (disjoint from `queries`) of its most
    similar row that states the same numbers, and the cosine similarity of their TF-IDF vectors; -1
    and 0.0 when there is none.

    Candidates are the `CANDIDATES` nearest by the TF-IDF's dense projection (`text_features`, one
    BLAS product per chunk), scored exactly on the sparse vectors: a near copy is near in both. The
    TF-IDF drops one-character tokens, so "How many minutes are in 3 hours?" and "... 8 hours?" have
    the same vector: a candidate stating other numbers (`numbers_of`) does not count."""
    best, similarity = np.full(len(queries), -1), np.zeros(len(queries), dtype=np.float32)
    if len(queries) == 0 or len(among) == 0:
        return best, similarity
    sparse, dense = text_features(texts.reset_index(drop=True))
    numbers = numbers_of(texts)
    targets = dense[among].T
    k = min(CANDIDATES, len(among))
    step = max(1, CHUNK_CELLS // len(among))
    for start in range(0, len(queries), step):
        rows = queries[start:start + step]
        near = np.argpartition(-(dense[rows] @ targets), k - 1, axis=1)[:, :k]  # positions in `among`
        pairs = sparse[np.repeat(rows, k)].multiply(sparse[among[near].ravel()])
        exact = np.asarray(pairs.sum(axis=1)).reshape(len(rows), k)
        exact[numbers[among[near]] != numbers[rows][:, None]] = -1.0
        top = exact.argmax(axis=1)
        found = exact[np.arange(len(rows)), top] >= 0
        best[start:start + step] = np.where(found, among[near[np.arange(len(rows)), top]], -1)
        similarity[start:start + step] = np.where(found, exact[np.arange(len(rows)), top], 0.0)
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
        numbers = dict(zip(ids, numbers_of(frame["prompt"])))
        found = [(t, e) for t, m in zip(ids[train], members) for e in m.split(SEPARATOR)
                 if e in in_evaluation and numbers[e] == numbers[t]]
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
