"""Supervised fine-tuning (`training.adapter: lora | qlora | full`): the response-only causal LM loss.

`train` and `preflight` are SFT's entry points. Everything SFT-specific the shared loop needs: the
model per method (`load_model`: LoRA with
the fused layer, QLoRA's 4-bit base, or every weight), exact loss masks (`formatting.encode_example`),
packing, precision `auto` by measurement, and the saved adapter or full model; and what guards
against overfitting and forgetting (`training/augment.py`, `training/distill.py`): prompt-template
variation, replay mixing, NEFTune noise, the distillation term; for a multi-task mix, each row
rendered with its own task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from ... import artefacts
from ...formatting import IGNORE_INDEX, EncodedExample, encode_frame
from ...formatting import pad_id as pad_id_of
from ...spec import PipelineSpec, TaskSpec
from ...torchkit import (autocast, collate, collate_micro_batch, pick_device, pick_precision,
                         release_freed_memory_to_os, shared_prefix_rows, shared_row_length, shares_prefixes,
                         store_frozen_weights, summed_response_loss)
from .. import augment
from ..distill import Distiller
from ..fast_lora import use_fast_lora
from ..precision import PrecisionChoice, cached_choice, machine_key, measure_precision, probe_cache_dir
from ..trainer import TrainingResult, optimizer_steps, run_training
from .base import TrainingMethod, lora_config


class SFTMethod(TrainingMethod):
    objective = "sft"

    def __init__(self, spec, tasks: dict | None = None, teacher_cache: Path | None = None):
        """`tasks`: a multi-task mix's tasks by name (rows name theirs in a `task` column);
        `teacher_cache`: where distillation caches the teacher's top-k logits."""
        super().__init__(spec)
        self.name = spec.training.adapter
        self.packing = spec.training.packing
        self.output_name = artefacts.folder_for(self.name)
        self.tasks = tasks
        self.teacher_cache = teacher_cache
        self.distiller: Distiller | None = None
        self.neftune = None
        self.train_frame = None
        self.task_frame = None  # the train split before replay rows are mixed in
        self.last_kl: float | None = None
        self.share_prefix = False  # set when the model is loaded

    def load_model(self, model_dir: Path, device: str, precision: str):
        if self.spec.training.distillation.weight > 0:  # the teacher runs (or its cache is read) before the student loads
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            pad_id = pad_id_of(tokenizer)
            self.distiller = Distiller.prepare(self.spec, model_dir, tokenizer, self.teacher_cache, device, pad_id,
                                               self.task_frame, augment.main_tasks(self.task_frame, self.spec, self.tasks))
        model = load_model(self.spec, model_dir, device, precision)
        self.neftune = augment.attach_neftune(model, self.spec.training.neftune_alpha)
        self.share_prefix = collates_shared_prefixes(self.spec) and shares_prefixes(model)
        return model

    def uses_autocast(self, precision: str) -> bool:
        return uses_autocast(self.name, precision)

    def resolve_precision(self, model_dir, device, items, pad_id, probe_cache):
        return resolve_precision(self.spec, model_dir, device, items, pad_id, probe_cache)

    def encode(self, tokenizer, frame) -> list[EncodedExample]:
        """Validation rows, rendered with the main template of their task."""
        return encode_frame(tokenizer, frame, self.spec, augment.main_tasks(frame, self.spec, self.tasks))

    def encode_train(self, tokenizer, frame) -> list[EncodedExample]:
        if frame.empty:  # before replay rows are mixed in
            raise ValueError("the train split is empty")
        self.task_frame = frame
        self.train_frame = augment.with_replay(frame, self.spec)  # general examples mixed in (training.replay)
        return encode_frame(tokenizer, self.train_frame, self.spec,
                                    augment.row_tasks(self.train_frame, self.spec, self.tasks))

    def length(self, item: EncodedExample) -> int:
        return len(item.input_ids)

    def batch_tokens(self, items: list[EncodedExample]) -> int:
        if self.share_prefix:
            rows = shared_prefix_rows(items)
            return len(rows) * max(shared_row_length([e.input_ids for e in r]) for r in rows)
        return super().batch_tokens(items)

    def weight(self, item: EncodedExample) -> int:
        return sum(1 for label in item.labels[1:] if label != IGNORE_INDEX)

    def item_key(self, item: EncodedExample) -> str:
        return str(item.input_ids)

    def identity(self) -> dict:
        return {}  # spec.training already names lora / qlora / full: fingerprints stay as before

    def collate(self, items, pad_id, device):
        return collate_micro_batch(items, pad_id, device, self.packing, self.share_prefix)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        return summed_response_loss(model, batch)

    def auxiliary_loss(self, model, step: int):
        if self.distiller is None:
            return None
        kl, n = self.distiller.loss(model, self.distiller.batch_for_step(step))  # KL on replay examples
        self.last_kl = float(kl.detach()) / n
        return self.spec.training.distillation.weight * kl / n

    def finish(self, model) -> None:
        if self.neftune is not None:
            self.neftune.remove()

    def extra_metrics(self) -> dict:
        metrics = augment.run_metrics(self.train_frame, self.spec, self.tasks) if self.train_frame is not None else {}
        if self.distiller is not None:
            metrics["distillation"] = self.distiller.stats | {"final_kl": self.last_kl}
        return metrics

    def evaluation_collate(self, items, pad_id, device):
        return collate(items, pad_id, device)

    def save(self, model, tokenizer, out_dir: Path, model_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        if artefacts.is_whole_model(self.name):  # loadable on its own, tokenizer included
            tokenizer.save_pretrained(out_dir)


def uses_autocast(adapter: str, precision: str) -> bool:
    """Whether bf16 runs under autocast: for `full` (the trained weights stay fp32 masters) and `qlora`
    (4-bit base). `lora` in bf16 stores its frozen base in bf16 instead (`store_frozen_weights`)."""
    return precision == "bf16" and adapter != "lora"


def load_model(spec: PipelineSpec, model_dir: Path, device: str, precision: str | None = None):
    """The base model prepared for the spec's adapter (lora, qlora or full) and precision.

    `precision` is the run's resolved precision (default: `pick_precision` of the spec's). LoRA in bf16
    keeps the frozen base in bf16 and the adapters in fp32. QLoRA quantises the frozen base to 4-bit
    NF4 with bitsandbytes (on CUDA and, with its CPU backend, on CPU); the LoRA adapters stay in full
    precision and compute in bf16 or fp32.
    """
    from transformers import AutoModelForCausalLM

    adapter = spec.training.adapter
    precision = precision or pick_precision(spec.training.precision, device)
    kwargs: dict = {"dtype": torch.float32}
    if adapter == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if adapter != "qlora":
        model.to(device)
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if artefacts.is_whole_model(adapter):  # every weight trains
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if adapter == "qlora" and not device.startswith("cuda"):
        import bitsandbytes as bnb

        odd = [(n, m.in_features) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and m.in_features % 64]
        if odd:  # bitsandbytes' CPU kernels work on blocks of 64 input features
            raise ValueError(f"training.adapter qlora on CPU needs layer widths that are multiples of 64; "
                             f"{odd[0][0]} has {odd[0][1]} inputs: use method lora (training.adapter: lora)")
    if adapter == "qlora":
        keep_4bit_layers_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.training.gradient_checkpointing)
    model = get_peft_model(model, lora_config(spec, "CAUSAL_LM"))
    if adapter == "lora" and precision == "bf16":
        store_frozen_weights(model, torch.bfloat16)
        if not device.startswith("cuda"):
            release_freed_memory_to_os()  # the fp32 copies of the base weights
    use_fast_lora(model)  # same maths, cheaper dropout on CPU (see fast_lora.py)
    return model


