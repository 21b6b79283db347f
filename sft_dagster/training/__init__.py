"""Training: one shared loop (`trainer.run_training`) and one module per method (`methods/`): SFT
(LoRA, QLoRA, full), the reward model, DPO, and PPO over `preference.ppo`."""

from .trainer import TrainingResult, latest_checkpoint, merge_adapter, optimizer_steps, preflight, run_training, train

_LAZY = {  # imported on first use: preference.losses imports training.trainer, so no import cycle at load time
    "train_reward_model": ".methods.reward_model", "load_trained_reward_model": ".methods.reward_model",
    "TrainedRewardModel": ".methods.reward_model", "train_dpo": ".methods.dpo", "train_ppo": ".methods.ppo",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)


__all__ = ["TrainedRewardModel", "TrainingResult", "latest_checkpoint", "load_trained_reward_model", "merge_adapter",
           "optimizer_steps", "preflight", "run_training", "train", "train_dpo", "train_ppo", "train_reward_model"]
