"""Where a training step's time goes: matrix products vs casts, elementwise work, optimizer and data.

Profiles one optimizer step of the trainer's own code (`load_model`, `collate_micro_batch`, `summed_response_loss`,
backward, gradient clipping, AdamW) on SmolLM2-135M-Instruct with LoRA r=16 on all linear layers, a
batch of 8 Banking77 rows (the demo reviews when the shared data is absent), after `--warmup` steps,
in the precision given; `--compile` wraps the decoder in `torch.compile` first. Prints JSON: seconds
per category (self CPU time of the profiled ops), the top operators, and the step's wall time.

    .venv/bin/python benchmarks/profile_step.py --precision fp32
    .venv/bin/python benchmarks/profile_step.py --precision bf16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CATEGORIES = {  # first match wins; names are aten / profiler event names
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
               "aten::_scaled_dot_product", "aten::_addmm_activation", "mkldnn", "aten::addmm_"),
    "casts and copies": ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"),
    "optimizer": ("aten::_foreach", "aten::_fused_adam", "Optimizer.", "aten::addcdiv", "aten::lerp", "aten::sqrt"),
    "data": ("aten::full", "aten::tensor", "aten::zeros", "aten::index_put", "aten::fill_", "aten::lift"),
    "random (dropout masks)": ("aten::randint", "aten::random_", "aten::bernoulli"),
}


def categorise(name: str) -> str:
    for category, prefixes in CATEGORIES.items():
        if any(name.startswith(p) for p in prefixes):
            return category
    return "elementwise and other"


def build(precision: str, compile_model: bool):
    from train_throughput import PROMPT, dataset
    from transformers import AutoTokenizer

    from sft_dagster.models import resolve_base_model
    from sft_dagster.spec import ModelSpec, PipelineSpec
    from sft_dagster.formatting import encode_frame
    from sft_dagster.training.methods.sft import load_model

    model_dir = resolve_base_model(ModelSpec(), ROOT / ".sft" / "models").path
    train_df, _, _ = dataset(64, 0)
    spec = PipelineSpec.model_validate({
        "name": "profile", "task": {"type": "classification", "labels": sorted(set(train_df["response"])),
                                    "prompt_template": PROMPT},
        "sources": [{"path": "unused"}], "model": {"base": str(model_dir), "max_length": 256},
        "training": {"precision": precision, "batch_size": 8,
                     "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
    })
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode_frame(tokenizer, train_df, spec)
    torch.manual_seed(0)
    model = load_model(spec, model_dir, "cpu", precision)
    if compile_model:
        model.get_base_model().model.compile(dynamic=True)
    model.train()
    return model, encoded, tokenizer.pad_token_id, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--rows", type=int, default=8, help="rows per batch")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from sft_dagster.torchkit import collate_micro_batch, HeapReleaser, summed_response_loss
    from sft_dagster.training.methods.sft import collates_shared_prefixes
    from sft_dagster.training.trainer import make_optimizer

    model, encoded, pad_id, spec = build(args.precision, args.compile)
    share_prefix = collates_shared_prefixes(spec)
    heap = HeapReleaser()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, 2e-4, 0.0, "cpu")
    batches = [encoded[i : i + args.rows] for i in range(0, len(encoded), args.rows)]

    def step(rows) -> int:
        batch = collate_micro_batch(rows, pad_id, "cpu", spec.training.packing, share_prefix)
        loss, n = summed_response_loss(model, batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        heap.after_step()
        return sum(len(e.input_ids) for e in rows)

    warm = []
    for rows in batches[: args.warmup]:
        start = time.perf_counter()
        step(rows)
        warm.append(round(time.perf_counter() - start, 2))
    rows = batches[args.warmup % len(batches)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        tokens = step(rows)
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    by_category: dict[str, float] = {}
    for e in events:
        by_category[categorise(e.key)] = by_category.get(categorise(e.key), 0.0) + e.self_cpu_time_total / 1e6
    total = sum(by_category.values())
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    print(json.dumps({
        "precision": args.precision, "compiled": args.compile, "threads": torch.get_num_threads(),
        "tokens": tokens, "warmup_step_seconds": warm, "step_seconds": round(wall, 3),
        "tokens_per_second": round(tokens / wall, 1),
        "self_cpu_seconds_by_category": {k: round(v, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "share_by_category": {k: round(v / total, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_operators": [{"op": e.key, "self_seconds": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count,
                           "category": categorise(e.key)} for e in top],
    }, indent=2))


if __name__ == "__main__":
    main()
