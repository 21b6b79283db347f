"""cleanlab on labelled examples: label errors, outliers and near duplicates, as a review queue.

Label tasks: out-of-fold predicted probabilities from a quick text classifier (TF-IDF word and
character n-grams + logistic regression, k folds), then cleanlab's `Datalab` for label, outlier,
near_duplicate, class_imbalance and non_iid issues. Generation tasks: outliers and near duplicates on
the same features. Rows a data engineer marked `keep` (reviewed) are never flagged as label issues.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..spec import CleanlabSpec, TaskSpec
from .checks import CheckOutcome

LABEL_ISSUE_TYPES = ("label", "outlier", "near_duplicate", "class_imbalance", "non_iid")
GENERATION_ISSUE_TYPES = ("outlier", "near_duplicate")
SVD_DIMS = 64  # bounded dense features keep cleanlab's kNN fast at any row count
NON_IID_MIN_P = 0.01


@dataclass
class LabelIssueReport:
    review_queue: pd.DataFrame
    flags: pd.DataFrame
    summary: dict

    def gate_outcomes(self, cfg: CleanlabSpec) -> list[CheckOutcome]:
        s = self.summary
        flagged = self.flags.loc[self.flags["is_label_issue"], "example_id"].astype(str).tolist()
        rate = s.get("label_issue_rate", 0.0)
        missing = s.get("missing_issue_types", [])
        outcomes = [
            CheckOutcome("label_issue_rate", rate <= cfg.max_label_issue_rate, True,
                         f"label issue rate {rate:.4f} vs the allowed {cfg.max_label_issue_rate}",
                         {"label_issue_rate": rate, "label_issue_count": s.get("label_issue_count", 0),
                          "max_label_issue_rate": cfg.max_label_issue_rate},
                         failing_ids=flagged, failing_rows=self.review_queue.head(20)),
            CheckOutcome("issue_types_evaluated", not missing, True,
                         "every expected cleanlab issue type was evaluated" if not missing
                         else f"cleanlab did not evaluate {missing}: a skipped check is a failed gate",
                         {"checked": s.get("issue_types_checked", []), "missing": missing}),
        ]
        if "class_imbalance" in s.get("issue_types_expected", []):
            outcomes.append(CheckOutcome("class_imbalance", not s.get("class_imbalance_issue", False), False,
                                         "no class is far rarer than the others", {"rarest_class": s.get("rarest_class")}))
        if "non_iid" in s.get("issue_types_expected", []):
            p = s.get("non_iid_p_value")
            outcomes.append(CheckOutcome("non_iid", p is None or p >= NON_IID_MIN_P, False,
                                         "row order looks independent (cleanlab non_iid p-value)", {"p_value": p}))
        return outcomes


def text_features(texts: pd.Series, seed: int = 0):
    """Sparse TF-IDF (word 1-2 grams + char 3-5 grams) and a bounded dense projection of it."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    vectorizer = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=50_000, dtype=np.float32),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, max_features=50_000, dtype=np.float32),
    )
    sparse = vectorizer.fit_transform(texts.fillna("").astype(str))
    dims = max(1, min(SVD_DIMS, sparse.shape[1] - 1, sparse.shape[0] - 1))
    dense = TruncatedSVD(dims, random_state=seed).fit_transform(sparse).astype(np.float32)
    return sparse, dense


LBFGS_MAX_ROWS = 20_000  # above this, SGD: lbfgs logistic regression grows too slow for the gate
EXACT_KNN_MAX_ROWS = 20_000  # above this, an HNSW index (near-linear) instead of exact search
KNN_NEIGHBOURS = 10


def out_of_fold_probabilities(sparse, labels: np.ndarray, folds: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Out-of-fold class probabilities; columns in sorted label order (the order Datalab uses)."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    classes = sorted(set(labels))
    smallest = min(int((labels == c).sum()) for c in classes)
    k = max(2, min(folds, smallest))
    if len(labels) <= LBFGS_MAX_ROWS:
        model = LogisticRegression(C=10.0, max_iter=1000)
    else:
        model = SGDClassifier(loss="log_loss", alpha=1e-6, max_iter=20, tol=None, random_state=seed)
    probs = cross_val_predict(model, sparse, labels, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                              method="predict_proba")
    return probs, classes


def knn_graph(dense: np.ndarray, k: int = KNN_NEIGHBOURS):
    """k nearest neighbours (self excluded) as the sparse distance graph cleanlab takes.

    Euclidean distance between L2-normalised vectors (the cosine ordering). Exact search for small
    data, an HNSW index above EXACT_KNN_MAX_ROWS so the gate scales near-linearly with rows.
    """
    from scipy.sparse import csr_matrix

    n = len(dense)
    k = max(1, min(k, n - 1))
    vectors = np.ascontiguousarray(dense / np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12), dtype=np.float32)
    if n <= EXACT_KNN_MAX_ROWS:
        from sklearn.neighbors import NearestNeighbors

        distances, neighbours = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(vectors).kneighbors(vectors)
        squared = distances**2
    else:
        # faiss is imported only here: its OpenMP runtime slows scikit-learn down in the same process.
        import faiss

        index = faiss.IndexHNSWFlat(vectors.shape[1], 16)
        index.hnsw.efConstruction = 40
        index.add(vectors)
        index.hnsw.efSearch = 32
        squared, neighbours = index.search(vectors, k + 1)
    rows, cols, dists = [], [], []
    for i in range(n):  # drop the row itself, wherever the search ranked it among equal points
        keep = [(j, d) for j, d in zip(neighbours[i], squared[i]) if j != i and j >= 0][:k]
        rows += [i] * len(keep)
        cols += [j for j, _ in keep]
        dists += [float(np.sqrt(max(d, 0.0))) for _, d in keep]
    return csr_matrix((dists, (rows, cols)), shape=(n, n))


