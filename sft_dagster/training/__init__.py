"""Training: LoRA, QLoRA or full fine-tuning with a response-only loss, checkpoints and resume."""

from .trainer import TrainingResult, latest_checkpoint, merge_adapter, optimizer_steps, preflight, train

__all__ = ["TrainingResult", "latest_checkpoint", "merge_adapter", "optimizer_steps", "preflight", "train"]
