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

from ...preference.losses import collate_pair_groups, dpo_batch_loss
from ...spec import PipelineSpec
from .pairs import PolicyPairMethod, pair_training_spec, sequence_logprobs_of, train_pair_policy


@dataclass
class ReferencedGroup:
    group: object  # preference.losses.PairGroup
    reference: list[float] | None = None  # the reference's log-prob of each of the group's sequences


class DPOMethod(PolicyPairMethod):
    name = objective = "dpo"
    unit = "pairs"  # what an item's weight counts

    def __init__(self, spec: PipelineSpec, config, sft_adapter_dir: Path | None = None):
        super().__init__(spec, config, sft_adapter_dir)
        self.reference_sequences = 0  # sequences the reference scored: each distinct reply once
        self.reference_seconds = 0.0

    def encode(self, tokenizer, frame):
        return [ReferencedGroup(g) for g in super().encode(tokenizer, frame)]

    def collate(self, items, pad_id, device):
        if any(i.reference is None for i in items):
            raise RuntimeError("reference log-probs are computed in prepare() before training")
        batch = collate_pair_groups([i.group for i in items], pad_id, device)
        batch["reference_logps"] = torch.tensor([x for i in items for x in i.reference], dtype=torch.float32,
                                                device=device)
        return batch

    def reference_groups(self, item) -> list:
        """The groups of an item whose sequences the reference scores (their log-probs fill `set_reference`)."""
        return [item.group]

    def set_reference(self, item, logps: list[list[float]]) -> None:
        (item.reference,) = logps

    def prepare(self, model, train_items, val_items, pad_id, device, autocast_precision, log) -> None:
        """The reference log-prob of every distinct reply, once: the policy as loaded (the SFT model),
        dropout off."""
        start = time.perf_counter()
        items = train_items + val_items
        groups = [self.reference_groups(i) for i in items]
        logps = sequence_logprobs_of(model, [g for gs in groups for g in gs], self.spec.training.batch_size, pad_id,
                                     device, autocast_precision)
        for item, gs in zip(items, groups):
            self.set_reference(item, logps[: len(gs)])
            logps = logps[len(gs) :]
        self.reference_sequences += sum(len(g.sequences) for gs in groups for g in gs)
        self.reference_seconds += time.perf_counter() - start
        pairs = sum(i.group.n_pairs for i in items)
        log(f"{self.name}: reference log-probs of {self.reference_sequences} distinct replies ({pairs} {self.unit}) "
            f"computed once in {self.reference_seconds:.1f} s")

    def loss(self, model, batch):
        loss, stats = dpo_batch_loss(model, batch, self.config.beta, self.config.label_smoothing,
                                     reference_logps=batch["reference_logps"])
        n = len(batch["chosen_index"])
        self.record({k: v for k, v in stats.items() if k != "loss"}, n)
        return loss * n, n

    def reference_metrics(self) -> dict:
        return {"reference_seconds": round(self.reference_seconds, 2), "reference_sequences": self.reference_sequences}

    def extra_metrics(self) -> dict:
        return {**super().extra_metrics(), "label_smoothing": self.config.label_smoothing, **self.reference_metrics()}


def train_dpo(spec: PipelineSpec, config, model_dir: Path, sft_adapter_dir: Path | None, train_pairs: pd.DataFrame,
              val_pairs: pd.DataFrame, output_dir: Path, device: str = "auto", log: Callable[[str], None] = print,
              on_metrics: Callable[[dict], None] | None = None, stop_after_steps: int | None = None):
    """DPO (`spec.preference.DPOConfig`) from the SFT adapter (None: the base model with a new LoRA
    adapter), with the SFT model as reference; epochs, LoRA and seed come from `spec.training`, the
    batch size (prompts, each with all its pairs) and learning rate from `config` where it sets them,
    else from `spec.training`. Saves `output_dir/adapter`, a peft adapter on `model_dir` like SFT's."""
    return train_pair_policy(DPOMethod(pair_training_spec(spec, config), config, sft_adapter_dir), model_dir,
                             train_pairs, val_pairs, output_dir, device, log, on_metrics, stop_after_steps)
