"""Supervised fine-tuning (`training.method: lora | qlora | full`): the response-only causal LM loss.

Everything SFT-specific the shared loop needs: the model per method (`trainer.load_model`: LoRA with
the fused layer, QLoRA's 4-bit base, or every weight), exact loss masks (`formatting.encode_example`),
packing, precision `auto` by measurement, and the saved adapter or full model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...formatting import IGNORE_INDEX, EncodedExample
from .. import trainer
from .base import TrainingMethod


class SFTMethod(TrainingMethod):
    def __init__(self, spec):
        super().__init__(spec)
        self.name = spec.training.method
        self.packing = spec.training.packing
        self.output_name = self.output_name_for(self.name)

    @staticmethod
    def output_name_for(method: str) -> str:
        return "model" if method == "full" else "adapter"

    def load_model(self, model_dir: Path, device: str, precision: str):
        return trainer.load_model(self.spec, model_dir, device, precision)

    def uses_autocast(self, precision: str) -> bool:
        return trainer.uses_autocast(self.name, precision)

    def resolve_precision(self, model_dir, device, items, pad_id, probe_cache):
        return trainer.resolve_precision(self.spec, model_dir, device, items, pad_id, probe_cache)

    def encode(self, tokenizer, frame) -> list[EncodedExample]:
        return trainer.encode_frame(tokenizer, frame, self.spec)

    def length(self, item: EncodedExample) -> int:
        return len(item.input_ids)

    def weight(self, item: EncodedExample) -> int:
        return sum(1 for label in item.labels[1:] if label != IGNORE_INDEX)

    def item_key(self, item: EncodedExample) -> str:
        return str(item.input_ids)

    def identity(self) -> dict:
        return {}  # spec.training already names lora / qlora / full: fingerprints stay as before

    def collate(self, items, pad_id, device):
        return trainer.collate_packed(items, device) if self.packing else trainer.collate(items, pad_id, device)

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        return trainer.summed_response_loss(model, batch)

    def evaluation_collate(self, items, pad_id, device):
        return trainer.collate(items, pad_id, device)

    def save(self, model, tokenizer, out_dir: Path, model_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        if self.output_name == "model":  # a whole model: loadable on its own, tokenizer included
            tokenizer.save_pretrained(out_dir)
