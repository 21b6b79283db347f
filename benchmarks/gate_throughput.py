"""Time the full data-quality gate on 100k and 1M synthetic labelled rows.

The gate is what the pipeline runs before training: token lengths in the base model's tokenizer,
the `sentiment` suite (great-expectations + SFT checks, one GX validation), and cleanlab (TF-IDF
features, out-of-fold probabilities, Datalab label / outlier / near-duplicate / class-imbalance /
non-iid). Prints JSON with seconds per part, rows/s, and the growth ratio from the smallest to the
largest size (1.0 = linear).

    .venv/bin/python benchmarks/gate_throughput.py --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sft_dagster.demo_data import EXTRAS, OPENERS, PHRASES, PRODUCTS
from sft_dagster.formatting import token_lengths
from sft_dagster.models import resolve_base_model
from sft_dagster.quality import find_label_issues, load_suite, run_suite
from sft_dagster.spec import CleanlabSpec, ModelSpec, TaskSpec

ROOT = Path(__file__).resolve().parents[1]
TASK = TaskSpec(type="sentiment", labels=["negative", "neutral", "positive"],
                prompt_template="Classify the sentiment of this product review. Review: {prompt}")


def synthetic_rows(n: int, seed: int = 0, error_rate: float = 0.03) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.array(TASK.labels)[rng.integers(0, 3, n)]
    phrase = {lab: np.array(PHRASES[lab]) for lab in TASK.labels}
    first = np.empty(n, dtype=object)
    for lab in TASK.labels:
        idx = np.flatnonzero(labels == lab)
        first[idx] = phrase[lab][rng.integers(0, len(phrase[lab]), len(idx))]
    texts = (np.array(OPENERS, dtype=object)[rng.integers(0, len(OPENERS), n)] + "the "
             + np.array(PRODUCTS, dtype=object)[rng.integers(0, len(PRODUCTS), n)] + " " + first + " (order "
             + rng.integers(0, 10**9, n).astype(str).astype(object) + ")."
             + np.array(EXTRAS, dtype=object)[rng.integers(0, len(EXTRAS), n)])
    flip = rng.random(n) < error_rate
    given = labels.copy()
    given[flip] = np.array(TASK.labels)[(np.searchsorted(TASK.labels, labels[flip]) + rng.integers(1, 3, flip.sum())) % 3]
    ids = pd.util.hash_array(texts.astype(str)).astype(str)
    return pd.DataFrame({"example_id": ids, "content_hash": ids, "prompt": texts.astype(str), "response": given,
                         "system": None, "source_file": "synthetic", "source_line": np.arange(1, n + 1), "reviewed": False})


def run_gate(df: pd.DataFrame, tokenizer, suite) -> dict:
    timings = {}
    start = time.perf_counter()
    lengths = token_lengths(tokenizer, df, TASK)
    timings["token_lengths"] = time.perf_counter() - start
    t = time.perf_counter()
    outcomes = run_suite(df, suite, task=TASK, token_lengths=lengths, max_length=256)
    timings["suite"] = time.perf_counter() - t
    t = time.perf_counter()
    report = find_label_issues(df, TASK, CleanlabSpec(folds=5))
    timings["cleanlab"] = time.perf_counter() - t
    total = time.perf_counter() - start
    gate = timings["suite"] + timings["cleanlab"]
    return {"rows": len(df), "seconds": round(total, 2), "rows_per_second": round(len(df) / total),
            "gate_seconds_without_tokenizer": round(gate, 2),
            "parts": {k: round(v, 2) for k, v in timings.items()},
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "blocking_failures": [o.name for o in outcomes if o.blocking and not o.passed],
            "label_issue_rate": report.summary["label_issue_rate"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--storage", default=str(ROOT / ".sft"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model_dir = resolve_base_model(ModelSpec(), Path(args.storage) / "models").path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    suite = load_suite("sentiment", ROOT / "data_checks")
    results = [run_gate(synthetic_rows(n), tokenizer, suite) for n in args.rows]
    small, large = results[0], results[-1]
    ratio = large["rows"] / small["rows"]
    growth = (large["seconds"] / small["seconds"]) / ratio if len(results) > 1 else None
    gate_growth = (large["gate_seconds_without_tokenizer"] / small["gate_seconds_without_tokenizer"]) / ratio if len(results) > 1 else None
    print(json.dumps({"results": results, "growth_vs_linear": None if growth is None else round(growth, 3),
                      "gate_growth_vs_linear": None if gate_growth is None else round(gate_growth, 3)}, indent=2))


if __name__ == "__main__":
    main()
