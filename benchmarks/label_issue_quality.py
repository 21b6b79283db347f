"""How well the cleanlab gate finds label errors: planted errors in the demo data, and Banking77.

1. Demo data (`sft_dagster.demo_data.generate_demo_dataset`, ~4% planted label errors whose truth is
   written to truth/planted_label_errors.csv): ingest -> labels -> `find_label_issues`, the same
   path the pipeline takes; precision and recall of `is_label_issue` against the planted errors,
   for each size and seed given. Target: both >= 0.8.
2. Banking77 as labelled (../shared/datasets/banking77/train.csv, columns text,category; 77 intents):
   how many rows the gate flags on a sample, and the worst flagged rows for a human to judge. There is
   no ground truth there.
3. Banking77 with known noise (`--noise`): the clean labels get uniform flips or instance-dependent
   flips (`sft_dagster.quality.noise.confusion_flips`: towards the intent a classifier trained on the
   other folds confuses each row with; generator `tfidf` = the TF-IDF + SGD model on the clean labels,
   `embeddings` = the same logistic loss on MiniLM embeddings), at each rate; then `find_label_issues`
   for every feature choice. Precision / recall of the flags, AUROC of the label score, recall at
   precision >= 0.75 down the ranking, measured vs estimated precision of the queue's top N, seconds.
   Sentence embeddings are computed once per text set and the llm view once per noisy copy, and
   reused across feature choices (their one-off costs are reported as `embedding_seconds` and
   `llm.seconds`); the llm view runs only on `--llm-intents` (its cost grows with the number of labels).

    .venv/bin/python benchmarks/label_issue_quality.py --demo-rows 1200 5000 20000 --seeds 0 1 \\
        --banking77 ../shared/datasets/banking77/train.csv --banking77-sample 10000
    .venv/bin/python benchmarks/label_issue_quality.py --demo-rows --noise --out benchmarks/results/label_noise.json

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sft_dagster import ingest, labels
from sft_dagster.demo_data import LABELS, generate_demo_dataset
from sft_dagster.quality import find_label_issues
from sft_dagster.quality import label_issues as li
from sft_dagster.quality.noise import confusion_flips, detection_quality, uniform_flips
from sft_dagster.schema import content_hash
from sft_dagster.spec import CleanlabSpec, TaskSpec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def demo_run(n_rows: int, seed: int, cfg: CleanlabSpec) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        manifest = generate_demo_dataset(out, n_rows=n_rows, seed=seed)
        spec = parse_spec({
            "name": "bench", "task": {"type": "sentiment", "labels": LABELS},
            "sources": [{"path": "*.jsonl", "columns": {"prompt": "text", "response": "label"}},
                        {"path": "*.csv", "columns": {"prompt": "review_text", "response": "sentiment"}}],
        }, out / "spec.yaml")
        examples, quarantined, _ = ingest.ingest(spec)
        labelled, _, _ = labels.apply_corrections(examples, labels.empty_corrections(), LABELS)
        start = time.perf_counter()
        report = find_label_issues(labelled, spec.task, cfg, seed=seed)
        seconds = time.perf_counter() - start
        audit = pd.read_csv(out / "truth" / "planted_label_errors.csv")
        scores = labels.label_issue_detection_scores(labelled, report.flags, audit)
    gates = {o.name: o.passed for o in report.gate_outcomes(cfg)}
    return {"rows": len(labelled), "seed": seed, "features": cfg.features, "planted": len(manifest["planted_label_errors"]),
            **scores, "label_issue_rate": report.summary["label_issue_rate"], "gates_passed": gates,
            "seconds": round(seconds, 2)}


def labelled_frame(texts: pd.Series, labels: np.ndarray, source: str, lines: np.ndarray) -> pd.DataFrame:
    hashes = [content_hash(None, t, c) for t, c in zip(texts, labels)]
    return pd.DataFrame({"example_id": [f"{h}~{i}" for i, h in enumerate(hashes)], "content_hash": hashes,
                         "prompt": texts.astype(str).to_numpy(), "response": labels, "system": None,
                         "source_file": source, "source_line": lines, "reviewed": False})


class EmbeddingMemo:
    """Sentence embeddings computed once per text list and reused across the runs of one benchmark."""

    def __init__(self, preload: dict[str, np.ndarray] | None = None):
        self.cache: dict[int, np.ndarray] = {}
        self.seconds: dict[int, float] = {}
        self.original = li.embedding_features
        self.preload = preload or {}

    def __call__(self, texts: pd.Series):
        key = hash(tuple(texts.astype(str)))
        if key not in self.cache and self.preload and all(t in self.preload for t in texts.astype(str)):
            self.cache[key] = np.stack([self.preload[t] for t in texts.astype(str)])
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = self.original(texts)
            self.seconds[key] = round(time.perf_counter() - start, 2)
        return self.cache[key]

    def seconds_for(self, texts: pd.Series) -> float | None:
        return self.seconds.get(hash(tuple(texts.astype(str))))


class LlmMemo:
    """The llm view's probabilities computed once per (rows, given labels) and reused across feature choices."""

    def __init__(self):
        self.cache: dict[int, tuple] = {}
        self.original = li.llm_label_probabilities

    def __call__(self, model_dir, prompts, given, *args, **kwargs):
        key = hash((tuple(prompts), tuple(map(str, given))))
        if key not in self.cache:
            self.cache[key] = self.original(model_dir, prompts, given, *args, **kwargs)
        return self.cache[key]


