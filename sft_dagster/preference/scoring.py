"""A trained reward model, loaded to score replies (the PPO reward, the preference report).

`training.methods.reward_model` trains it and saves `FOLDER` under its run folder: the peft adapter with
the score head, the tokenizer and `META_FILE` (base model, task, max_length, seed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import artefacts
from ..spec import TaskSpec
from .losses import load_reward_model
from .ppo import reward_model_fn

FOLDER = artefacts.FOLDERS[artefacts.REWARD_MODEL]  # the folder a reward-model run saves under its output dir
META_FILE = "reward_model.json"


@dataclass
class TrainedRewardModel:
    """A trained reward model ready to score: `model` (merged, eval mode), its tokenizer and settings."""

    model: torch.nn.Module
    tokenizer: object
    task: TaskSpec
    max_length: int
    device: str

    def reward_fn(self, batch_size: int = 16) -> Callable[[list[str], list[str]], list[float]]:
        """`preference.ppo.reward_model_fn` of this model: (prompts, replies) -> scores."""
        return reward_model_fn(self.model, self.tokenizer, self.task, self.max_length, self.device, batch_size)


def load_trained_reward_model(path: str | Path, device: str = "cpu", base_model_dir: str | Path | None = None
                              ) -> TrainedRewardModel:
    """The reward model `training.train_reward_model` saved (the `reward_model` folder, or the run folder above it);
    `base_model_dir` overrides the base model path recorded at training time."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / META_FILE).exists() and (path / FOLDER / META_FILE).exists():
        path = path / FOLDER
    meta = json.loads((path / META_FILE).read_text())
    base = load_reward_model(base_model_dir or meta["base_model"], device, seed=meta.get("seed", 0))
    model = PeftModel.from_pretrained(base, path).merge_and_unload().to(device).eval()
    return TrainedRewardModel(model, AutoTokenizer.from_pretrained(path), TaskSpec.model_validate(meta["task"]),
                              int(meta["max_length"]), device)