def find_label_issues(df: pd.DataFrame, task: TaskSpec, cfg: CleanlabSpec, seed: int = 0) -> LabelIssueReport:
    from cleanlab import Datalab

    frame = df.reset_index(drop=True)
    if cfg.features != "tfidf":
        raise ValueError(f"quality.cleanlab.features: {cfg.features!r} is not available in this build; use tfidf")
    sparse, dense = text_features(frame["prompt"], seed)
    label_task = task.is_label_task
    flags = pd.DataFrame({"example_id": frame["example_id"].astype(str)})
    summary: dict = {"n_rows": len(frame)}

    if label_task:
        # Rows with a label outside the task's set cannot be scored; the label_in_set check handles them.
        valid = frame["response"].isin(task.labels).to_numpy()
        labels = frame.loc[valid, "response"].astype(str).to_numpy()
        expected = list(LABEL_ISSUE_TYPES)
        probs, classes = out_of_fold_probabilities(sparse[valid], labels, cfg.folds, seed)
        lab = Datalab(data=pd.DataFrame({"label": labels}), label_name="label", verbosity=0)
        lab.find_issues(pred_probs=probs, features=dense[valid], knn_graph=knn_graph(dense[valid]),
                        issue_types={t: {} for t in expected})
        issue_frame = lab.get_issues()
        summary["class_order"] = classes
        issue_frame.index = np.flatnonzero(valid)
    else:
        expected = list(GENERATION_ISSUE_TYPES)
        lab = Datalab(data=pd.DataFrame({"text": frame["prompt"].astype(str)}), verbosity=0)
        lab.find_issues(features=dense, knn_graph=knn_graph(dense), issue_types={t: {} for t in expected})
        issue_frame = lab.get_issues()
        issue_frame.index = frame.index

    checked = sorted(set(lab.get_issue_summary()["issue_type"]))
    summary["issue_types_expected"] = expected
    summary["issue_types_checked"] = checked
    summary["missing_issue_types"] = sorted(set(expected) - set(checked))

    def column(name: str, default) -> pd.Series:
        if name in issue_frame:
            return issue_frame[name].reindex(frame.index)
        return pd.Series(default, index=frame.index)

    reviewed = frame["reviewed"].fillna(False).astype(bool) if "reviewed" in frame else pd.Series(False, index=frame.index)
    flags["is_label_issue"] = column("is_label_issue", False).fillna(False).astype(bool) & ~reviewed
    flags["label_score"] = column("label_score", np.nan).astype(float)
    flags["is_outlier"] = column("is_outlier_issue", False).fillna(False).astype(bool)
    flags["outlier_score"] = column("outlier_score", np.nan).astype(float)
    flags["is_near_duplicate"] = column("is_near_duplicate_issue", False).fillna(False).astype(bool)
    suggested = pd.Series(pd.NA, index=frame.index, dtype="string")
    if label_task:
        info = lab.get_info("label")
        suggested.iloc[np.flatnonzero(valid)] = np.asarray(info["predicted_label"]).astype(str)
        imbalance = lab.get_info("class_imbalance") or {}
        summary["class_imbalance_issue"] = bool(column("is_class_imbalance_issue", False).fillna(False).any())
        summary["rarest_class"] = str(imbalance.get("Rarest Class", "NA"))
        p_value = (lab.get_info("non_iid") or {}).get("p-value")
        summary["non_iid_p_value"] = None if p_value is None else float(p_value)
    flags["suggested_label"] = suggested

    summary["label_issue_count"] = int(flags["is_label_issue"].sum())
    summary["label_issue_rate"] = round(summary["label_issue_count"] / max(1, len(frame)), 6)
    summary["outlier_count"] = int(flags["is_outlier"].sum())
    summary["near_duplicate_count"] = int(flags["is_near_duplicate"].sum())
    summary["reviewed_rows_not_flagged"] = int(reviewed.sum())

    queue = build_review_queue(frame, flags)
    return LabelIssueReport(review_queue=queue, flags=flags, summary=summary)


def build_review_queue(frame: pd.DataFrame, flags: pd.DataFrame) -> pd.DataFrame:
    """Flagged rows only, worst first: label issues by how unlikely the given label is."""
    joined = frame[["example_id", "prompt", "response", "source_file", "source_line"]].assign(
        example_id=frame["example_id"].astype(str)).merge(flags, on="example_id")
    flagged = joined[joined["is_label_issue"] | joined["is_outlier"] | joined["is_near_duplicate"]].copy()
    types = []
    for row in flagged.itertuples():
        kinds = [k for k, hit in (("label", row.is_label_issue), ("outlier", row.is_outlier),
                                  ("near_duplicate", row.is_near_duplicate)) if hit]
        types.append(",".join(kinds))
    flagged["issue_types"] = types
    label_severity = (1 - flagged["label_score"].fillna(1.0)) * flagged["is_label_issue"]
    flagged["severity"] = (label_severity + 0.5 * flagged["is_outlier"] * (1 - flagged["outlier_score"].fillna(1.0))
                           + 0.1 * flagged["is_near_duplicate"]).round(6)
    flagged = flagged.rename(columns={"response": "given_label"})
    columns = ["example_id", "prompt", "given_label", "suggested_label", "label_score", "is_label_issue", "is_outlier",
               "is_near_duplicate", "issue_types", "severity", "source_file", "source_line"]
    return flagged.sort_values(["severity", "example_id"], ascending=[False, True])[columns].reset_index(drop=True)
