"""Supervised fine-tuning (`training.method: lora | qlora | full`): the response-only causal LM loss.

Everything SFT-specific the shared loop needs: the model per method (`trainer.load_model`: LoRA with
the fused layer, QLoRA's 4-bit base, or every weight), exact loss masks (`formatting.encode_example`),
packing, precision `auto` by measurement, and the saved adapter or full model; and what guards
against overfitting and forgetting (`training/augment.py`, `training/distill.py`): prompt-template
variation, replay mixing, NEFTune noise, the distillation term; for a multi-task mix, each row
rendered with its own task.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...formatting import IGNORE_INDEX, EncodedExample
from ...formatting import pad_id as pad_id_of
from .. import augment, trainer
from ..distill import Distiller
from .base import TrainingMethod


class SFTMethod(TrainingMethod):
    def __init__(self, spec, tasks: dict | None = None, teacher_cache: Path | None = None):
        """`tasks`: a multi-task mix's tasks by name (rows name theirs in a `task` column);
        `teacher_cache`: where distillation caches the teacher's top-k logits."""
        super().__init__(spec)
        self.name = spec.training.method
        self.packing = spec.training.packing
        self.output_name = self.output_name_for(self.name)
        self.tasks = tasks
        self.teacher_cache = teacher_cache
        self.distiller: Distiller | None = None
        self.neftune = None
        self.train_frame = None
        self.task_frame = None  # the train split before replay rows are mixed in
        self.last_kl: float | None = None
        self.share_prefix = False  # set when the model is loaded

    @staticmethod
    def output_name_for(method: str) -> str:
        return "model" if method == "full" else "adapter"

    def load_model(self, model_dir: Path, device: str, precision: str):
        if self.spec.training.distillation.weight > 0:  # the teacher runs (or its cache is read) before the student loads
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            pad_id = pad_id_of(tokenizer)
            self.distiller = Distiller.prepare(self.spec, model_dir, tokenizer, self.teacher_cache, device, pad_id,
                                               self.task_frame, augment.main_tasks(self.task_frame, self.spec, self.tasks))
        model = trainer.load_model(self.spec, model_dir, device, precision)
        self.neftune = augment.attach_neftune(model, self.spec.training.neftune_alpha)
        self.share_prefix = trainer.collates_shared_prefixes(self.spec) and trainer.shares_prefixes(model)
        return model

    def uses_autocast(self, precision: str) -> bool:
        return trainer.uses_autocast(self.name, precision)

    def resolve_precision(self, model_dir, device, items, pad_id, probe_cache):
        return trainer.resolve_precision(self.spec, model_dir, device, items, pad_id, probe_cache)

    def encode(self, tokenizer, frame) -> list[EncodedExample]:
        """Validation rows, rendered with the main template of their task."""
        return trainer.encode_frame(tokenizer, frame, self.spec, augment.main_tasks(frame, self.spec, self.tasks))

    def encode_train(self, tokenizer, frame) -> list[EncodedExample]:
        if frame.empty:  # before replay rows are mixed in
            raise ValueError("the train split is empty")
        self.task_frame = frame
        self.train_frame = augment.with_replay(frame, self.spec)  # general examples mixed in (training.replay)
        return trainer.encode_frame(tokenizer, self.train_frame, self.spec,
                                    augment.row_tasks(self.train_frame, self.spec, self.tasks))

    def length(self, item: EncodedExample) -> int:
        return len(item.input_ids)

    def batch_tokens(self, items: list[EncodedExample]) -> int:
        if self.share_prefix:
            rows = trainer.shared_prefix_rows(items)
            return len(rows) * max(trainer.shared_row_length([e.input_ids for e in r]) for r in rows)
        return super().batch_tokens(items)

    def weight(self, item: EncodedExample) -> int:
        return sum(1 for label in item.labels[1:] if label != IGNORE_INDEX)

    def item_key(self, item: EncodedExample) -> str:
        return str(item.input_ids)

    def identity(self) -> dict:
        return {}  # spec.training already names lora / qlora / full: fingerprints stay as before

    def collate(self, items, pad_id, device):
        return trainer.collate_micro_batch(items, pad_id, device, self.packing, self.share_prefix)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        return trainer.summed_response_loss(model, batch)

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
        return trainer.collate(items, pad_id, device)

    def save(self, model, tokenizer, out_dir: Path, model_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        if self.output_name == "model":  # a whole model: loadable on its own, tokenizer included
            tokenizer.save_pretrained(out_dir)
