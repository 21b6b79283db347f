"""DPO through the shared loop: the policy starts from the SFT adapter, the SFT model is the reference.

The reference's sequence log-probabilities of every distinct train and validation reply are computed
once, in `prepare`, before the first step (dropout off, the run's precision), and travel with the
pairs: a training step runs the policy only, never the reference (TRL's `precompute_ref_log_probs`).
The pairs of a prompt are one batch item (`methods.pairs.PairMethod`): each reply is scored once
however many pairs it is in. Since the
policy starts as the SFT model, its log-probs at that moment are the reference's. The loss is
`preference.losses.dpo_loss` (sigmoid, conservative with `label_smoothing`), the mean over the pairs
of an optimizer step; each step records the implicit reward margin, the chosen/rejected rewards, the
policy's chosen/rejected log-probs and the reward accuracy. The result is a LoRA adapter saved like
the SFT adapter (`output_dir/adapter`), so evaluation, merging and the registry take it unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ... import artefacts
from ...preference.losses import collate_pair_groups, dpo_batch_loss, sequence_logprobs
from ...spec import PipelineSpec
from ...torchkit import autocast
from ..trainer import run_training
from .pairs import PairMethod, disable_dropout, load_policy, pair_training_spec


@dataclass
class ReferencedGroup:
    group: object  # preference.losses.PairGroup
    reference: list[float] | None = None  # the reference's log-prob of each of the group's sequences


class DPOMethod(PairMethod):
    name = objective = "dpo"
    output_name = artefacts.FOLDERS[artefacts.ADAPTER]

    def __init__(self, spec: PipelineSpec, config, sft_adapter_dir: Path | None = None):
        super().__init__(spec)
        self.config = config
        self.sft_adapter_dir = Path(sft_adapter_dir) if sft_adapter_dir is not None else None
        self.reference_sequences = 0  # sequences the reference scored: each distinct reply once
        self.reference_seconds = 0.0

    def identity(self) -> dict:
        start = None
        if self.sft_adapter_dir is not None:
            files = sorted(self.sft_adapter_dir.glob("*.safetensors"))
            start = [str(self.sft_adapter_dir.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                                             for f in files]
        return {"method": self.name, "config": self.config.model_dump(mode="json"), "start": start}

    def load_model(self, model_dir: Path, device: str, precision: str):
        model = load_policy(self.spec, model_dir, self.sft_adapter_dir, device)
        if self.config.disable_dropout:
            disable_dropout(model)
        return model

    def encode(self, tokenizer, frame):
        return [ReferencedGroup(g) for g in super().encode(tokenizer, frame)]

    def collate(self, items, pad_id, device):
        if any(i.reference is None for i in items):
            raise RuntimeError("reference log-probs are computed in prepare() before training")
        batch = collate_pair_groups([i.group for i in items], pad_id, device)
        batch["reference_logps"] = torch.tensor([x for i in items for x in i.reference], dtype=torch.float32,
                                                device=device)
        return batch

    @torch.no_grad()
    def prepare(self, model, train_items, val_items, pad_id, device, autocast_precision, log) -> None:
        """The reference log-prob of every distinct reply, once: the policy as loaded (the SFT model),
        dropout off."""
        start = time.perf_counter()
        items = train_items + val_items
        order = sorted(range(len(items)), key=lambda i: self.length(items[i]))
        was_training = model.training
        model.eval()
        size = self.spec.training.batch_size
        for begin in range(0, len(order), size):
            chunk = [items[i] for i in order[begin : begin + size]]
            batch = collate_pair_groups([c.group for c in chunk], pad_id, device)
            with autocast(device, autocast_precision):
                logps = sequence_logprobs(model, batch).float().cpu().tolist()
            self.reference_sequences += len(batch["sequence_last"])
            for item in chunk:
                item.reference, logps = logps[: len(item.group.sequences)], logps[len(item.group.sequences) :]
        model.train(was_training)
        self.reference_seconds += time.perf_counter() - start
        pairs = sum(i.group.n_pairs for i in items)
        log(f"dpo: reference log-probs of {self.reference_sequences} distinct replies ({pairs} pairs) computed "
            f"once in {self.reference_seconds:.1f} s")

    def loss(self, model, batch):
        loss, stats = dpo_batch_loss(model, batch, self.config.beta, self.config.label_smoothing,
                                     reference_logps=batch["reference_logps"])
        n = len(batch["chosen_index"])
        self.record({k: v for k, v in stats.items() if k != "loss"}, n)
        return loss * n, n

    def extra_metrics(self) -> dict:
        return {"beta": self.config.beta, "label_smoothing": self.config.label_smoothing,
                "sft_adapter_dir": str(self.sft_adapter_dir) if self.sft_adapter_dir else None,
                "reference_seconds": round(self.reference_seconds, 2),
                "reference_sequences": self.reference_sequences}


def train_dpo(spec: PipelineSpec, config, model_dir: Path, sft_adapter_dir: Path | None, train_pairs: pd.DataFrame,
              val_pairs: pd.DataFrame, output_dir: Path, device: str = "auto", log: Callable[[str], None] = print,
              on_metrics: Callable[[dict], None] | None = None, stop_after_steps: int | None = None):
    """DPO (`spec.preference.DPOConfig`) from the SFT adapter (None: the base model with a new LoRA
    adapter), with the SFT model as reference; epochs, LoRA and seed come from `spec.training`, the
    batch size (prompts, each with all its pairs) and learning rate from `config` where it sets them,
    else from `spec.training`. Saves `output_dir/adapter`, a peft adapter on `model_dir` like SFT's."""
    spec = pair_training_spec(spec, config)
    return run_training(DPOMethod(spec, config, sft_adapter_dir), spec, Path(model_dir), train_pairs, val_pairs,
                        Path(output_dir), device=device, log=log, on_metrics=on_metrics,
                        stop_after_steps=stop_after_steps)
