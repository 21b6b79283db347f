"""Is bf16 autocast faster than fp32 on this CPU? Measure, do not assume.

Times (a) a 2048x2048 matrix product in fp32 and bf16 and (b) one LoRA training step (forward and
backward, loss on the last 3 tokens, logits only there) of SmolLM2-135M-Instruct on a batch of 8 x 78
tokens, in fp32 and under `torch.autocast("cpu", dtype=torch.bfloat16)`. Best of 4 runs each.

    .venv/bin/python benchmarks/cpu_precision.py
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def step_tokens_per_second(model, batch: dict, bf16: bool) -> float:
    from sft_dagster.training.trainer import summed_response_loss

    times = []
    for _ in range(4):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = summed_response_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch["input_ids"].numel() / min(times)


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft_dagster.models import resolve_base_model
    from sft_dagster.spec import ModelSpec

    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16|avx512f)\b", Path("/proc/cpuinfo").read_text()))
    model_dir = resolve_base_model(ModelSpec(), ROOT / ".sft" / "models").path
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 78))
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    fp32, bf16 = step_tokens_per_second(model, batch, False), step_tokens_per_second(model, batch, True)
    print(json.dumps({
        "cpu_flags": sorted(flags), "threads": torch.get_num_threads(),
        "matmul_gflops": {"fp32": round(matmul_gflops(torch.float32), 1), "bf16": round(matmul_gflops(torch.bfloat16), 1)},
        "lora_step_tokens_per_second": {"fp32": round(fp32, 1), "bf16_autocast": round(bf16, 1)},
        "bf16_speedup": round(bf16 / fp32, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
