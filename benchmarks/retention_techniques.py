"""Forgetting and overfitting on the demo task: plain LoRA vs LoRA + distillation / replay / NEFTune.

Issue #12 asks for two measurements on the demo, each in one run on one machine:

* **Forgetting**: the demo sentiment task trained with plain LoRA, with LoRA + distillation (KL to
  the frozen base model on general replay prompts, `training.distillation`) and with LoRA + plain
  replay (`training.replay`), at the same steps; each scored on the task's test split (accuracy) and
  on the retention prompts (share of the general prompts the base model answers right that the tuned
  model gets wrong; reference-answer NLL).
* **NEFTune at a small training size**: the same task trained on few rows with and without noise on
  the input embeddings (`training.neftune_alpha`), scored on the test split.

The data is the demo's (`sft-dagster demo-data`, written into a temporary folder), taken through the
pipeline's own pure stages (ingest, cleanlab with TF-IDF, curation with the demo's policy, splits), so
the train/test rows are the demo's. The base model's scores are computed once and reused by every
variant (the evaluation's score cache). Each variant prints one JSON line as it finishes.

    .venv/bin/python benchmarks/retention_techniques.py --out benchmarks/results/retention_techniques.json

`--model-dir` runs it on another model directory (smoke runs on the tiny test model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from sft_dagster import curation, evaluation
from sft_dagster.demo_data import generate_demo_dataset
from sft_dagster.ingest import ingest
from sft_dagster.labels import apply_corrections, empty_corrections
from sft_dagster.models import resolve_base_model
from sft_dagster.quality import find_label_issues
from sft_dagster.spec import ModelSpec, load_spec
from sft_dagster.training import train

ROOT = Path(__file__).resolve().parents[1]

# variant name -> training overrides (on top of the demo spec's `training:` and the run's steps)
FORGETTING = {
    "lora": {},
    "lora+distillation": {"distillation": {"weight": 1.0}},
    "lora+replay": {"replay": {"ratio": 0.2}},
}
NEFTUNE = {"small": {}, "small+neftune": {"neftune_alpha": 5.0}}


def demo_splits(tmp: Path, seed: int) -> tuple:
    """The demo spec (copied next to a fresh copy of its data) and its curated splits."""
    (tmp / "assets").mkdir(parents=True)
    shutil.copy(ROOT / "assets" / "demo_sentiment.yaml", tmp / "assets" / "demo_sentiment.yaml")
    generate_demo_dataset(tmp / "data" / "demo_sentiment", seed=seed)
    spec = load_spec(tmp / "assets" / "demo_sentiment.yaml")
    examples, _, _ = ingest(spec)
    examples, _, _ = apply_corrections(examples, empty_corrections(), spec.task.labels)
    report = find_label_issues(examples, spec.task, spec.quality.cleanlab, seed=spec.splits.seed)
    curated, _, _ = curation.curate(examples, {}, report.flags, spec.quality.policy, spec.splits)
    return spec, curated


def with_training(spec, steps: int, overrides: dict, retention: int):
    training = spec.training.model_dump() | {"max_steps": steps, "early_stopping_patience": None,
                                             "checkpoint_every_steps": 10_000}
    for key, value in overrides.items():
        training[key] = (training[key] | value) if isinstance(value, dict) else value
    return spec.model_copy(update={
        "training": type(spec.training).model_validate(training),
        "evaluation": spec.evaluation.model_copy(update={"few_shot_k": 0, "retention_examples": retention,
                                                         "num_samples": 0})})


def run_variant(name: str, spec, model_dir: Path, train_df: pd.DataFrame, val_df: pd.DataFrame, test_df: pd.DataFrame,
                work: Path, cache_dir: Path) -> dict:
    out_dir = work / name.replace("+", "_")
    t = time.perf_counter()
    result = train(spec, model_dir, train_df, val_df, out_dir, log=lambda _m: None, teacher_cache=work / "teacher")
    train_seconds = time.perf_counter() - t
    t = time.perf_counter()
    report = evaluation.evaluate(spec, model_dir, result.adapter_dir, test_df, adapter_id=None, cache_dir=cache_dir,
                                 cache_key={"model": str(model_dir)}, train=train_df)
    row = {"variant": name, "train_rows": len(train_df), "steps": result.metrics["steps"],
           "trained_tokens": result.metrics.get("trained_tokens"), "tokens_per_second": result.metrics.get("tokens_per_second"), "train_seconds": round(train_seconds, 1),
           "eval_seconds": round(time.perf_counter() - t, 1), "base_accuracy": round(report["base"]["accuracy"], 4),
           "accuracy": round(report["tuned"]["accuracy"], 4), "test_loss": round(report["tuned"]["loss"], 4),
           "training": evaluation.training_summary(result.metrics)}
    if retention := report.get("retention"):
        tuned, base = retention["models"]["tuned"], retention["models"]["base"]
        row |= {"retention_n": retention["n"], "base_right": retention["base_right"],
                "retention_accuracy": round(tuned["accuracy"], 4), "base_retention_accuracy": round(base["accuracy"], 4),
                "forgetting": round(tuned["forgetting"], 4), "reference_nll": round(tuned["reference_nll"], 4),
                "base_reference_nll": round(base["reference_nll"], 4)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the forgetting variants (8 rows each)")
    parser.add_argument("--small-rows", type=int, default=48, help="train rows of the NEFTune comparison")
    parser.add_argument("--small-epochs", type=float, default=3.0)
    parser.add_argument("--retention", type=int, default=200, help="retention prompts scored")
    parser.add_argument("--variants", nargs="+", default=[*FORGETTING, *NEFTUNE])
    parser.add_argument("--seed", type=int, default=0, help="the demo data's seed")
    parser.add_argument("--model-dir", type=Path, help="a model directory instead of the embedded SmolLM2")
    parser.add_argument("--storage", type=Path, default=ROOT / ".sft")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = args.model_dir or resolve_base_model(ModelSpec(), args.storage / "models").path
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec, curated = demo_splits(Path(tmp), args.seed)
        split = {name: curated[curated["split"] == name].reset_index(drop=True) for name in ("train", "validation", "test")}
        cache_dir = Path(tmp) / "scores"
        for name in args.variants:
            if name in FORGETTING:
                variant = with_training(spec, args.steps, FORGETTING[name], args.retention)
                train_df = split["train"]
            else:
                variant = with_training(spec, 10_000, NEFTUNE[name] | {"epochs": args.small_epochs}, 0)
                train_df = split["train"].sample(n=min(args.small_rows, len(split["train"])), random_state=args.seed)
            rows.append(run_variant(name, variant, model_dir, train_df, split["validation"], split["test"],
                                    Path(tmp) / "runs", cache_dir))
    result = {"started": started, "steps": args.steps, "small_rows": args.small_rows, "small_epochs": args.small_epochs,
              "retention_prompts": args.retention, "model_dir": str(model_dir), "runs": rows}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
