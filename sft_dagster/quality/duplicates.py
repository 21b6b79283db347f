"""Duplicate clusters: rows that are the same example, exactly or up to case, punctuation and spacing, or
that cleanlab found to be near duplicates; and label conflicts, clusters whose labels disagree.

A cluster is the transitive closure of three relations between rows:
- the same content hash (exact duplicates);
- the same normalised text (`normalized_text`: case, punctuation and spacing folded away) of the
  example's input: the prompt (with system prompt and chat history) for label tasks, prompt and
  response for generation tasks;
- cleanlab's near-duplicate sets (`near_duplicate_of` in the label-issue flags, when present).

Curation keeps one representative per cluster (`representatives`); a label task's cluster whose rows
carry different labels is a label conflict, listed in the review queue with every label it has
(`conflict_rows`) and never resolved silently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..splits import normalized_text

CONFLICT_ISSUE = "label_conflict"
SEPARATOR = "|"  # between example ids in `near_duplicate_of`, and between labels in `conflict_labels`


def near_duplicate_ids(lab, positions: np.ndarray, example_ids: pd.Series) -> pd.Series:
    """cleanlab's near-duplicate set of each row as `|`-joined example ids ("" for none), indexed like
    `example_ids`. `positions[i]` is the row of `example_ids` that was Datalab's item i."""
    out = pd.Series("", index=example_ids.index, dtype="object")
    try:
        sets = lab.get_issues("near_duplicate")["near_duplicate_sets"]
    except (KeyError, ValueError):  # near duplicates were not evaluated: the gate says so
        return out
    ids = example_ids.astype(str).to_numpy()
    for item, members in enumerate(sets):
        if len(members):
            out.iloc[positions[item]] = SEPARATOR.join(ids[positions[np.asarray(members, dtype=int)]])
    return out


def _input_key(df: pd.DataFrame, label_task: bool) -> pd.Series:
    key = normalized_text(df["prompt"])
    if label_task:
        for column in ("system", "history"):
            if column in df:
                key = key + "\x1f" + df[column].fillna("").astype(str)
    else:
        key = key + "\x1f" + normalized_text(df["response"])
    return key.where(normalized_text(df["prompt"]).str.len() > 0)  # empty text clusters with nothing


def duplicate_clusters(df: pd.DataFrame, label_task: bool, flags: pd.DataFrame | None = None) -> pd.Series:
    """Each row's cluster, as the position (0..n-1, frame order) of the cluster's first row."""
    n = len(df)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union_groups(keys: pd.Series) -> None:
        keys = keys.reset_index(drop=True).dropna()  # labels are now positions in the frame
        for positions in keys.groupby(keys, sort=False).groups.values():
            first = find(int(positions[0]))
            for p in positions[1:]:
                other = find(int(p))
                if other != first:
                    lo, hi = sorted((first, other))
                    parent[hi] = lo
                    first = lo

    union_groups(df["content_hash"].astype("string"))
    union_groups(_input_key(df, label_task))
    if flags is not None and "near_duplicate_of" in flags and n:
        position = pd.Series(np.arange(n), index=df["example_id"].astype(str).to_numpy())
        near = df["example_id"].astype(str).map(flags.drop_duplicates("example_id").set_index("example_id")["near_duplicate_of"])
        for i, members in enumerate(near.fillna("").astype(str)):
            for other in filter(None, members.split(SEPARATOR)):
                if other in position.index:
                    a, b = find(i), find(int(position[other]))
                    if a != b:
                        lo, hi = sorted((a, b))
                        parent[hi] = lo
    return pd.Series([find(i) for i in range(n)], index=df.index, dtype="int64")


def representatives(df: pd.DataFrame, clusters: pd.Series, eligible: pd.Series | None = None) -> pd.Series:
    """Each row's cluster representative (example_id): a reviewed row first, else the first by source
    order; rows that are not `eligible` (failing a blocking check) only when no other row is."""
    reviewed = df["reviewed"].fillna(False).astype(bool) if "reviewed" in df else pd.Series(False, index=df.index)
    eligible = pd.Series(True, index=df.index) if eligible is None else eligible
    order = pd.DataFrame({"cluster": clusters, "ineligible": ~eligible.astype(bool), "unreviewed": ~reviewed,
                          "position": np.arange(len(df)), "example_id": df["example_id"].astype(str)}, index=df.index)
    best = order.sort_values(["cluster", "ineligible", "unreviewed", "position"]).drop_duplicates("cluster")
    return clusters.map(best.set_index("cluster")["example_id"])


