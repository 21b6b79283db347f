"""Training: one shared loop (`trainer.run_training`) and one module per method (`methods/`): SFT
(LoRA, QLoRA, full), the reward model, DPO, and PPO over `preference.ppo`; `objectives.OBJECTIVES`
registers each objective with its spec settings, method class, entry point and artefact."""

from ..artefacts import merge_adapter
from ..preference.scoring import TrainedRewardModel, load_trained_reward_model
from .methods.dpo import train_dpo
from .methods.kto import train_kto
from .methods.orpo import train_orpo
from .methods.ppo import train_ppo
from .methods.reward_model import train_reward_model
from .methods.sft import preflight, train
from .objectives import OBJECTIVES, Objective, objective
from .trainer import TrainingResult, latest_checkpoint, optimizer_steps, run_training

__all__ = ["OBJECTIVES", "Objective", "TrainedRewardModel", "TrainingResult", "latest_checkpoint",
           "load_trained_reward_model", "merge_adapter", "objective", "optimizer_steps", "preflight", "run_training",
           "train", "train_dpo", "train_kto", "train_orpo", "train_ppo", "train_reward_model"]
