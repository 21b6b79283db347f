"""End to end on generation data: does gating bad responses train a better model? keep vs drop.

For each task (translation: Multi30k en->fr; summarization: DialogSum) and seed: `--rate` of the rows
get each planted noise kind of `generation_data.py`; `find_response_issues` runs on the noisy rows
(the embedded SmolLM2-135M-Instruct as the fit score's base model); `curation.curate` applies
`quality.policy.response_issues` keep / drop; a LoRA adapter on the embedded model is trained on the
curated train split with `sft_dagster.training.train` (same steps, seed and learning rate for both
policies), and scored with `evaluation.score_model` on the test split's rows **with their clean
responses** (the planted noise of a test row is undone before scoring). The report per run: the
task's primary metric and ROUGE-L / chrF, each with its paired bootstrap 95% interval, and the
drop-minus-keep difference with its interval on the same test rows.

    .venv/bin/python benchmarks/gated_generation.py --seeds 0 1 --out benchmarks/results/gated_generation.json
    .venv/bin/python benchmarks/gated_generation.py --tasks translation --seeds 0 --max-steps 10 --test-rows 20  # smoke

Prints one JSON document (written after every run, so a stopped run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_data import SHARED, TASKS, noisy_examples, write_report  # noqa: E402

from sft_dagster import curation, evaluation, metrics  # noqa: E402
from sft_dagster.models import resolve_base_model  # noqa: E402
from sft_dagster.quality.response_issues import find_response_issues  # noqa: E402
from sft_dagster.spec import ModelSpec, parse_spec  # noqa: E402
from sft_dagster.training import train  # noqa: E402
from sft_dagster.training.trainer import pick_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # per task: model.max_length, batch size, evaluation.max_new_tokens, the metrics shown
    "translation": {"max_length": 160, "batch_size": 8, "max_new_tokens": 48, "metrics": ["chrf", "bleu", "rougeL"]},
    "summarization": {"max_length": 640, "batch_size": 4, "max_new_tokens": 72, "metrics": ["rougeLsum", "rougeL", "chrf"]},
}


def make_spec(task: str, args, seed: int, policy: str):
    s = SETTINGS[task]
    return parse_spec({
        "name": f"gated_{task}", "task": TASKS[task], "sources": [{"path": "unused.jsonl"}],
        "quality": {"policy": {"response_issues": policy, "near_duplicates": "keep"}},
        "splits": {"validation": 0.05, "test": args.test_share, "seed": seed},
        "model": {"max_length": s["max_length"]},
        "training": {"epochs": 1, "max_steps": args.max_steps, "batch_size": s["batch_size"], "learning_rate": args.lr,
                     "seed": seed, "early_stopping_patience": None, "checkpoint_every_steps": 10_000},
        "evaluation": {"max_new_tokens": s["max_new_tokens"], "batch_size": 16, "max_examples": args.test_rows,
                       "few_shot_k": 0, "retention_examples": 0},
    })


def score(spec, model_dir: Path, adapter_dir: Path, test: pd.DataFrame):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device("auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(device).eval()
    rows = evaluation.test_rows(test, spec)
    scores = evaluation.score_model(model, tokenizer, rows, spec, device)
    return rows, scores, metrics.statistics(evaluation.metric_rows(rows, scores, spec))


def too_long(examples: pd.DataFrame, spec, model_dir: Path) -> pd.Series:
    """Rows the pipeline's suite would quarantine before training: over `model.max_length` tokens as
    training encodes them (`formatting.encode_example`)."""
    from transformers import AutoTokenizer

    from sft_dagster.formatting import build_messages, encode_example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return pd.Series([encode_example(tokenizer, build_messages(p, r, None, spec.task), 10**9).input_ids.__len__()
                      > spec.model.max_length for p, r in zip(examples["prompt"], examples["response"])],
                     index=examples.index)


def run(task: str, seed: int, args, model_dir: Path) -> dict:
    examples, planted, clean = noisy_examples(task, args.rate, seed, args.data, args.limit)
    clean_response = dict(zip(examples["example_id"], clean["response"]))
    spec = make_spec(task, args, seed, "keep")
    long_rows = too_long(examples, spec, model_dir)
    examples, planted, clean = examples[~long_rows], planted[~long_rows], clean[~long_rows]
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as fresh:
        cache = args.cache / task if args.cache else Path(fresh)
        flags = find_response_issues(examples, spec.task, spec.quality.response, model_dir=model_dir, cache_dir=cache)
    gate_seconds = time.perf_counter() - t
    bad = planted.to_numpy() != ""
    flagged = flags.set_index("example_id").loc[examples["example_id"], "is_response_issue"].to_numpy(dtype=bool)
    out = {"task": task, "seed": seed, "rows": len(examples), "rows_over_max_length": int(long_rows.sum()),
           "planted_rows": int(bad.sum()),
           "flagged": int(flagged.sum()), "flag_precision": round(float((flagged & bad).sum() / max(1, flagged.sum())), 4),
           "flag_recall": round(float((flagged & bad).sum() / max(1, bad.sum())), 4),
           "gate_seconds": round(gate_seconds, 1), "policies": {}}
    planted_of = dict(zip(examples["example_id"], planted))
    stats = {}
    for policy in args.policies:
        spec = make_spec(task, args, seed, policy)
        curated, quarantined, cstats = curation.curate(examples, {}, flags, spec.quality.policy, spec.splits, label_task=False)
        assert cstats["rows_in"] == cstats["rows_kept"] + cstats["rows_quarantined"]
        tr = curated[curated["split"] == "train"].reset_index(drop=True)
        va = curated[curated["split"] == "validation"].reset_index(drop=True)
        test = curated[curated["split"] == "test"].copy()
        test["response"] = test["example_id"].map(clean_response)  # scored against the clean responses
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            result = train(spec, model_dir, tr, va, Path(tmp), log=lambda _m: None)
            train_seconds = time.perf_counter() - t
            t = time.perf_counter()
            rows, scores, stats[policy] = score(spec, model_dir, result.adapter_dir, test.reset_index(drop=True))
            eval_seconds = time.perf_counter() - t
        out["policies"][policy] = {
            "train_rows": len(tr), "train_rows_planted_bad": int(tr["example_id"].map(planted_of).ne("").sum()),
            "quarantined": cstats["rows_quarantined"], "test_rows": len(rows),
            **{m: round(scores.metrics[m], 4) for m in SETTINGS[task]["metrics"] if m in scores.metrics},
            "test_loss": round(scores.loss, 4), "steps": result.metrics["steps"],
            "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1)}
        print(json.dumps({"task": task, "seed": seed, "policy": policy, **out["policies"][policy]}), flush=True)
    shown = {p: {m: s for m, s in st.items() if m in SETTINGS[task]["metrics"]} for p, st in stats.items()}
    differences = {"drop_minus_keep": ("drop", "keep")} if {"drop", "keep"} <= set(shown) else {}
    out["intervals"] = metrics.paired_intervals(shown, differences)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--policies", nargs="+", default=["keep", "drop"])
    parser.add_argument("--rate", type=float, default=0.05, help="share of rows per noise kind")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each data set")
    parser.add_argument("--test-share", type=float, default=0.2)
    parser.add_argument("--test-rows", type=int, default=150, help="clean test rows scored (a fixed subset)")
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--storage", type=Path, default=ROOT / ".sft")
    parser.add_argument("--model-dir", type=Path, help="a model directory instead of the embedded SmolLM2")
    parser.add_argument("--cache", type=Path, default=None,
                        help="fit-loss caches (<dir>/<task>) shared with benchmarks/response_findings.py")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = args.model_dir or resolve_base_model(ModelSpec(), args.storage / "models").path
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs = []
    for task in args.tasks:
        for seed in args.seeds:
            runs.append(run(task, seed, args, model_dir))
            text = write_report(args.out, {"started": started, "args": {k: str(v) for k, v in vars(args).items()},
                                           "runs": runs})
    print(text)


if __name__ == "__main__":
    main()