def noise_runs(data: pd.DataFrame, source: str, settings: list[tuple[str, float]], features: list[str], seed: int,
               model_dir, memo: EmbeddingMemo) -> list[dict]:
    """find_label_issues for each feature choice on each noisy copy of `data` (clean labels in `category`)."""
    intents = sorted(data["category"].unique())
    clean = data["category"].to_numpy()
    codes = np.searchsorted(intents, clean)
    task = TaskSpec(type="classification", labels=intents)
    generators: dict[str, np.ndarray] = {}
    out = []
    for kind, rate in settings:
        if kind == "uniform":
            noisy = uniform_flips(codes, len(intents), rate, seed)
        else:
            if kind not in generators:
                inputs = li.text_features(data["text"], seed)[0] if kind == "tfidf" else memo(data["text"])
                generators[kind] = li.out_of_fold_probabilities(inputs, clean, 5, seed + 100)[0]
            noisy = confusion_flips(codes, generators[kind], rate, seed)
        df = labelled_frame(data["text"], np.array(intents)[noisy], source, np.arange(2, len(data) + 2))
        wrong = noisy != codes
        for feature in features:
            views = feature.split("+")
            cfg = (CleanlabSpec(features=feature) if len(views) == 1
                   else CleanlabSpec(features="ensemble", ensemble=views))
            start = time.perf_counter()
            report = find_label_issues(df, task, cfg, seed=seed, model_dir=model_dir)
            seconds = time.perf_counter() - start
            row = {"rows": len(df), "classes": len(intents), "noise": kind, "rate": rate, "features": feature,
                   **detection_quality(wrong, report.flags, report.review_queue),
                   "seconds": round(seconds, 2), "parts": report.summary["seconds"],
                   "view_weights": {v: i["weight"] for v, i in report.summary["view_info"].items()},
                   "estimated_precision_top": report.summary["estimated_precision_top"]}
            if "embeddings" in views:
                row["embedding_seconds"] = memo.seconds_for(df["prompt"])
            if "llm" in views:
                row["llm"] = report.summary["view_info"]["llm"]
            print(json.dumps({k: row[k] for k in ("rows", "noise", "rate", "features", "flagged", "precision", "recall",
                                                  "auroc", "recall_at_precision_0.75", "seconds")}), flush=True)
            out.append(row)
    return out


