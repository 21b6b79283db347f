"""End to end: does gating noisy labels train a better model? keep vs drop vs relabel on Banking77.

For each seed: the Banking77 training rows of a few confusable intents get instance-dependent noise
(`sft_dagster.quality.noise.confusion_flips`: each drawn row is flipped to the intent a TF-IDF
classifier trained on the other folds confuses it with); `find_label_issues` runs on the noisy rows;
`curation.curate` applies each `quality.policy.label_issues` (keep / drop / relabel); a LoRA adapter on
the embedded SmolLM2-135M-Instruct is trained on the curated train split with
`sft_dagster.training.train`, and scored with `sft_dagster.evaluation.score_model` on Banking77's
untouched test rows of the same intents (clean labels). The same noisy data, split and training
seed feed every policy of a seed.

Training budget: 24 steps at lr 5e-4 (the first default) left the model at chance on these four
intents (seed 0, `keep`: accuracy 0.275, macro-F1 0.156; 2026-11-26), so no policy could show a
difference; 48 steps at lr 1e-3 (about one epoch of the curated rows) learns them (`keep` 0.731).

    .venv/bin/python benchmarks/gated_training.py --seeds 0 1 2 --out benchmarks/results/gated_training.json
    .venv/bin/python benchmarks/gated_training.py --data-only --seeds 0 1 2   # the curation side only (minutes)

Prints one JSON document (per run and per policy: mean, spread, and the margin over `keep` per seed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sft_dagster import curation, evaluation
from sft_dagster.models import resolve_base_model
from sft_dagster.quality import find_label_issues
from sft_dagster.quality.label_issues import out_of_fold_probabilities, text_features
from sft_dagster.quality.noise import confusion_flips
from sft_dagster.spec import ModelSpec, parse_spec
from sft_dagster.training import train
from sft_dagster.torchkit import pick_device

from label_issue_quality import labelled_frame, write  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "banking77"
# Two pairs of intents that annotators (and classifiers) confuse.
INTENTS = ["card_arrival", "card_delivery_estimate", "card_not_working", "card_swallowed"]


def make_spec(intents: list[str], args, seed: int, policy: str):
    return parse_spec({
        "name": "gated", "task": {"type": "classification", "labels": intents, "system": "You label bank messages.",
                                  "prompt_template": "Which banking intent is this message? One of: "
                                  + ", ".join(intents) + ". Message: {prompt}"},
        "sources": [{"path": "unused.jsonl"}],
        "quality": {"cleanlab": {"features": args.features, "ensemble": args.ensemble},
                    "policy": {"label_issues": policy, "relabel_min_confidence": args.relabel_min_confidence}},
        "splits": {"validation": 0.1, "test": 0.05, "seed": seed},
        "model": {"max_length": args.max_length},
        "training": {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": 8, "learning_rate": args.lr,
                     "seed": seed, "early_stopping_patience": None, "checkpoint_every_steps": 10_000},
        "evaluation": {"max_new_tokens": 8, "batch_size": 32, "max_examples": args.test_rows},
    })


def run_seed(seed: int, args, model_dir: Path, train_rows: pd.DataFrame, test_rows: pd.DataFrame, intents: list[str]) -> dict:
    clean = train_rows["category"].to_numpy()
    codes = np.searchsorted(intents, clean)
    sparse, _ = text_features(train_rows["text"], seed)
    generator, _ = out_of_fold_probabilities(sparse, clean, 5, seed + 100)
    noisy = np.array(intents)[confusion_flips(codes, generator, args.noise, seed)]
    frame = labelled_frame(train_rows["text"], noisy, "banking77/train.csv", np.arange(2, len(noisy) + 2))
    truth = dict(zip(frame["example_id"], clean))
    test = labelled_frame(test_rows["text"], test_rows["category"].to_numpy(), "banking77/test.csv",
                          np.arange(2, len(test_rows) + 2))

    base_spec = make_spec(intents, args, seed, "keep")
    t = time.perf_counter()
    report = find_label_issues(frame, base_spec.task, base_spec.quality.cleanlab, seed=seed)
    gate_seconds = time.perf_counter() - t
    wrong = frame["response"].to_numpy() != clean
    flagged = report.flags["is_label_issue"].to_numpy()
    out = {"seed": seed, "rows": len(frame), "noisy_rows": int(wrong.sum()), "flagged": int(flagged.sum()),
           "flag_precision": round(float((flagged & wrong).sum() / max(1, flagged.sum())), 4),
           "flag_recall": round(float((flagged & wrong).sum() / max(1, wrong.sum())), 4),
           "gate_seconds": round(gate_seconds, 1), "policies": {}}
    for policy in args.policies:
        spec = make_spec(intents, args, seed, policy)
        curated, quarantined, stats = curation.curate(frame, {}, report.flags, spec.quality.policy, spec.splits)
        tr = curated[curated["split"] == "train"].reset_index(drop=True)
        va = curated[curated["split"] == "validation"].reset_index(drop=True)
        still_wrong = int((tr["response"].to_numpy() != tr["example_id"].map(truth).to_numpy()).sum())
        if args.data_only:
            out["policies"][policy] = {"train_rows": len(tr), "train_rows_wrong": still_wrong,
                                       "relabelled": stats["relabelled"], "quarantined": stats["rows_quarantined"]}
            print(json.dumps({"seed": seed, "policy": policy, **out["policies"][policy]}), flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            result = train(spec, model_dir, tr, va, Path(tmp), log=lambda _m: None)
            train_seconds = time.perf_counter() - t
            scores = score(spec, model_dir, result.adapter_dir, test)
        out["policies"][policy] = {
            "train_rows": len(tr), "train_rows_wrong": still_wrong, "relabelled": stats["relabelled"],
            "quarantined": stats["rows_quarantined"], "accuracy": round(scores.metrics["accuracy"], 4),
            "macro_f1": round(scores.metrics["macro_f1"], 4), "invalid_rate": round(scores.metrics["invalid_rate"], 4),
            "test_loss": round(scores.loss, 4), "steps": result.metrics["steps"], "train_seconds": round(train_seconds, 1)}
        print(json.dumps({"seed": seed, "policy": policy, **out["policies"][policy]}), flush=True)
    return out


def score(spec, model_dir: Path, adapter_dir: Path, test: pd.DataFrame):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device("auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(device).eval()
    return evaluation.score_model(model, tokenizer, evaluation.test_rows(test, spec), spec, device)


def summarise(runs: list[dict], policies: list[str]) -> dict:
    out = {}
    for policy in policies:
        if "accuracy" not in runs[0]["policies"][policy]:  # --data-only
            wrong = [r["policies"][policy]["train_rows_wrong"] / max(1, r["policies"][policy]["train_rows"]) for r in runs]
            out[policy] = {"train_label_error_rate_per_seed": np.round(wrong, 4).tolist()}
            continue
        acc = np.array([r["policies"][policy]["accuracy"] for r in runs])
        out[policy] = {"accuracy_mean": round(float(acc.mean()), 4), "accuracy_std": round(float(acc.std(ddof=1)), 4) if len(acc) > 1 else None,
                       "accuracy_per_seed": acc.tolist()}
        if policy != "keep" and "keep" in policies:
            margin = acc - np.array([r["policies"]["keep"]["accuracy"] for r in runs])
            out[policy] |= {"margin_over_keep_per_seed": np.round(margin, 4).tolist(),
                            "margin_over_keep_mean": round(float(margin.mean()), 4),
                            "margin_over_keep_min": round(float(margin.min()), 4),
                            "margin_over_keep_max": round(float(margin.max()), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--intents", nargs="+", default=INTENTS)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--policies", nargs="+", default=["keep", "drop", "relabel"])
    parser.add_argument("--features", default="ensemble")
    parser.add_argument("--ensemble", nargs="+", default=["tfidf", "embeddings"])
    parser.add_argument("--relabel-min-confidence", type=float, default=0.8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=48, help="optimizer steps of 8 rows (CPU time)")
    parser.add_argument("--test-rows", type=int, default=160, help="clean test rows scored (a fixed subset)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--storage", type=Path, default=ROOT / ".sft")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--data-only", action="store_true", help="gate and curate only: wrong labels left per policy")
    parser.add_argument("--model-dir", type=Path, help="a model directory instead of the embedded SmolLM2 (smoke runs)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    intents = sorted(args.intents)
    train_all, test_all = pd.read_csv(args.data / "train.csv"), pd.read_csv(args.data / "test.csv")
    train_rows = train_all[train_all["category"].isin(intents)].reset_index(drop=True)
    test_rows = test_all[test_all["category"].isin(intents)].reset_index(drop=True)
    model_dir = args.model_dir or resolve_base_model(ModelSpec(), args.storage / "models").path
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs: list = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args, model_dir, train_rows, test_rows, intents))
        # Written after every seed: a run of ~10 minutes per seed that is stopped keeps what it measured.
        result = {"started": started, "intents": intents, "noise": args.noise, "features": args.features,
                  "ensemble": args.ensemble, "relabel_min_confidence": args.relabel_min_confidence,
                  "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr,
                  "test_rows": min(args.test_rows, len(test_rows)), 
                  "runs": runs, "summary": summarise(runs, args.policies)}
        text = write(result, args.out)
    print(text)


if __name__ == "__main__":
    main()
