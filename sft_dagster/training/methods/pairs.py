"""What the pair-trained methods (reward model, DPO, ORPO, KTO) share: encoding pairs and their sizes in the
loop; and what the policies trained from the SFT adapter on pairs share (`PolicyPairMethod`,
`train_pair_policy`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from ... import artefacts
from ...preference import losses
from ...spec import PipelineSpec
from ...torchkit import autocast, shared_row_length
from ..fast_lora import use_fast_lora
from ..trainer import run_training
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


class PolicyPairMethod(PairMethod):
    """A causal LM policy tuned on pairs from the SFT adapter (DPO, ORPO, KTO): it starts from the adapter
    (`load_policy`), with dropout off unless its config says otherwise, the adapter's files in the run's
    identity, and saves a LoRA adapter like SFT's (`output_dir/adapter`)."""

    output_name = artefacts.FOLDERS[artefacts.ADAPTER]

    def __init__(self, spec: PipelineSpec, config, sft_adapter_dir: Path | None = None):
        super().__init__(spec)
        self.config = config
        self.sft_adapter_dir = Path(sft_adapter_dir) if sft_adapter_dir is not None else None

    def identity(self) -> dict:
        start = None
        if self.sft_adapter_dir is not None:
            files = sorted(self.sft_adapter_dir.glob("*.safetensors"))
            start = [str(self.sft_adapter_dir.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                                             for f in files]
        return {"method": self.name, "config": self.config.model_dump(mode="json"), "start": start}

    def load_model(self, model_dir: Path, device: str, precision: str):
        model = load_policy(self.spec, model_dir, self.sft_adapter_dir, device)
        if self.config.disable_dropout:
            disable_dropout(model)
        return model

    def extra_metrics(self) -> dict:
        return {"beta": self.config.beta,
                "sft_adapter_dir": str(self.sft_adapter_dir) if self.sft_adapter_dir else None}


def train_pair_policy(method: PolicyPairMethod, model_dir: Path, train_pairs: pd.DataFrame, val_pairs: pd.DataFrame,
                      output_dir: Path, device: str = "auto", log: Callable[[str], None] = print,
                      on_metrics: Callable[[dict], None] | None = None, stop_after_steps: int | None = None):
    """`method` (built on `pair_training_spec(spec, config)`) through the shared loop; the `train_<name>`
    entry points of the pair-trained policies are this with their own method class."""
    return run_training(method, method.spec, Path(model_dir), train_pairs, val_pairs, Path(output_dir), device=device,
                        log=log, on_metrics=on_metrics, stop_after_steps=stop_after_steps)


@torch.no_grad()
def sequence_logprobs_of(model, groups: list, batch_size: int, pad_id: int, device: str,
                         autocast_precision: str) -> list[list[float]]:
    """log pi(reply | prompt) of every sequence of each `PairGroup` (one list per group, in its sequence
    order), dropout off, in batches of `batch_size` groups sorted by length: the reference pass of DPO
    and KTO, and KTO's estimate of the policy's KL."""
    out: list[list[float] | None] = [None] * len(groups)
    order = sorted(range(len(groups)), key=lambda i: shared_row_length([s.input_ids for s in groups[i].sequences]))
    was_training = model.training
    model.eval()
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        batch = losses.collate_pair_groups([groups[i] for i in chunk], pad_id, device)
        with autocast(device, autocast_precision):
            logps = losses.sequence_logprobs(model, batch).float().cpu().tolist()
        for i in chunk:
            n = len(groups[i].sequences)
            out[i], logps = logps[:n], logps[n:]
    model.train(was_training)
    return out


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
