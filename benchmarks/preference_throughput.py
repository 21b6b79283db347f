"""sft_dagster's reward-model and DPO training vs TRL's RewardTrainer and DPOTrainer, in one run.

Same model (SmolLM2-135M-Instruct, the embedded default, or `--tiny` for the test model), the same
preference pairs (`preference/demo_data.py`: the demo rankings expanded to pairs, one per prompt), the
same LoRA (r=16, alpha 32, dropout 0.05, all linear layers; the reward model's score head trained in
full by both), batch 8, the same number of optimizer steps (each pair seen once), lr 2e-4 linear, fp32
on CPU for both (TRL `bf16=False`: bf16 autocast is slower than fp32 on this CPU, BENCHMARKS.md).
DPO: beta 0.1, sigmoid loss, starting from the base model with a new adapter, the reference being the
base (the adapter switched off) for both; TRL runs at its default (reference forward every step) and
with `precompute_ref_log_probs=True` (what sft_dagster always does).

Each run is its own subprocess (peak RSS is its own). Tokens/s counts the non-padding tokens of both
sides of every trained pair (the same chat-template tokens for both trainers, although sft_dagster
computes the tokens the two sides share once) over the training time:
for sft_dagster's DPO the reference pass over the pairs is included (`tokens_per_second_with_reference`),
for TRL the whole `trainer.train()` call. `mean_train_loss` is the mean over the steps for both (TRL's
`training_loss`). TRL runs at its defaults otherwise, gradient checkpointing included (its configs
turn it on), which lowers its peak RSS and costs it a recomputed forward pass. Prints JSON with the
ratios, CPU and load average.

    .venv/bin/python benchmarks/preference_throughput.py --steps 20 --model-dir <converted SmolLM2 folder>
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def pair_frame(out: Path, n: int) -> pd.DataFrame:
    from sft_dagster.preference.demo_data import generate_preference_demo
    from sft_dagster.preference.pairs import pairs_from_rankings
    from sft_dagster.preference.rankings import read_candidates, read_rankings

    generate_preference_demo(out / "demo", n_prompts=max(120, n))
    pairs, _, _ = pairs_from_rankings(read_rankings(out / "demo" / "rankings.jsonl"),
                                      read_candidates(out / "demo" / "candidates.jsonl"))
    # One pair per prompt: sft_dagster trains the pairs of a prompt as one item, each distinct reply scored
    # once (work TRL repeats per pair); with one pair a prompt both trainers do the same work per step.
    pairs = pairs[~pairs["tie"].astype(bool)].drop_duplicates("prompt_id")
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} demo pairs, {n} needed")
    return pairs.sample(frac=1.0, random_state=0).head(n).reset_index(drop=True)


def spec(model_dir: str, steps: int):
    from sft_dagster.spec import PipelineSpec

    return PipelineSpec.model_validate({
        "name": "bench", "task": {"type": "instruction"}, "sources": [{"path": "unused"}],
        "model": {"base": model_dir, "max_length": 256},
        "training": {"precision": "fp32", "lora": LORA, "batch_size": 8, "max_steps": steps, "epochs": 1,
                     "learning_rate": 2e-4, "warmup_ratio": 0.0, "lr_scheduler": "linear",
                     "early_stopping_patience": None, "checkpoint_every_steps": 10_000, "eval_every_steps": 10_000},
    })


def pair_tokens(model_dir: str, pairs: pd.DataFrame, s) -> int:
    from transformers import AutoTokenizer

    from sft_dagster.preference.losses import encode_pairs

    encoded = encode_pairs(AutoTokenizer.from_pretrained(model_dir), pairs, s.task, s.model.max_length)
    return sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in encoded)


def run_ours(args, kind: str) -> dict:
    from sft_dagster.spec.preference import DPOConfig, RewardModelConfig
    from sft_dagster.training import train_dpo, train_reward_model

    pairs = pair_frame(Path(args.out), args.steps * 8)
    s = spec(args.model_dir, args.steps)
    out = Path(args.out) / f"ours_{kind}"
    val = pairs.head(8)  # one validation batch at the end (not timed)
    step_losses = []  # TRL's `training_loss` is the mean over the steps: the same here, not the last step's
    record = lambda metrics: step_losses.append(metrics["train_loss"])
    if kind == "rm":
        result = train_reward_model(s, RewardModelConfig(), Path(args.model_dir), pairs, val, out, device="cpu",
                                    log=lambda _: None, on_metrics=record)
    else:
        result = train_dpo(s, DPOConfig(beta=0.1), Path(args.model_dir), None, pairs, val, out, device="cpu",
                           log=lambda _: None, on_metrics=record)
    m = result.metrics
    seconds = m["seconds"] - m["validation_seconds"]
    reference = m.get("reference_seconds", 0.0)
    return {"trained_tokens": m["trained_tokens"], "steps": m["steps"], "seconds": round(seconds, 2),
            "reference_seconds": reference, "tokens_per_second": m["tokens_per_second"],
            "tokens_per_second_with_reference": round(m["trained_tokens"] / (seconds + reference), 1),
            "mean_train_loss": sum(step_losses) / len(step_losses), "last_step_train_loss": m["train_loss"]}


def run_trl(args, kind: str, precompute: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    pairs = pair_frame(Path(args.out), args.steps * 8)
    s = spec(args.model_dir, args.steps)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]}
        for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])])
    common = {"output_dir": str(Path(args.out) / f"trl_{kind}"), "per_device_train_batch_size": 8,
              "max_steps": args.steps, "learning_rate": 2e-4, "lr_scheduler_type": "linear", "warmup_steps": 0,
              "logging_steps": args.steps, "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0,
              "bf16": False, "dataloader_num_workers": 0, "max_length": s.model.max_length}
    if kind == "rm":
        from trl import RewardConfig, RewardTrainer

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, dtype=torch.float32,
                                                                   pad_token_id=pad)
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=data, processing_class=tokenizer,
                                peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules="all-linear", task_type="SEQ_CLS"))
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, precompute_ref_log_probs=precompute, **common),
                             train_dataset=data, processing_class=tokenizer,
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    tokens = pair_tokens(args.model_dir, pairs.head(trainer.state.global_step * 8), s)
    return {"trained_tokens": tokens, "steps": trainer.state.global_step, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1), "mean_train_loss": output.training_loss}


RUNS = {"ours_rm": lambda a: run_ours(a, "rm"), "trl_rm": lambda a: run_trl(a, "rm"),
        "ours_dpo": lambda a: run_ours(a, "dpo"), "trl_dpo": lambda a: run_trl(a, "dpo"),
        "trl_dpo_precompute": lambda a: run_trl(a, "dpo", precompute=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--tiny", action="store_true", help="the tiny random test model (tests/tiny_model.py)")
    parser.add_argument("--out", default=str(ROOT / ".sft" / "bench_preference"))
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.manual_seed(0)
        result = RUNS[args.child](args)
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print("RESULT " + json.dumps(result))
        return
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    Path(args.out).mkdir(parents=True)
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_model import build_tiny_model

        args.model_dir = str(build_tiny_model(Path(args.out) / "tiny_model"))
    elif args.model_dir is None:
        from sft_dagster.models import resolve_base_model
        from sft_dagster.spec import ModelSpec

        args.model_dir = str(resolve_base_model(ModelSpec(), ROOT / ".sft" / "models").path)
    from train_throughput import run_child  # benchmarks/, on sys.path when run as a script

    from sft_dagster.training.precision import machine_key

    conditions = {"machine": machine_key("cpu"), "load_average_before": os.getloadavg(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results = {}
    for name in args.runs:
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--model-dir", args.model_dir,
               "--out", args.out]
        results[name] = run_child(name, cmd)
    conditions["load_average_after"] = os.getloadavg()
    conditions["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def ratio(a: str, b: str, key_a: str = "tokens_per_second") -> dict:
        return {"tokens_per_second_ratio": round(results[a][key_a] / results[b]["tokens_per_second"], 2),
                "peak_rss_ratio": round(results[a]["peak_rss_mib"] / results[b]["peak_rss_mib"], 2)}

    pairs = [("ours_rm", "trl_rm", "tokens_per_second"),
             ("ours_dpo", "trl_dpo", "tokens_per_second_with_reference"),
             ("ours_dpo", "trl_dpo_precompute", "tokens_per_second_with_reference")]
    report = {"conditions": conditions, "model": Path(args.model_dir).name, "steps": args.steps, "batch_size": 8,
              "results": results,
              **{f"{a}_vs_{b}": ratio(a, b, k) for a, b, k in pairs if a in results and b in results}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