def describe_labels(members: pd.DataFrame) -> str:
    """`negative (id1, id2) vs positive (id3)`: every label of a cluster with the rows carrying it."""
    parts = [f"{label} ({', '.join(group['example_id'].astype(str))})"
             for label, group in members.groupby("response", sort=True)]
    return " vs ".join(parts)


def conflicting_clusters(df: pd.DataFrame, clusters: pd.Series, considered: pd.Series | None = None) -> pd.Series:
    """True for the rows of clusters whose `considered` rows carry more than one label."""
    considered = pd.Series(True, index=df.index) if considered is None else considered.astype(bool)
    labels = df["response"].astype("string").where(considered)
    n_labels = labels.groupby(clusters).transform("nunique")
    return n_labels.gt(1)


def conflict_rows(df: pd.DataFrame, flags: pd.DataFrame | None) -> pd.DataFrame:
    """The review-queue rows of every unresolved label conflict: each row of a cluster whose labels
    disagree, with all of the cluster's labels. A conflict is resolved once the rows a data engineer
    reviewed (`keep`) agree on one label; curation then keeps that label."""
    frame = df.reset_index(drop=True)
    if frame.empty:
        return pd.DataFrame()
    clusters = duplicate_clusters(frame, True, flags)
    conflict = conflicting_clusters(frame, clusters)
    reviewed = frame["reviewed"].fillna(False).astype(bool) if "reviewed" in frame else pd.Series(False, index=frame.index)
    resolved = reviewed.groupby(clusters).transform("any") & ~conflicting_clusters(frame, clusters, reviewed)
    rows = frame[conflict & ~resolved].copy()
    if rows.empty:
        return pd.DataFrame()
    groups = {c: g for c, g in rows.groupby(clusters[rows.index])}
    rows["conflict_labels"] = [SEPARATOR.join(sorted(set(groups[c]["response"].astype(str)))) for c in clusters[rows.index]]
    rows["conflict_detail"] = [describe_labels(groups[c]) for c in clusters[rows.index]]
    rows["conflict_cluster"] = [str(groups[c]["example_id"].iloc[0]) for c in clusters[rows.index]]
    return rows


def with_label_conflicts(queue: pd.DataFrame, df: pd.DataFrame, flags: pd.DataFrame | None) -> pd.DataFrame:
    """The review queue with every unresolved label conflict in it, worst first.

    A conflicting row gets issue type `label_conflict`, the cluster's labels (`conflict_labels`, and
    `conflict_detail` naming the rows of each label) and severity 1 (above any cleanlab finding: its
    rows are held out of training until someone decides). A row already queued keeps its cleanlab
    findings; the others join with what cleanlab found for them.
    """
    conflicts = conflict_rows(df, flags)
    queue = queue.copy()
    for column in ("conflict_labels", "conflict_detail"):
        queue[column] = pd.Series(pd.NA, index=queue.index, dtype="object")
    if conflicts.empty:
        return queue
    conflicts = conflicts.assign(example_id=conflicts["example_id"].astype(str)).set_index("example_id")
    queued = queue["example_id"].astype(str)
    hit = queued.isin(conflicts.index)
    for column in ("conflict_labels", "conflict_detail"):
        queue.loc[hit, column] = queued[hit].map(conflicts[column]).to_numpy()
    queue.loc[hit, "issue_types"] = queue.loc[hit, "issue_types"].astype(str) + "," + CONFLICT_ISSUE
    queue.loc[hit, "severity"] = 1.0
    new_ids = [i for i in conflicts.index if i not in set(queued)]
    new = conflicts.loc[new_ids].reset_index()
    added = pd.DataFrame({
        "example_id": new["example_id"], "prompt": new["prompt"], "given_label": new["response"],
        "issue_types": CONFLICT_ISSUE, "severity": 1.0, "conflict_labels": new["conflict_labels"],
        "conflict_detail": new["conflict_detail"], "source_file": new.get("source_file"),
        "source_line": new.get("source_line"),
    })
    if flags is not None and len(added):
        known = flags.assign(example_id=flags["example_id"].astype(str)).drop_duplicates("example_id").set_index("example_id")
        for column in queue.columns:
            if column not in added and column in known:
                added[column] = added["example_id"].map(known[column]).to_numpy()
    for column in ("is_label_issue", "is_outlier", "is_near_duplicate"):
        if column in queue.columns:
            added[column] = added[column].fillna(False).astype(bool) if column in added else False
    combined = pd.concat([queue, added[[c for c in queue.columns if c in added]]], ignore_index=True) if len(added) else queue
    return combined.sort_values(["severity", "example_id"], ascending=[False, True]).reset_index(drop=True)
