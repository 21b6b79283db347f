"""PPO as a training entry point: `preference.ppo.ppo_train` from the SFT adapter against a reward model
(or any `reward_fn`), with the SFT model as the KL reference and held-out prompts scored every iteration.

PPO keeps its own loop (rollout, then several clipped updates of the same samples: not the shared
supervised loop's one-pass-per-batch shape); it shares the policy loader with DPO and saves the same
kind of LoRA adapter, plus the value head.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from ... import artefacts, atomic
from ...formatting import generation_prompt_ids
from ...preference.columns import prompt_id_of
from ...preference.generation import sample_continuations, sample_seed
from ...preference.ppo import ppo_train
from ...preference.scoring import load_trained_reward_model
from ...schema import column_or_none
from ...spec import PipelineSpec
from ...torchkit import pick_device
from ..trainer import TrainingResult
from .pairs import load_policy


def held_out_reward(policy, tokenizer, prompts: pd.DataFrame, spec: PipelineSpec, config, reward_fn, device: str
                    ) -> dict:
    """Mean reward and reply length of the policy's replies to `prompts` (seeded sampling with the PPO
    config's temperature and top-p, the same seeds every call, so iterations compare like for like)."""
    systems = [s if isinstance(s, str) and s else None for s in column_or_none(prompts, "system")]
    histories = column_or_none(prompts, "history")
    texts = [str(p) for p in prompts["prompt"]]
    ids = [generation_prompt_ids(tokenizer, p, s, spec.task, h) for p, s, h in zip(texts, systems, histories)]
    seeds = [sample_seed(config.seed + 1, prompt_id_of(p, s, h), 0) for p, s, h in zip(texts, systems, histories)]
    was_training = policy.training
    policy.eval()
    samples = sample_continuations(policy, tokenizer, ids, seeds, temperature=config.temperature, top_p=config.top_p,
                                   max_new_tokens=config.max_new_tokens, batch_size=max(1, len(ids)), device=device)
    policy.train(was_training)
    eos = tokenizer.eos_token_id
    replies = [tokenizer.decode([t for t in out if t != eos], skip_special_tokens=True) for out, _ in samples]
    scores = [float(s) for s in reward_fn(texts, replies)]
    return {"val_mean_reward": sum(scores) / max(1, len(scores)),
            "val_mean_reply_tokens": sum(len(out) for out, _ in samples) / max(1, len(samples)),
            "val_samples": [{"prompt": p, "reply": r, "reward": s} for p, r, s in list(zip(texts, replies, scores))[:3]]}


def train_ppo(spec: PipelineSpec, config, model_dir: Path, sft_adapter_dir: Path | None,
              reward: str | Path | Callable[[list[str], list[str]], list[float]], prompts_train: pd.DataFrame,
              prompts_val: pd.DataFrame, output_dir: Path, device: str = "auto",
              log: Callable[[str], None] = print):
    """PPO (`spec.preference.PPOConfig`) of the SFT adapter (None: the base with a new LoRA adapter
    from `spec.training.lora`) against `reward`: a reward-model folder (`train_reward_model`) or a
    function (prompts, replies) -> scores. The reference for the KL penalty is the SFT model. Metrics:
    per iteration the training reward, KL, KL coefficient, reply length and, on `prompts_val`, the mean
    reward and reply length. Saves `output_dir/adapter` (a peft adapter like SFT's) and
    `output_dir/value_head.pt`."""
    from transformers import AutoTokenizer

    device = pick_device(device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reward_fn = reward if callable(reward) else load_trained_reward_model(reward, device).reward_fn()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(spec.training.seed)
    policy = load_policy(spec, Path(model_dir), sft_adapter_dir, device)
    reference = None  # the policy with its adapter off is the base: right only when there is no SFT adapter
    if sft_adapter_dir is not None:
        reference = load_policy(spec, Path(model_dir), sft_adapter_dir, device, trainable=False).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    start = time.perf_counter()
    history: list[dict] = []
    baseline = held_out_reward(policy, tokenizer, prompts_val, spec, config, reward_fn, device)
    log(f"ppo: held-out mean reward before training {baseline['val_mean_reward']:.3f}")

    def on_step(stats: dict) -> None:
        stats.update(held_out_reward(policy, tokenizer, prompts_val, spec, config, reward_fn, device))
        history.append({k: v for k, v in stats.items() if k != "val_samples"})
        log(f"ppo step {stats['step']}/{config.steps}: held-out reward {stats['val_mean_reward']:.3f} "
            f"reply tokens {stats['val_mean_reply_tokens']:.1f}")

    result = ppo_train(policy, tokenizer, prompts_train, spec.task, reward_fn, config, max_length=spec.model.max_length,
                       reference=reference, device=device, log=log, on_step=on_step)
    out = output_dir / artefacts.FOLDERS[artefacts.ADAPTER]
    with atomic.atomic_dir(out) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
    atomic.torch_save(output_dir / "value_head.pt", result.value_head.state_dict())
    final = history[-1] if history else {}
    metrics = {"method": "ppo", "device": device, "steps": len(history), "config": config.model_dump(mode="json"),
               "sft_adapter_dir": str(sft_adapter_dir) if sft_adapter_dir else None,
               "val_mean_reward_before": baseline["val_mean_reward"], "val_mean_reward": final.get("val_mean_reward"),
               "kl": final.get("kl"), "kl_coef": result.kl_coef, "val_mean_reply_tokens": final.get("val_mean_reply_tokens"),
               "history": history, "val_samples": baseline["val_samples"] if not history else
               held_out_reward(policy, tokenizer, prompts_val, spec, config, reward_fn, device)["val_samples"],
               "seconds": round(time.perf_counter() - start, 2)}
    atomic.write_json(output_dir / "metrics.json", metrics)
    return TrainingResult(adapter_dir=out, method="ppo", metrics=metrics)
