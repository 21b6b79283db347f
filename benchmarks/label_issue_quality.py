"""How well the cleanlab gate finds label errors: planted errors in the demo data, and Banking77.

1. Demo data (`sft_dagster.demo_data.generate_demo_dataset`, ~4% planted label errors whose truth is
   written to truth/planted_label_errors.csv): ingest -> labels -> `find_label_issues`, the same
   path the pipeline takes; precision and recall of `is_label_issue` against the planted errors,
   for each size and seed given. Target: both >= 0.8.
2. Banking77 (../shared/datasets/banking77/train.csv, columns text,category; 77 intents): how many
   rows the gate flags (rate, gate pass/fail at the default max_label_issue_rate) on a sample, and
   the worst flagged rows for a human to judge. There is no ground truth there.

    .venv/bin/python benchmarks/label_issue_quality.py --demo-rows 1200 5000 20000 --seeds 0 1 \\
        --banking77 ../shared/datasets/banking77/train.csv --banking77-sample 10000

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from sft_dagster import ingest, labels
from sft_dagster.demo_data import LABELS, generate_demo_dataset
from sft_dagster.quality import find_label_issues
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


def banking77_run(path: Path, sample: int, seed: int, cfg: CleanlabSpec, show: int) -> dict:
    data = pd.read_csv(path)
    if sample and sample < len(data):
        data = data.sample(sample, random_state=seed).sort_index()
    intents = sorted(data["category"].unique())
    task = TaskSpec(type="classification", labels=intents)
    df = pd.DataFrame({
        "example_id": [content_hash(None, t, c) + f"~{i}" for i, (t, c) in enumerate(zip(data["text"], data["category"]))],
        "content_hash": [content_hash(None, t, c) for t, c in zip(data["text"], data["category"])],
        "prompt": data["text"].astype(str).to_numpy(), "response": data["category"].to_numpy(), "system": None,
        "source_file": str(path), "source_line": (data.index + 2).to_numpy(), "reviewed": False,
    })
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
    args = parser.parse_args()
    cfg = CleanlabSpec(features=args.features)
    result: dict = {"demo": [demo_run(n, seed, cfg) for n in args.demo_rows for seed in args.seeds]}
    if args.banking77 and args.banking77.exists():
        result["banking77"] = banking77_run(args.banking77, args.banking77_sample, args.seeds[0], cfg, args.show)
    else:
        result["banking77"] = f"not run: {args.banking77} not found"
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
