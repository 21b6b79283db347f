"""Does the trainer's length-grouped batch order cost DPO quality? The same DPO run with our batches
(`trainer.length_grouped_batches`: shuffled, sorted by length within windows of 50 batches) and with
batches drawn at random (as TRL samples), on the preference demo's pairs: mean train loss over the
steps, final validation loss and reward accuracy on held-out pairs, tokens/s. One process per order.

    .venv/bin/python benchmarks/pair_batch_order.py --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def random_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def run(args) -> dict:
    import preference_throughput as bench

    from sft_dagster.spec.preference import DPOConfig
    from sft_dagster.training import train_dpo, trainer

    if args.child == "random":  # the shared loop looks the batch order up in its module
        trainer.length_grouped_batches = random_batches
    frame = bench.pair_frame(Path(args.out), args.train + args.val)
    train, val = frame.iloc[: args.train], frame.iloc[args.train : args.train + args.val]
    spec = bench.spec(args.model_dir, args.steps)
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"seed": args.seed})})
    history = []
    result = train_dpo(spec, DPOConfig(beta=0.1), Path(args.model_dir), None, train, val,
                       Path(args.out) / f"dpo_{args.child}_{args.seed}", device="cpu", log=lambda _: None,
                       on_metrics=history.append)
    m = result.metrics
    return {"order": args.child, "seed": args.seed, "train_pairs": len(train), "val_pairs": len(val),
            "steps": m["steps"], "mean_train_loss": round(sum(h["train_loss"] for h in history) / len(history), 4),
            "val_loss": round(m["val_loss"], 4), "val_accuracy": m.get("val_accuracy"),
            "tokens_per_second": m["tokens_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--out", default=str(ROOT / ".sft" / "bench_pair_order"))
    parser.add_argument("--child", choices=["length", "random"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_dir is None:
        from sft_dagster.models import resolve_base_model
        from sft_dagster.spec import ModelSpec

        args.model_dir = str(resolve_base_model(ModelSpec(), ROOT / ".sft" / "models").path)
    if args.child:
        print(json.dumps(run(args)))
        return
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)  # each run trains from scratch
    results = []
    for order in ("length", "random"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", order, "--seed", str(args.seed), "--steps", str(args.steps),
               "--train", str(args.train), "--val", str(args.val), "--model-dir", args.model_dir, "--out", args.out]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
