"""Do the response-quality findings catch bad responses? Planted noise on real data, per kind.

For each data set of `generation_data.py` (Multi30k en->fr, DialogSum, GSM8K) a share `--rate` of the
rows gets each noise kind (misaligned, wrong language, copied prompt, truncated; disjoint rows);
`sft_dagster.quality.response_issues.find_response_issues` runs on the noisy rows with the embedded
SmolLM2-135M-Instruct as the base model of the fit score. Per kind: rows planted, recall (the row is
flagged), recall by the finding named for that kind, and AUROC of the ranking score (planted rows of
that kind against clean rows). Overall, on the kinds the issue targets (misaligned, wrong_language,
copy): precision of the flags (a flagged row that was planted any kind), recall, and the best recall
at precision >= 0.80 down the ranking. Clean rows of real data can be bad too (a flag on one counts as
a false positive here). Cost: seconds per 1,000 rows, with the model load apart; the fit-loss cache is
shared by a task's seeds, so the first seed's figure is the cold one (`fit_rows_scored` says how many
rows each run scored).

    .venv/bin/python benchmarks/response_findings.py --out benchmarks/results/response_findings.json
    .venv/bin/python benchmarks/response_findings.py --tasks translation --rate 0.05 --seeds 0 1

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_data import NOISE, SHARED, TASKS, noisy_examples, write_report  # noqa: E402

from sft_dagster.models import resolve_base_model  # noqa: E402
from sft_dagster.quality.response_issues import find_response_issues  # noqa: E402
from sft_dagster.spec import ModelSpec, parse_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_KINDS = ("misaligned", "wrong_language", "copy")


def make_spec(task: str, quality: dict | None = None):
    return parse_spec({"name": f"bench_{task}", "task": TASKS[task], "sources": [{"path": "unused.jsonl"}],
                       "quality": quality or {}, "model": {"max_length": 1024}})


def _auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(positive, score)), 4) if 0 < positive.sum() < len(positive) else None


def recall_at_precision(positive: np.ndarray, score: np.ndarray, precision: float) -> float:
    """The largest share of positives found reviewing rows by descending score while precision >= the bound."""
    order = np.argsort(-score, kind="stable")
    hits = np.cumsum(positive[order])
    ok = np.flatnonzero(hits / np.arange(1, len(order) + 1) >= precision)
    return round(float(hits[ok.max()] / max(1, positive.sum())), 4) if len(ok) else 0.0


def measure(flags: pd.DataFrame, planted: pd.Series) -> dict:
    flagged = flags["is_response_issue"].to_numpy(dtype=bool)
    score = flags["response_issue_score"].astype(float).fillna(0.0).to_numpy()
    types = flags["response_issue_types"].fillna("").astype(str)
    kinds = planted.to_numpy()
    clean = kinds == ""
    out: dict = {"rows": len(flags), "flagged": int(flagged.sum()), "clean_rows_flagged": int((flagged & clean).sum()),
                 "kinds": {}}
    for kind in sorted(set(kinds) - {""}):
        rows = kinds == kind
        named = types.str.split(",").map(lambda t, k=kind: k in t).to_numpy(dtype=bool)
        out["kinds"][kind] = {"planted": int(rows.sum()), "recall": round(float(flagged[rows].mean()), 4),
                              "recall_by_its_finding": round(float((flagged & named)[rows].mean()), 4),
                              "auroc": _auroc(rows[rows | clean], score[rows | clean])}
    target = np.isin(kinds, TARGET_KINDS)
    considered = target | clean  # truncated rows are left out of the target figures, not counted as clean
    pos, sc, fl = target[considered], score[considered], flagged[considered]
    out["target_kinds"] = {"kinds": [k for k in TARGET_KINDS if (kinds == k).any()],
                           "precision": round(float(pos[fl].mean()), 4) if fl.any() else None,
                           "recall": round(float(fl[pos].mean()), 4) if pos.any() else None,
                           "auroc": _auroc(pos, sc), "recall_at_precision_0.80": recall_at_precision(pos, sc, 0.80)}
    found_by = types[flagged].str.split(",").explode().value_counts()
    out["flags_by_finding"] = {str(k): int(v) for k, v in found_by.items() if k}
    return out


def run(task: str, seed: int, args, model_dir: Path, cache: Path) -> dict:
    """One task and seed; `cache` is the task's fit-loss cache, shared by its seeds (a later seed scores
    only the rows the earlier ones did not: its planted rows), so the cost figure is the first seed's."""
    examples, planted, _ = noisy_examples(task, args.rate, seed, args.data, args.limit)
    spec = make_spec(task)
    start = time.perf_counter()
    flags = find_response_issues(examples, spec.task, spec.quality.response, model_dir=model_dir, cache_dir=cache)
    seconds = time.perf_counter() - start
    result = measure(flags.set_index(flags["example_id"]).loc[examples["example_id"]].reset_index(drop=True), planted)
    scored = flags.attrs.get("summary", {}).get("findings", {}).get("misaligned", {}).get("cost", {}).get("rows_scored")
    result |= {"task": task, "seed": seed, "rate_per_kind": args.rate, "seconds": round(seconds, 1),
               "seconds_per_1000_rows": round(1000 * seconds / len(examples), 1), "fit_rows_scored": scored,
               "load_average": round(os.getloadavg()[0], 2)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(NOISE))
    parser.add_argument("--rate", type=float, default=0.05, help="share of rows per noise kind")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each data set")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--storage", type=Path, default=ROOT / ".sft")
    parser.add_argument("--model-dir", type=Path, help="a model directory instead of the embedded SmolLM2")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the fit-loss caches here (<dir>/<task>), to reuse across runs (default: a fresh one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    model_dir = args.model_dir or resolve_base_model(ModelSpec(), args.storage / "models").path
    load = time.perf_counter() - start
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs = []
    for task in args.tasks:
        with tempfile.TemporaryDirectory() as fresh:
            cache = args.cache / task if args.cache else Path(fresh)
            runs += [run(task, seed, args, model_dir, cache) for seed in args.seeds]
    print(write_report(args.out, {"started": started, "model_resolve_seconds": round(load, 1), "runs": runs}))


if __name__ == "__main__":
    main()