def keep_4bit_layers_trainable(model) -> int:
    """Keep every bitsandbytes `Linear4bit` of `model` in its trainable layout for the whole run.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer for its CPU inference kernel
    (`gemv_4bit`) the first time the layer runs in eval mode without gradients, i.e. during the first
    validation pass, and keeps that layout: later training forwards go through `gemv_4bit`, which has
    no backward, so the gradient through the frozen weights was silently dropped (issue #8, measured
    on a tiny Llama on an AVX512-BF16 CPU: LoRA gradients 67% off the dequantised-fp32 reference after
    one validation pass, exact before; 80% with the condition forced on an AVX2 CPU, where the default
    `gemv_4bit` kernel also misreads the repacked weights). Each layer copies the CPU check into `support_avx512bf16_for_cpu` when built; clearing it
    keeps validation on the same dequantise-and-multiply path as training. Returns the layers switched.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("a 4-bit layer is already in bitsandbytes' CPU inference layout; "
                               "call keep_4bit_layers_trainable before its first forward")
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def collates_shared_prefixes(spec: PipelineSpec) -> bool:
    """Whether SFT micro-batches are shared-prefix rows (`collate_shared_prefix`) for this spec: not when
    packing, nor under NEFTune (its noise is drawn per example; a prefix computed once would get one draw)."""
    return not spec.training.packing and spec.training.neftune_alpha == 0


def probe_batch(encoded: list[EncodedExample], spec: PipelineSpec, pad_id: int, device: str
                ) -> tuple[dict[str, torch.Tensor], int]:
    """A typical micro-batch, collated as the trainer will (shared prefixes, packed or padded rows):
    `batch_size` rows from the middle of the length distribution; and the tokens it trains on."""
    sample = sorted(encoded, key=lambda e: len(e.input_ids))[len(encoded) // 2 :][: spec.training.batch_size]
    batch = collate_micro_batch(sample, pad_id, device, spec.training.packing, collates_shared_prefixes(spec))
    return batch, sum(len(e.input_ids) for e in sample)


def time_training_step(spec: PipelineSpec, model_dir: Path, device: str, precision: str,
                       batch: dict[str, torch.Tensor], tokens: int, repeats: int = 2) -> dict:
    """Best time of one forward + backward of a freshly loaded model after a warm-up step, and its loss.

    The global RNG is left as it was (the run's seed decides the adapters' initial values, whether or
    not a probe ran before).
    """
    import gc

    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.training.seed)
        model = load_model(spec, model_dir, device, precision)
        model.train()
        amp = precision if uses_autocast(spec.training.adapter, precision) else "fp32"
        times, first_loss = [], None
        for _ in range(1 + repeats):
            torch.manual_seed(spec.training.seed)  # the same dropout masks in every repeat and precision
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with autocast(device, amp):
                loss, n = summed_response_loss(model, batch)
            (loss / n).backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            first_loss = float(loss.detach()) / n if first_loss is None else first_loss
    del model
    gc.collect()
    if not device.startswith("cuda"):
        release_freed_memory_to_os()
    return {"seconds": round(min(times[1:]), 4), "tokens": tokens, "loss": round(first_loss, 6)}


def resolve_precision(spec: PipelineSpec, model_dir: Path, device: str, encoded: list[EncodedExample], pad_id: int,
                      cache_dir: Path | str | None = None) -> PrecisionChoice:
    """The run's precision: the spec's, or for `auto` the measured choice (cached; see precision.py)."""
    requested = spec.training.precision
    if requested != "auto":
        return PrecisionChoice(requested, "set in the spec (training.precision)")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    widths = (config.hidden_size, getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
    key = machine_key(device) | {
        "method": spec.training.adapter, "lora_r": spec.training.lora.r, "model_type": config.model_type,
        "hidden_size": config.hidden_size, "intermediate_size": widths[1],
        "layers": getattr(config, "num_hidden_layers", None), "vocab_size": getattr(config, "vocab_size", None),
    }
    bf16_supported = torch.cuda.is_bf16_supported() if device.startswith("cuda") else True
    batch, tokens = probe_batch(encoded, spec, pad_id, device)

    def measure():
        return measure_precision(device, widths, bf16_supported,
                                 lambda precision: time_training_step(spec, model_dir, device, precision, batch, tokens))

    return cached_choice(probe_cache_dir(cache_dir), key, measure)


def train(spec: PipelineSpec, model_dir: Path, train_df: pd.DataFrame, val_df: pd.DataFrame, output_dir: Path,
          device: str = "auto", log: Callable[[str], None] = print, on_metrics: Callable[[dict], None] | None = None,
          stop_after_steps: int | None = None, probe_cache: Path | str | None = None,
          teacher_cache: Path | None = None, tasks: dict[str, TaskSpec] | None = None) -> TrainingResult:
    """SFT (`training.adapter` lora / qlora / full): train and save the adapter (or full model) under
    `output_dir`; resumes from its checkpoints. See `run_training`.

    `teacher_cache`: where distillation caches the teacher's top-k logits (default: next to `output_dir`).
    `tasks`: for a multi-task mix (a `task` column in the frames, sft_dagster/multitask.py), each task by name.
    """
    method = SFTMethod(spec, tasks=tasks, teacher_cache=teacher_cache or output_dir.parent / "teacher_cache")
    return run_training(method, spec, model_dir, train_df, val_df, output_dir, device=device, log=log,
                        on_metrics=on_metrics, stop_after_steps=stop_after_steps, probe_cache=probe_cache)


def preflight(spec: PipelineSpec, model_dir: Path, train_df: pd.DataFrame, device: str = "auto",
              probe_cache: Path | str | None = None, tasks: dict[str, TaskSpec] | None = None) -> dict:
    """Token counts, optimizer steps, the precision (and why) and an estimated duration (one timed
    training step), before training. `precision: auto` is measured here, or read from the probe cache."""
    from transformers import AutoTokenizer

    device = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode_frame(tokenizer, train_df, spec, augment.row_tasks(train_df, spec, tasks))
    pad_id = pad_id_of(tokenizer)
    choice = resolve_precision(spec, model_dir, device, encoded, pad_id, probe_cache)
    n_tokens = sum(len(e.input_ids) for e in encoded)
    steps = optimizer_steps(len(encoded), spec)
    plan = {"n_examples": len(encoded), "n_tokens": n_tokens, "n_loss_tokens": sum(e.n_loss_tokens for e in encoded),
            "optimizer_steps": steps, "method": spec.training.adapter, "device": device, "precision": choice.precision,
            "precision_reason": choice.reason, "precision_choice": choice.to_metadata()}
    batch, tokens = probe_batch(encoded, spec, pad_id, device)
    step = time_training_step(spec, model_dir, device, choice.precision, batch, tokens, repeats=1)
    tokens_per_second = step["tokens"] / step["seconds"]
    epochs = steps * spec.training.gradient_accumulation_steps * spec.training.batch_size / max(1, len(encoded))
    plan["estimated_seconds"] = round(n_tokens * epochs / tokens_per_second, 1)
    plan["measured_tokens_per_second"] = round(tokens_per_second, 1)
    return plan


