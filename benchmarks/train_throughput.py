"""sft_dagster's trainer vs TRL's SFTTrainer: same model, data, LoRA, batch size and optimizer steps.

Each trainer runs in its own subprocess (so peak RSS is its own), on SmolLM2-135M-Instruct (the
embedded default) with LoRA r=16 on all linear layers, the same examples (Banking77 intents from
../shared/datasets when present, else the demo reviews), batch 8, the same number of optimizer steps.
sft_dagster runs at `precision: auto` (it measures which precision is faster here, with a fresh probe
cache under --out, and the report says what it chose and why); `--precisions fp32 bf16` adds runs
forced to those. TRL runs at its defaults (prompt-completion data, completion-only loss, no packing,
and bf16 autocast: its default even on CPU) and on CPU once more in fp32; `--packing` adds both
trainers' packing modes as further runs, `--qlora` a QLoRA run of sft_dagster's trainer.
`--trl-default-steps N` runs TRL's bf16 default for N steps only (its tokens/s is still a rate; its
validation loss is then not comparable): for CPUs where bf16 is emulated and 30 steps take an hour.
Prints JSON: trained (non-padding) tokens/s, peak RSS, final validation loss (the same
response-token loss for all), the ratios, tokens/s as a fraction of the measured fp32 and bf16 matmul
rates of this machine, the CPU's model and bf16-relevant flags, and the load average before and after
(other work on the machine). Validation passes are not counted in either trainer's time.
`--device cuda` runs both on the GPU in bf16 (autocast for sft_dagster, `bf16=True` for TRL) and adds
peak GPU memory and MFU (tokens/s x FLOPs per token over the measured bf16 matmul rate of the GPU).

    .venv/bin/python benchmarks/train_throughput.py --steps 30 --packing --qlora --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BANKING = ROOT.parent / "shared" / "datasets" / "banking77" / "train.csv"
PROMPT = "Which banking intent is this customer message? Answer with the intent name.\n\nMessage: {prompt}"


def demo_reviews() -> pd.DataFrame:
    """The demo data set (`make demo`'s) through the project's own ingest: unreadable rows are quarantined."""
    import yaml

    from sft_dagster.demo_data import generate_demo_dataset
    from sft_dagster.ingest import ingest
    from sft_dagster.spec import load_spec

    out = ROOT / ".sft" / "bench_demo"
    generate_demo_dataset(out)
    spec_file = out / "bench_spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "bench_demo", "task": {"type": "sentiment", "labels": ["negative", "neutral", "positive"]},
        "sources": [{"path": "*.jsonl", "columns": {"prompt": "text", "response": "label"}},
                    {"path": "*.csv", "columns": {"prompt": "review_text", "response": "sentiment"}}],
        "model": {"base": "unused"}}))
    examples, _, _ = ingest(load_spec(spec_file))
    return examples


def dataset(n_train: int, n_val: int) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    if BANKING.exists():
        raw = pd.read_csv(BANKING).sample(frac=1.0, random_state=0)
        df = pd.DataFrame({"prompt": raw["text"], "response": raw["category"]})
        source = "banking77"
    else:  # the demo reviews, read as the pipeline reads them (its files hold deliberately broken rows)
        df = demo_reviews()[["prompt", "response"]].sample(frac=1.0, random_state=0)
        source = "demo reviews"
    df = df.assign(example_id=[f"e{i}" for i in range(len(df))], system=None).reset_index(drop=True)
    return df.iloc[:n_train], df.iloc[n_train : n_train + n_val], source


def spec(model_dir: str, steps: int, labels: list[str], method: str = "lora", packing: bool = False,
         precision: str = "auto"):
    from sft_dagster.spec import PipelineSpec

    return PipelineSpec.model_validate({
        "name": "bench", "task": {"type": "classification", "labels": labels, "prompt_template": PROMPT},
        "sources": [{"path": "unused"}], "model": {"base": model_dir, "max_length": 256},
        "training": {"method": method, "packing": packing, "precision": precision, "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
                     "batch_size": 8, "max_steps": steps, "epochs": 100, "learning_rate": 2e-4, "warmup_ratio": 0.0,
                     "lr_scheduler": "linear", "early_stopping_patience": None, "checkpoint_every_steps": 10_000,
                     "eval_every_steps": steps},
    })


def val_loss(model, tokenizer, s, val: pd.DataFrame) -> float:
    from sft_dagster.evaluation import response_loss

    return response_loss(model.eval(), tokenizer, val, s.task, s.model.max_length, 16, str(model.device))


def run_ours(args, method: str = "lora", packing: bool = False, precision: str = "auto") -> dict:
    from sft_dagster.training import train

    train_df, val_df, _ = dataset(args.examples, args.val)
    s = spec(args.model_dir, args.steps, sorted(set(train_df["response"]) | set(val_df["response"])), method, packing,
             precision)
    out = Path(args.out) / f"ours_{method}{'_packing' if packing else ''}_{precision}"
    start = time.perf_counter()
    result = train(s, Path(args.model_dir), train_df, val_df, out, device=args.device, log=lambda _: None,
                   probe_cache=Path(args.out) / "probes")
    m = result.metrics
    return {"trained_tokens": m["trained_tokens"], "seconds": round(m["seconds"] - m["validation_seconds"], 2),
            "tokens_per_second": m["tokens_per_second"], "val_loss": m["val_loss"], "steps": m["steps"],
            "precision": m["precision"], "precision_choice": m["precision_choice"],
            # everything train() did: loading, the precision probe when not cached, validation, saving
            "wall_seconds": round(time.perf_counter() - start, 1)}


def run_trl(args, packing: bool, fp32: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    train_df, val_df, _ = dataset(args.examples, args.val)
    s = spec(args.model_dir, args.steps, sorted(set(train_df["response"]) | set(val_df["response"])))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": PROMPT.format(prompt=p)}], "completion": [{"role": "assistant", "content": r}]}
        for p, r in zip(train_df["prompt"], train_df["response"])
    ])
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    # Packed, TRL fills each of the 8 rows to max_length (its default 1024 would make a step ~14x the
    # unpacked tokens): rows of model.max_length and a third of the steps keep the token count close.
    steps = max(1, args.steps // 3) if packing else args.steps
    if not fp32 and not packing and args.trl_default_steps:
        steps = args.trl_default_steps
    extra = {"max_length": s.model.max_length} if packing else {}
    config = SFTConfig(output_dir=str(Path(args.out) / "trl"), per_device_train_batch_size=8, max_steps=steps,
                       learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0, logging_steps=args.steps,
                       save_strategy="no", report_to=[], packing=packing, use_cpu=args.device == "cpu", seed=0,
                       **({"bf16": False} if fp32 else {}),
                       include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, **extra)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"trained_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 1),
            "val_loss": val_loss(trainer.model, tokenizer, s, val_df), "steps": trainer.state.global_step}


def matmul_rates(device: str, budget_seconds: float = 5.0) -> dict:
    """fp32 and bf16 matrix-product rates; as many repeats as fit in the budget (bf16 emulated on an
    AVX2 CPU runs a 2048^3 product in a minute)."""
    import torch

    out, size = {}, (8192 if device == "cuda" else 2048)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        timings = []
        while len(timings) < 11 and sum(timings) < budget_seconds:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - start)
        steady = timings[1:] or timings  # the first product pays one-off costs
        out[f"{name}_gflops"] = round(2 * size**3 / (sum(steady) / len(steady)) / 1e9, 1)
    return out


def child(args) -> None:
    result = {"ours": run_ours, "trl": lambda a: run_trl(a, False), "trl_fp32": lambda a: run_trl(a, False, fp32=True),
              "trl_packing": lambda a: run_trl(a, True, fp32=args.device == "cpu"),
              "ours_fp32": lambda a: run_ours(a, precision="fp32"), "ours_bf16": lambda a: run_ours(a, precision="bf16"),
              "ours_packing": lambda a: run_ours(a, packing=True), "ours_qlora": lambda a: run_ours(a, "qlora")}[args.child](args)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.device == "cuda":
        import torch

        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print("RESULT " + json.dumps(result))


def run_child(name: str, cmd: list[str]) -> dict:
    """Run one measurement in its own process (its own peak RSS) and return what it printed as `RESULT`."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--out", default=str(ROOT / ".sft" / "bench_train"))
    parser.add_argument("--packing", action="store_true", help="also run both trainers in packing mode")
    parser.add_argument("--qlora", action="store_true", help="also run sft_dagster's trainer with QLoRA")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precisions", nargs="*", choices=["fp32", "bf16"], default=[],
                        help="also run sft_dagster's trainer forced to these precisions")
    parser.add_argument("--runs", nargs="*", default=None, help="run only these (e.g. ours_fp32 ours_bf16)")
    parser.add_argument("--trl-default-steps", type=int, default=None,
                        help="steps for TRL at its (bf16) defaults, if fewer than --steps")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_dir is None:
        from sft_dagster.models import resolve_base_model
        from sft_dagster.spec import ModelSpec

        args.model_dir = str(resolve_base_model(ModelSpec(), ROOT / ".sft" / "models").path)
    if args.child:
        child(args)
        return
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)  # each run trains from scratch
    runs = args.runs or (
        ["ours"] + [f"ours_{p}" for p in args.precisions] + ["trl"] + (["trl_fp32"] if args.device == "cpu" else [])
        + (["ours_packing", "trl_packing"] if args.packing else []) + (["ours_qlora"] if args.qlora else []))
    import os

    from sft_dagster.training.precision import machine_key

    conditions = {"machine": machine_key(args.device), "load_average_before": os.getloadavg(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results = {}
    for name in runs:
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--examples", str(args.examples),
               "--val", str(args.val), "--model-dir", args.model_dir, "--out", args.out, "--device", args.device]
        if args.trl_default_steps:
            cmd += ["--trl-default-steps", str(args.trl_default_steps)]
        results[name] = run_child(name, cmd)
    def ratios(a: dict, b: dict) -> dict:
        return {"tokens_per_second_ratio": round(a["tokens_per_second"] / b["tokens_per_second"], 2),
                "peak_rss_ratio": round(a["peak_rss_mib"] / b["peak_rss_mib"], 2),
                "val_loss_difference": round(a["val_loss"] - b["val_loss"], 4)}

    rates = matmul_rates(args.device)
    # LoRA step FLOPs per token ~ 4 x non-embedding parameters (forward + input gradients; the frozen
    # weights get no weight gradients); the tied 49k x 576 output layer only where loss is computed.
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.model_dir)
    h = cfg.hidden_size
    linear_params = cfg.num_hidden_layers * (2 * h * h + 2 * h * h * cfg.num_key_value_heads / cfg.num_attention_heads
                                             + 3 * h * cfg.intermediate_size)
    flops_per_token = 4 * linear_params
    conditions["load_average_after"] = os.getloadavg()
    conditions["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report = {
        "conditions": conditions,
        "model": Path(args.model_dir).name, "device": args.device, "data": dataset(args.examples, args.val)[2], "steps": args.steps, "batch_size": 8,
        "results": results,
        **{f"{a}_vs_{b}": ratios(results[a], results[b])
           for a, b in (("ours", "trl"), ("ours", "trl_fp32"), ("ours_bf16", "ours_fp32"), ("ours_fp32", "trl_fp32"),
                        ("ours_bf16", "trl"))
           if a in results and b in results},
        "matmul": rates,
        "approx_flops_per_trained_token": int(flops_per_token),
        **{f"{name}_fraction_of_{dtype}_matmul_rate":
           round(results[name]["tokens_per_second"] * flops_per_token / (rates[f"{dtype}_gflops"] * 1e9), 3)
           for name in results if name.startswith("ours") for dtype in ("fp32", "bf16")},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
