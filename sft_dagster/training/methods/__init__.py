"""One module per training method over the shared loop (`training.trainer.run_training`): `sft` (lora,
qlora, full), `reward_model` (Bradley-Terry), `dpo`, and `ppo` (its own loop, `preference.ppo`).
`base.TrainingMethod` is the interface; docs/training.md says which files a new method touches."""

from .base import TrainingMethod
from .sft import SFTMethod


def sft_output_name(method: str) -> str:
    """The folder an SFT run of `training.method` saves under its output dir (`model` or `adapter`)."""
    return SFTMethod.output_name_for(method)


__all__ = ["TrainingMethod", "sft_output_name"]
