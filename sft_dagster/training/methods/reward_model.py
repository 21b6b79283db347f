"""The reward model: a Bradley-Terry scorer trained on preference pairs through the shared loop.

The causal checkpoint becomes a sequence classifier with one output (`preference.losses.load_reward_model`,
score head seeded from `training.seed`), LoRA adapters on its body (`training.lora`) and the score head
trained in full (peft's `modules_to_save`). The pairs of a prompt run as one batch item, each distinct
reply scored once (`methods.pairs.PairMethod`); the loss is
`-log sigmoid(r_chosen - r_rejected)` (plus the optional centring term), the mean over the pairs of an
optimizer step. Validation reports the loss and the pairwise accuracy on the held-out pairs.

The saved folder holds the peft adapter with the score head, the tokenizer and `reward_model.json`
(base model, task, max_length); `preference.scoring.load_trained_reward_model` gives it back ready to score.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ... import atomic
from ...preference.losses import collate_pair_groups, load_reward_model, reward_batch_loss, reward_input
from ...preference.scoring import FOLDER, META_FILE
from ...spec import PipelineSpec
from ..fast_lora import use_fast_lora
from ..trainer import run_training
from .base import lora_config
from .pairs import PairMethod, disable_dropout, pair_training_spec


class RewardModelMethod(PairMethod):
    name = objective = "reward_model"
    output_name = FOLDER

    def __init__(self, spec: PipelineSpec, config):
        super().__init__(spec)
        self.config = config

    def identity(self) -> dict:
        return {"method": self.name, "config": self.config.model_dump(mode="json")}

    def load_model(self, model_dir: Path, device: str, precision: str):
        from peft import get_peft_model


        model = get_peft_model(load_reward_model(model_dir, device, seed=self.spec.training.seed),
                               lora_config(self.spec, "SEQ_CLS"))
        use_fast_lora(model)
        if self.config.disable_dropout:
            disable_dropout(model)
        return model

    def collate(self, items, pad_id, device):
        return collate_pair_groups(items, pad_id, device, cut=reward_input)

    def loss(self, model, batch):
        loss, stats = reward_batch_loss(model, batch, center_rewards_coefficient=self.config.center_rewards_coefficient)
        n = len(batch["chosen_index"])
        self.record({k: stats[k] for k in ("accuracy", "margin", "mean_reward")}, n)
        return loss * n, n

    def save(self, model, tokenizer, out_dir: Path, model_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        meta = {"base_model": str(Path(model_dir).resolve()), "task": self.spec.task.model_dump(mode="json"),
                "max_length": self.spec.model.max_length, "seed": self.spec.training.seed}
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))


def train_reward_model(spec: PipelineSpec, config, model_dir: Path, train_pairs: pd.DataFrame, val_pairs: pd.DataFrame,
                       output_dir: Path, device: str = "auto", log: Callable[[str], None] = print,
                       on_metrics: Callable[[dict], None] | None = None, stop_after_steps: int | None = None):
    """Train a Bradley-Terry reward model (`spec.preference.RewardModelConfig`) on pairs (PAIR_COLUMNS);
    epochs, LoRA and seed come from `spec.training`, the batch size (prompts, each with all its pairs) and
    learning rate from `config` where it sets them, else from `spec.training`. Saves
    `output_dir/reward_model` (`preference.scoring.load_trained_reward_model` loads it); metrics carry
    `pairwise_accuracy` of the saved weights on `val_pairs`."""
    spec = pair_training_spec(spec, config)
    result = run_training(RewardModelMethod(spec, config), spec, Path(model_dir), train_pairs, val_pairs,
                          Path(output_dir), device=device, log=log, on_metrics=on_metrics,
                          stop_after_steps=stop_after_steps)
    if stop_after_steps is None:
        result.metrics["pairwise_accuracy"] = result.metrics.get("val_accuracy", float("nan"))
        atomic.write_json(Path(output_dir) / "metrics.json", result.metrics)
    return result