def banking77_run(path: Path, sample: int, seed: int, cfg: CleanlabSpec, show: int) -> dict:
    data = pd.read_csv(path)
    if sample and sample < len(data):
        data = data.sample(sample, random_state=seed).sort_index()
    intents = sorted(data["category"].unique())
    task = TaskSpec(type="classification", labels=intents)
    df = labelled_frame(data["text"], data["category"].to_numpy(), str(path), (data.index + 2).to_numpy())
    start = time.perf_counter()
    report = find_label_issues(df, task, cfg, seed=seed)
    seconds = time.perf_counter() - start
    gates = {o.name: o.passed for o in report.gate_outcomes(cfg)}
    worst = report.review_queue[report.review_queue["is_label_issue"]].head(show)
    s = report.summary
    return {"rows": len(df), "classes": len(intents), "label_issue_count": s["label_issue_count"],
            "label_issue_rate": s["label_issue_rate"], "outlier_count": s["outlier_count"],
            "near_duplicate_count": s["near_duplicate_count"], "non_iid_p_value": s["non_iid_p_value"],
            "max_label_issue_rate": cfg.max_label_issue_rate, "gates_passed": gates, "seconds": round(seconds, 2),
            "worst_flagged": worst[["prompt", "given_label", "suggested_label", "label_score"]]
            .round({"label_score": 4}).to_dict("records")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-rows", type=int, nargs="*", default=[1200, 5000, 20000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--features", choices=["tfidf", "embeddings"], default="tfidf")
    parser.add_argument("--banking77", type=Path, default=ROOT.parent / "shared" / "datasets" / "banking77" / "train.csv")
    parser.add_argument("--banking77-sample", type=int, default=10_000, help="rows sampled (0: all)")
    parser.add_argument("--show", type=int, default=10)
    parser.add_argument("--noise", action="store_true", help="run part 3 (Banking77 with known noise)")
    parser.add_argument("--noise-settings", nargs="+", default=["uniform:0.2", "tfidf:0.1", "tfidf:0.2", "embeddings:0.1",
                                                                "embeddings:0.2"])
    parser.add_argument("--noise-features", nargs="+", default=["tfidf", "embeddings", "tfidf+embeddings"])
    parser.add_argument("--llm-intents", nargs="*", default=["card_arrival", "card_delivery_estimate", "card_not_working",
                                                             "card_swallowed"])
    parser.add_argument("--llm-features", nargs="+", default=["tfidf", "embeddings", "llm", "tfidf+embeddings",
                                                              "tfidf+embeddings+llm"])
    parser.add_argument("--llm-settings", nargs="+", default=["tfidf:0.2"])
    parser.add_argument("--llm-rows", type=int, default=0, help="rows sampled from the --llm-intents rows (0: all)")
    parser.add_argument("--skip-full", action="store_true", help="only the --llm-intents part")
    parser.add_argument("--embeddings-npy", type=Path,
                        help="embedding_features() of every --banking77 row, saved with np.save: reused, not recomputed")
    parser.add_argument("--storage", type=Path, default=ROOT / ".sft")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cfg = CleanlabSpec(features=args.features)
    result: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "demo": [demo_run(n, seed, cfg) for n in args.demo_rows for seed in args.seeds]}
    if not (args.banking77 and args.banking77.exists()):
        result["banking77"] = f"not run: {args.banking77} not found"
    elif not args.noise:
        result["banking77"] = banking77_run(args.banking77, args.banking77_sample, args.seeds[0], cfg, args.show)
    else:
        from sft_dagster.models import resolve_base_model
        from sft_dagster.spec import ModelSpec

        preload = None
        if args.embeddings_npy:  # embedding_features() of the whole --banking77 file, saved earlier (np.save)
            texts = pd.read_csv(args.banking77)["text"].astype(str).tolist()
            vectors = np.load(args.embeddings_npy)
            if len(vectors) != len(texts):
                raise SystemExit(f"{args.embeddings_npy}: {len(vectors)} vectors for {len(texts)} rows")
            preload = dict(zip(texts, vectors))
        memo = EmbeddingMemo(preload)
        li.embedding_features = memo
        li.llm_label_probabilities = LlmMemo()
        data = pd.read_csv(args.banking77)
        if args.banking77_sample and args.banking77_sample < len(data):
            data = data.sample(args.banking77_sample, random_state=args.seeds[0]).sort_index()
        data = data.reset_index(drop=True)
        settings = [(k, float(r)) for k, r in (s.split(":") for s in args.noise_settings)]
        if not args.skip_full:
            result["banking77_noise"] = noise_runs(data, str(args.banking77), settings, args.noise_features, args.seeds[0],
                                                   None, memo)
            write(result, args.out)  # the llm part takes long: keep what is done
        if args.llm_intents:
            model_dir = resolve_base_model(ModelSpec(), args.storage / "models").path
            subset = data[data["category"].isin(args.llm_intents)]
            if args.llm_rows and args.llm_rows < len(subset):
                subset = subset.sample(args.llm_rows, random_state=args.seeds[0]).sort_index()
            subset = subset.reset_index(drop=True)
            settings = [(k, float(r)) for k, r in (s.split(":") for s in args.llm_settings)]
            result["banking77_subset_noise"] = noise_runs(subset, str(args.banking77), settings, args.llm_features,
                                                          args.seeds[0], model_dir, memo)
    print(write(result, args.out))


def write(result: dict, out: Path | None) -> str:
    text = json.dumps(result, indent=1, default=str)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


if __name__ == "__main__":
    main()
