"""What a training run leaves behind, where, and how it is loaded: one place for the artefact kinds.

A run has an *objective* (what it optimises: `sft`, `dpo`, `reward_model`, `ppo`; the registry in
`training/objectives.py`) and saves an *artefact*. For SFT the artefact is `training.adapter`: a LoRA
or QLoRA adapter on the base model (`lora`, `qlora`) or every weight (`full`); DPO and PPO save a LoRA
adapter, the reward model its own folder (`preference/scoring.py` loads it), and a few-shot prompt
model (`prompt_model.py`) a prompt and no weights.

Records (the adapter asset, the registry, a preference run) name what they hold by `method`: the SFT
adapter kind, the preference objective (`dpo`, `ppo`) or `few_shot`. `kind_of(method)` is the one
answer to "a whole model or an adapter", `folder_for(method)` the one folder name under a run's
output dir, `load_tuned_model` the one loader.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import atomic, prompt_model

ADAPTER, MODEL, PROMPT, REWARD_MODEL = "adapter", "model", "prompt", "reward_model"  # the artefact kinds
FOLDERS = {ADAPTER: "adapter", MODEL: "model", PROMPT: prompt_model.FOLDER, REWARD_MODEL: "reward_model"}


def kind_of(method: str) -> str:
    """The artefact a record's `method` names: `model` (full fine-tuning: every weight, the tokenizer),
    `prompt` (a few-shot prompt model), `reward_model`, else `adapter` (lora, qlora, dpo, ppo)."""
    if method == "full":
        return MODEL
    if method == prompt_model.METHOD:
        return PROMPT
    if method == REWARD_MODEL:
        return REWARD_MODEL
    return ADAPTER


def is_whole_model(method: str) -> bool:
    """Whether the artefact loads on its own (no base model, nothing to merge)."""
    return kind_of(method) == MODEL


def folder_for(method: str) -> str:
    """The folder a run of `method` saves under its output dir."""
    return FOLDERS[kind_of(method)]


def load_tuned_model(model_dir: Path, adapter_dir: Path, method: str, device: str, base=None):
    """A fine-tuned model as it is served: a full model directory, or a LoRA/QLoRA adapter merged into the
    full-precision base (merged weights score exactly like the adapter and generate faster)."""
    from transformers import AutoModelForCausalLM

    kind = kind_of(method)
    if kind == PROMPT:
        raise prompt_model.PromptModelError(f"{adapter_dir} is a few-shot prompt model: it has no weights of its own; "
                                            "load the base model and prompt it with the examples in its prompt.json")
    if kind == MODEL:
        return AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32).to(device).eval()
    from peft import PeftModel

    base = base if base is not None else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(device).eval()


def merge_adapter(model_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Fold a LoRA adapter into the base weights: one safetensors model for serving, no peft needed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).merge_and_unload()
    with atomic.atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    return out_dir
