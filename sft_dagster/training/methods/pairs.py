"""What the pair-trained methods (reward model, DPO) share: encoding pairs and their sizes in the loop."""

from __future__ import annotations

from pathlib import Path

import torch

from ...preference import losses
from ...spec import PipelineSpec
from ...torchkit import shared_row_length
from ..fast_lora import use_fast_lora
from .base import TrainingMethod, lora_config


class PairMethod(TrainingMethod):
    """Items are `preference.losses.PairGroup`s (or objects with a `.group`): all the pairs of one prompt,
    over its distinct replies, each reply one sequence of the batch (a full ranking of 4 replies is 6
    pairs over 4 sequences instead of 12 sides), the group one row whose prompt tokens are computed
    once. A pair weighs 1, so the loss of an optimizer step is still the mean over the pairs of its
    accumulation window; `training.batch_size` counts prompts (groups) per micro-batch. Data with one
    pair per prompt (most imported sets) gives groups of one pair, trained exactly as pairs."""

    def encode(self, tokenizer, frame):
        return losses.group_pairs(losses.encode_pairs(tokenizer, frame, self.spec.task, self.spec.model.max_length))

    @staticmethod
    def _group(item):
        return getattr(item, "group", item)

    def length(self, item) -> int:
        """A group fills one row: its shared tokens once, then each reply's own (`collate_pair_groups`)."""
        return shared_row_length([s.input_ids for s in self._group(item).sequences])

    def tokens(self, item) -> int:
        return sum(len(s.input_ids) for s in self._group(item).sequences)

    def weight(self, item) -> int:
        return self._group(item).n_pairs

    def item_key(self, item) -> str:
        group = self._group(item)
        return f"{[s.input_ids for s in group.sequences]}|{group.chosen}|{group.rejected}"


def pair_training_spec(spec: PipelineSpec, config) -> PipelineSpec:
    """`spec` with the method's own `batch_size` (prompts per micro-batch) and `learning_rate` in place of
    training's, where the method's config sets them.

    A prompt's item holds all its pairs (6 for a ranking of 4), so the SFT batch of rows is rarely the
    right number of prompts: at batch 8 the demo's 52 train prompts made 7 optimizer steps an epoch,
    against 36 steps of 8 pairs before pairs were grouped. And the learning rate that makes a LoRA SFT
    imitate its data within an epoch (the demo's 1e-3) is not the one DPO or a reward model wants."""
    update = {k: getattr(config, k, None) for k in ("batch_size", "learning_rate")}
    update = {k: v for k, v in update.items() if v is not None}
    if not update:
        return spec
    return spec.model_copy(update={"training": spec.training.model_copy(update=update)})


def disable_dropout(model) -> None:
    """Dropout off in `model`, in training mode too: every `nn.Dropout` (peft's LoRA dropout among them)
    and the attention dropout of the decoder's attention modules.

    For pair methods (TRL's `disable_dropout`, on by default in its DPO and reward configs): DPO's
    reference log-probs are computed without dropout, so the policy's first step equals its reference
    only without it (loss log 2), and a reply's reward-model score is the same in training and when
    scored. Without the dropout masks, a 20-step SmolLM2 run (benchmarks/preference_throughput.py, 8
    pairs a step) trained at 284.6 tokens/s (DPO) and 308.7 (reward model) where the run before this
    change and the heap change (`torchkit.HeapReleaser`) measured 204.0 and 231.3."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_policy(spec: PipelineSpec, model_dir: Path, start: Path | None, device: str, trainable: bool = True):
    """A causal LM policy with a LoRA adapter: the SFT adapter `start` (trainable, it keeps its own
    LoRA settings), or a full fine-tuned model folder `start` / the base model with a new adapter from
    `spec.training.lora` (B = 0: the policy starts equal to the model it starts from)."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM


    start = Path(start) if start is not None else None
    is_adapter = start is not None and (start / "adapter_config.json").exists()
    base_dir = start if start is not None and not is_adapter else model_dir
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    if is_adapter:
        model = PeftModel.from_pretrained(base, start, is_trainable=trainable)
    else:
        model = get_peft_model(base, lora_config(spec, "CAUSAL_LM"))
    use_fast_lora(model)
    return model
