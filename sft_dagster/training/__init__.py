"""Training: one shared loop (`trainer.run_training`) and one module per method (`methods/`): SFT
(LoRA, QLoRA, full), the reward model, DPO, and PPO over `preference.ppo`."""

from .methods.dpo import train_dpo
from .methods.ppo import train_ppo
from ..preference.scoring import TrainedRewardModel, load_trained_reward_model
from .methods.reward_model import train_reward_model
from .methods.sft import merge_adapter, preflight, train
from .trainer import TrainingResult, latest_checkpoint, optimizer_steps, run_training

__all__ = ["TrainedRewardModel", "TrainingResult", "latest_checkpoint", "load_trained_reward_model", "merge_adapter",
           "optimizer_steps", "preflight", "run_training", "train", "train_dpo", "train_ppo", "train_reward_model"]
