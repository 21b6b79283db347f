"""PPO for a causal LM policy, as pure functions, and one complete loop (`ppo_train`) built from them.

The pieces (Schulman et al. 2017; for language models Ziegler et al. 2019, Ouyang et al. 2022):

    KL penalty      kl_t = log pi(a_t|s_t) - log ref(a_t|s_t)                      (per reply token)
    reward          r_t = -kl_coef * kl_t, plus the sequence score at the reply's last token
    GAE             delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}
                    (V and A are 0 past the reply's end); returns R_t = A_t + V_t
    whitening       A <- (A - mean(A)) / sqrt(var(A) + 1e-8) over the batch's reply tokens
    policy loss     mean over reply tokens of max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)),
                    rho = exp(log pi_new - log pi_old)
    value loss      0.5 * mean of max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)
    adaptive KL     e = clip(KL / target - 1, -0.2, 0.2);  kl_coef <- kl_coef * (1 + e * n / horizon)

Tensors are [batch, positions] over the shifted sequence (position t scores token t+1), with a boolean
`mask` that is True at reply tokens only, so prompt and padding never carry loss, reward or advantage.
The value head reads the same last hidden state the policy's output layer reads at each position.
`ppo_train` keeps the loop small and explicit so it can later run on the shared trainer: `rollout`
(generate + score), `ppo_update` (the optimisation of one rollout) and the functions above.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..formatting import IGNORE_INDEX, EncodedExample, generation_prompt_ids, pad_id
from ..schema import column_or_none
from ..spec import TaskSpec
from ..torchkit import causal_lm, collate
from .columns import prompt_id_of
from ..spec.preference import PPOConfig
from .generation import sample_continuations, sample_seed
from .losses import logprobs_from_hidden

RewardFn = Callable[[list[str], list[str]], list[float]]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean (unless `shift_mean` is False) and unit variance over the masked entries; 0 elsewhere."""
    mean, variance = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token log-ratio to the reference (the k1 estimator of KL(pi || ref))."""
    return logprobs - ref_logprobs


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last True position (its last reply token)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).argmax(dim=-1)


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl): -kl_coef * kl at every reply token, plus the score at the reply's last token."""
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row needs at least one reply token")
    kl = kl_penalty(logprobs, ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_positions(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns; positions after a row's reply are terminal (V = 0)."""
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    width = values.shape[1]
    for t in reversed(range(width)):
        next_alive = mask_f[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_alive if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * next_alive
        advantages[:, t] = running
    advantages = advantages * mask_f
    return advantages, (advantages + values) * mask_f


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate objective (as a loss to minimise) over reply tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"policy_loss": float(loss.detach()), "clipfrac": float(masked_mean((clipped > unclipped).float(), mask)),
                 "approx_kl": float(0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask))}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> tuple[torch.Tensor, dict]:
    """The clipped value loss over reply tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"value_loss": float(loss.detach()),
                 "value_clipfrac": float(masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask))}
    return loss, stats


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. 2019: moves towards the target KL, at most 20% of the
    error per `horizon` samples."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class ValueHead(torch.nn.Module):
    """V(s_t): a linear layer on the policy's last hidden state at position t."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)  # V = 0 at the start: no value noise in the first advantages
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def policy_forward(policy, value_head: ValueHead | None, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(reply-token logprobs, values, mask), all [B, T-1]; vocabulary logits only at reply tokens."""
    lm = causal_lm(policy)
    hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      use_cache=False).last_hidden_state
    logprobs, mask = logprobs_from_hidden(lm, hidden, batch["labels"])
    values = value_head(hidden[:, :-1]) * mask if value_head is not None else None
    return logprobs, values, mask


@torch.no_grad()
def reference_token_logprobs(policy, batch: dict[str, torch.Tensor], reference=None) -> torch.Tensor:
    """Reply-token logprobs under the reference: `reference`, or the policy with its adapter off."""
    if reference is not None:
        return policy_forward(reference, None, batch)[0]
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("a reference model is needed: the policy has no adapter to switch off")
    with policy.disable_adapter():
        return policy_forward(policy, None, batch)[0]


@dataclass
class Rollout:
    batch: dict[str, torch.Tensor]  # prompt + reply, right-padded; labels are the reply tokens
    prompts: list[str]
    responses: list[str]
    scores: torch.Tensor  # [B]
    logprobs: torch.Tensor  # [B, T-1] under the policy that sampled
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    finished: list[bool]


def rollout(policy, value_head: ValueHead, tokenizer, prompt_ids: list[list[int]], prompt_texts: list[str],
            reward_fn: RewardFn, seeds: list[int], *, max_new_tokens: int, temperature: float = 1.0,
            top_p: float = 1.0, device: str = "cpu", reference=None) -> Rollout:
    """Sample a reply per prompt from the policy, score it, and record logprobs, reference logprobs and values."""
    samples = sample_continuations(policy, tokenizer, prompt_ids, seeds, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens, batch_size=len(prompt_ids), device=device)
    eos = tokenizer.eos_token_id
    responses = [tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True) for ids, _ in samples]
    examples = [EncodedExample(p + ids, [IGNORE_INDEX] * len(p) + ids, False) for p, (ids, _) in zip(prompt_ids, samples)]
    pad = pad_id(tokenizer)
    batch = collate(examples, pad, device)
    scores = torch.tensor([float(s) for s in reward_fn(prompt_texts, responses)], device=device)
    if scores.shape != (len(prompt_ids),):
        raise ValueError(f"reward_fn returned {tuple(scores.shape)} scores for {len(prompt_ids)} replies")
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        logprobs, values, mask = policy_forward(policy, value_head, batch)
        ref_logprobs = reference_token_logprobs(policy, batch, reference)
    policy.train(was_training)
    return Rollout(batch, prompt_texts, responses, scores, logprobs, ref_logprobs, values, mask,
                   [finished for _, finished in samples])


def ppo_update(policy, value_head: ValueHead, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
               data: Rollout, kl_coef: float, config: PPOConfig, rng: random.Random) -> dict:
    """Advantages for one rollout, then `ppo_epochs` passes of clipped policy + value updates in mini-batches."""
    rewards, kl = per_token_rewards(data.scores, data.logprobs, data.ref_logprobs, data.mask, kl_coef)
    advantages, returns = gae_advantages(rewards, data.values, data.mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, data.mask)
    n = len(data.scores)
    totals: dict[str, float] = {}
    updates = 0
    start_ratio_error = None
    for _ in range(config.ppo_epochs):
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, config.mini_batch_size):
            rows = torch.tensor(order[start : start + config.mini_batch_size], device=data.mask.device)
            sub = {k: v[rows] for k, v in data.batch.items()}
            logprobs, values, mask = policy_forward(policy, value_head, sub)
            if start_ratio_error is None:  # nothing has changed yet: the ratio must be 1 at every reply token
                start_ratio_error = float(((logprobs.detach() - data.logprobs[rows]).exp() - 1).abs().masked_fill(~mask, 0).max())
            pg, pg_stats = policy_loss(logprobs, data.logprobs[rows], advantages[rows], mask, config.clip_range)
            vf, vf_stats = value_loss(values, data.values[rows], returns[rows], mask, config.clip_range_value)
            loss = pg + config.vf_coef * vf
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            for key, value in (pg_stats | vf_stats).items():
                totals[key] = totals.get(key, 0.0) + value
            updates += 1
    reply_kl = kl.sum(dim=1)
    return {"mean_score": float(data.scores.mean()), "kl": float(reply_kl.mean()), "kl_coef": kl_coef,
            "mean_reply_tokens": float(data.mask.sum(dim=1).float().mean()),
            "returns": float(masked_mean(returns, data.mask)), "start_ratio_error": start_ratio_error,
            **{k: v / max(1, updates) for k, v in totals.items()}}


@dataclass
class PPOResult:
    history: list[dict] = field(default_factory=list)
    value_head: ValueHead | None = None
    kl_coef: float = 0.0


def ppo_train(policy, tokenizer, prompts: pd.DataFrame, task: TaskSpec, reward_fn: RewardFn, config: PPOConfig, *,
              max_length: int, reference=None, value_head: ValueHead | None = None, device: str = "cpu",
              log: Callable[[str], None] = print, on_step: Callable[[dict], None] | None = None) -> PPOResult:
    """Train `policy` in place with PPO against `reward_fn(prompts, responses) -> scores`.

    prompts: a frame with `prompt` (and optionally `system`, `history`), rendered with the chat
    template; a prompt that leaves no room for `max_new_tokens` within `max_length` is refused.
    reference: the frozen reference model; None takes the policy with its peft adapter switched off.
    Each step samples `batch_size` prompts (a seeded shuffle, cycled), rolls out, and updates. The
    policy is left in eval mode (dropout off).
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    systems = [s if isinstance(s, str) and s else None for s in column_or_none(prompts, "system")]
    histories = column_or_none(prompts, "history")
    texts = [str(p) for p in prompts["prompt"]]
    encoded = [generation_prompt_ids(tokenizer, p, s, task, h) for p, s, h in zip(texts, systems, histories)]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) + config.max_new_tokens > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} prompts leave no room for max_new_tokens={config.max_new_tokens} within "
                         f"max_length={max_length} (refused, not truncated): rows {too_long[:10]}")
    if not encoded:
        raise ValueError("no prompts to train on")
    ids = [prompt_id_of(p, s, h) for p, s, h in zip(texts, systems, histories)]
    if value_head is None:
        value_head = ValueHead(causal_lm(policy).config.hidden_size)
    value_head.to(device)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    controller = (AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon) if config.adaptive_kl
                  else FixedKLController(config.init_kl_coef))
    order: list[int] = []
    result = PPOResult(value_head=value_head)
    # Dropout stays off throughout (as in TRL's PPO): the probability ratio of the first update must be
    # exactly 1, which dropout masks differing between rollout and update would break.
    policy.eval()
    for step in range(1, config.steps + 1):
        while len(order) < config.batch_size:
            cycle = list(range(len(encoded)))
            rng.shuffle(cycle)
            order += cycle
        rows, order = order[: config.batch_size], order[config.batch_size :]
        data = rollout(policy, value_head, tokenizer, [encoded[i] for i in rows], [texts[i] for i in rows], reward_fn,
                       [sample_seed(config.seed, ids[i], step * config.batch_size + j) for j, i in enumerate(rows)],
                       max_new_tokens=config.max_new_tokens,
                       temperature=config.temperature, top_p=config.top_p, device=device, reference=reference)
        stats = {"step": step, **ppo_update(policy, value_head, optimizer, params, data, controller.value, config, rng)}
        controller.update(stats["kl"], config.batch_size)
        result.history.append(stats)
        log(f"ppo step {step}/{config.steps}: score {stats['mean_score']:.3f} kl {stats['kl']:.3f} "
            f"kl_coef {stats['kl_coef']:.4f} policy_loss {stats['policy_loss']:.4f} value_loss {stats['value_loss']:.4f}")
        if on_step is not None:
            on_step(stats)
    result.kl_coef = controller.value
    return result


def reward_model_fn(reward_model, tokenizer, task: TaskSpec, max_length: int, device: str = "cpu",
                    batch_size: int = 16) -> RewardFn:
    """A `reward_fn` that scores (prompt, reply) with a trained reward model (`losses.reward_scores`).

    Identical (prompt, reply) pairs are scored once: a sharpened policy's samples repeat (the demo's DPO
    policy drew the same reply for most of a prompt's 8 samples), and the score is a function of the text.
    """
    from ..formatting import build_messages, encode_example
    from .losses import reward_input, reward_scores

    pad = pad_id(tokenizer)

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        distinct = list(dict.fromkeys(zip(prompts, responses)))
        encoded = [encode_example(tokenizer, build_messages(p, r, None, task), max_length) for p, r in distinct]
        if any(e.truncated for e in encoded):
            raise ValueError(f"a reply does not fit max_length={max_length} for the reward model (refused, not truncated)")
        encoded = [reward_input(e) for e in encoded]
        out: list[float] = []
        for start in range(0, len(encoded), batch_size):
            out += reward_scores(reward_model, collate(encoded[start : start + batch_size], pad, device)).tolist()
        scores = dict(zip(distinct, out))
        return [scores[pair] for pair in zip(prompts, responses)]

    return score

