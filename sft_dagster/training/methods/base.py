"""The method interface of the shared training loop (`training.trainer.run_training`).

One class per training method, in the spirit of TRL's config + trainer pairs and torchtune's recipes:
the loop owns what every method shares (length-grouped micro-batches under a token budget, gradient
accumulation with the loss normalised over the whole window, clipping, scheduler, evaluation and
early stopping with the best weights kept, checkpoints and resume, progress lines, atomic saves); the
method answers what differs:

- `load_model`: the model to train (frozen parts frozen) in the run's precision;
- `encode`: the rows as training items (refusing, never truncating, rows that do not fit);
- `length` / `tokens` / `weight` of an item: its padded width for the token budget, the tokens it
  trains on (throughput), and its share of the loss normaliser (loss tokens for SFT, 1 per pair);
- `collate` and `loss`: a batch of items, and its summed loss with the weight it covers;
- `encode_train`: the train split's items, where they differ from `encode` (SFT mixes replay
  examples in and varies prompt templates; validation rows are encoded as evaluated);
- `prepare`: work done once before the first step (DPO's reference log-probabilities);
- `begin_window`: work on a whole accumulation window before its first micro-batch (KTO's KL estimate);
- `auxiliary_loss`: a term added once per optimizer step (SFT's distillation to a frozen teacher);
- `finish`: undo training-only changes to the model (SFT's NEFTune hook) before it is saved;
- `save`: what the run leaves in `output_dir`, and `extra_metrics` for `metrics.json`.

Statistics a method wants logged per step (DPO's reward margins, the reward model's accuracy) are
recorded with `record` inside `loss` and read back, weighted by each batch's count, with `pop_stats`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from ... import artefacts
from ...spec import PipelineSpec
from ...torchkit import mean_loss_over, pick_precision
from ..precision import PrecisionChoice


class TrainingMethod(ABC):
    """Base class; subclasses set `name` and implement the abstract methods (`load_model`, `encode`,
    `length`, `item_key`, `collate`, `loss`); a subclass missing one fails when instantiated."""

    name: str = ""  # what the run's record calls it (`method`): the objective, or SFT's adapter
    objective: str = ""  # its entry in `training.objectives.OBJECTIVES`
    packing: bool = False  # micro-batches are concatenated into one row (SFT only)
    output_name: str = artefacts.FOLDERS[artefacts.ADAPTER]  # the folder under output_dir that `save` writes

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self._stats: dict[str, float] = {}
        self._stats_weight = 0.0

    # -- the model ---------------------------------------------------------------------------------
    @abstractmethod
    def load_model(self, model_dir: Path, device: str, precision: str):
        """The model to train, frozen parts frozen, in the run's precision."""

    def uses_autocast(self, precision: str) -> bool:
        """Whether bf16 runs under autocast (True) or on weights stored in bf16 (False)."""
        return precision == "bf16"

    def resolve_precision(self, model_dir: Path, device: str, items: list, pad_id: int, probe_cache):
        """The run's precision and why. Default: the spec's, or for `auto` bf16 on CUDA with bf16 support
        and fp32 elsewhere, without measuring (the measured probe times an SFT step; see sft.py)."""
        requested = self.spec.training.precision
        if requested != "auto":
            return PrecisionChoice(requested, "set in the spec (training.precision)")
        return PrecisionChoice(pick_precision("auto", device),
                               f"auto, not measured for {self.name}: bf16 on CUDA with bf16 support, else fp32")

    # -- the data ----------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, tokenizer, frame) -> list:
        """The rows as items (validation's; the train split's too unless `encode_train` differs);
        rows that do not fit are refused, never truncated."""

    def encode_train(self, tokenizer, frame) -> list:
        """The train split's items (default: as `encode`)."""
        return self.encode(tokenizer, frame)

    @abstractmethod
    def length(self, item) -> int:
        """Tokens one item adds to a padded micro-batch's width x rows (the token budget's unit)."""

    def batch_tokens(self, items: list) -> int:
        """Token slots of the items' collated batch (the micro-batch token budget's measure): rows x the
        longest row, or the tokens of one packed row."""
        lengths = [self.length(i) for i in items]
        return sum(lengths) if self.packing else len(lengths) * max(lengths)

    def tokens(self, item) -> int:
        """Real (unpadded) tokens the item trains on."""
        return self.length(item)

    def weight(self, item) -> int:
        """The item's share of the loss normaliser of an accumulation window."""
        return 1

    @abstractmethod
    def item_key(self, item) -> str:
        """What identifies an item in the run's fingerprint (resume only continues the same run)."""

    def identity(self) -> dict:
        """Settings beyond `spec.training` that make a different run (method config, starting adapter)."""
        return {"method": self.name}

    @abstractmethod
    def collate(self, items: list, pad_id: int, device: str) -> dict[str, torch.Tensor]:
        """A batch of items as tensors on `device`."""

    def evaluation_collate(self, items: list, pad_id: int, device: str) -> dict[str, torch.Tensor]:
        return self.collate(items, pad_id, device)

    # -- the loss ----------------------------------------------------------------------------------
    def prepare(self, model, train_items: list, val_items: list, pad_id: int, device: str, autocast_precision: str,
                log) -> None:
        """Called once after loading, before any checkpoint is restored or step is taken."""

    @abstractmethod
    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed loss over the batch, the weight it covers)."""

    def begin_window(self, model, items: list, pad_id: int, device: str, autocast_precision: str) -> None:
        """Called at the start of each optimizer step with every item of its accumulation window (all
        ranks' micro-batches), before any of them runs: a statistic of the whole window the loss needs
        (KTO's KL estimate), the same however the window is split into micro-batches or ranks."""

    def auxiliary_loss(self, model, step: int) -> torch.Tensor | None:
        """A loss term computed once per optimizer step, already weighted (None: none); the loop runs its
        backward into the same gradients as the window's loss."""
        return None

    def finish(self, model) -> None:
        """Called after the last step (best weights restored), before `save`."""

    def record(self, stats: dict[str, float], weight: float) -> None:
        for key, value in stats.items():
            self._stats[key] = self._stats.get(key, 0.0) + float(value) * weight
        self._stats_weight += weight

    def pop_stats(self) -> dict[str, float]:
        """The recorded statistics since the last call, averaged with the batches' weights."""
        weight, stats = self._stats_weight, self._stats
        self._stats, self._stats_weight = {}, 0.0
        return {k: v / weight for k, v in stats.items()} if weight else {}

    def validate(self, model, items: list, batch_size: int, pad_id: int, device: str, autocast_precision: str) -> dict:
        """`val_loss` (summed loss / summed weight over `items`, dropout off) and the statistics recorded
        meanwhile as `val_<name>`."""
        self.pop_stats()  # a validation pass never mixes with the training step's statistics
        val = mean_loss_over(model, items, batch_size, self.length,
                             lambda rows: self.evaluation_collate(rows, pad_id, device), self.loss, device,
                             autocast_precision)
        return {"val_loss": val, **{f"val_{k}": v for k, v in self.pop_stats().items()}}

    # -- the result --------------------------------------------------------------------------------
    def save(self, model, tokenizer, out_dir: Path, model_dir: Path) -> None:
        """Write the trained result into `out_dir` (a temporary folder renamed into place atomically)."""
        model.save_pretrained(out_dir, safe_serialization=True)

    def extra_metrics(self) -> dict[str, Any]:
        return {}


def lora_config(spec: PipelineSpec, task_type: str):
    """The peft LoRA settings of `spec.training.lora` for a model of `task_type` (CAUSAL_LM, SEQ_CLS)."""
    from peft import LoraConfig

    lora = spec.training.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.use_dora,
                      target_modules=lora.target_modules, task_type=task_type)
