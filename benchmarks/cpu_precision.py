"""Is bf16 faster than fp32 on this CPU? Measure, do not assume.

Times (a) a 2048x2048 matrix product in fp32 and bf16 and (b) one LoRA training step (forward and
backward, loss on the last 3 tokens, logits only there) of SmolLM2-135M-Instruct on a batch of 8 x 78
tokens: in fp32, under `torch.autocast("cpu", dtype=torch.bfloat16)`, and with the frozen base
stored in bf16 (what `precision: bf16` trains with). Best of up to 4 runs each, fewer when a run takes
long (emulated bf16 on an AVX2 CPU: ~2 minutes per step). Prints the CPU's model and bf16 flags.

    .venv/bin/python benchmarks/cpu_precision.py
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from train_throughput import matmul_rates

ROOT = Path(__file__).resolve().parents[1]


def step_tokens_per_second(model, batch: dict, bf16: bool, budget_seconds: float = 30.0) -> float:
    from sft_dagster.torchkit import summed_response_loss

    times = []
    while len(times) < 4 and (len(times) < 2 or sum(times) < budget_seconds):
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
    from sft_dagster.training.fast_lora import use_fast_lora
    from sft_dagster.training.precision import machine_key
    from sft_dagster.torchkit import store_frozen_weights

    model_dir = resolve_base_model(ModelSpec(), ROOT / ".sft" / "models").path
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    use_fast_lora(model)  # as the trainer does; under autocast the layers fall back to peft's forward
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 78))
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    fp32, bf16 = step_tokens_per_second(model, batch, False), step_tokens_per_second(model, batch, True)
    bf16_base = copy.deepcopy(model)
    store_frozen_weights(bf16_base, torch.bfloat16)
    bf16_weights = step_tokens_per_second(bf16_base, batch, False)
    rates = matmul_rates("cpu")
    print(json.dumps({
        "machine": machine_key("cpu"),
        "matmul_gflops": {"fp32": rates["fp32_gflops"], "bf16": rates["bf16_gflops"]},
        "lora_step_tokens_per_second": {"fp32": round(fp32, 1), "bf16_autocast": round(bf16, 1),
                                        "bf16_base_weights": round(bf16_weights, 1)},
        "bf16_speedup": {"autocast": round(bf16 / fp32, 2), "bf16_base_weights": round(bf16_weights / fp32, 2)},
    }, indent=2))


if __name__ == "__main__":
    main()
