"""One module per training method over the shared loop (`training.trainer.run_training`): `sft` (lora,
qlora, full), `reward_model` (Bradley-Terry), `dpo`, and `ppo` (its own loop, `preference.ppo`).
`base.TrainingMethod` is the interface; docs/training.md says which files a new method touches."""

from .base import TrainingMethod

__all__ = ["TrainingMethod"]
