"""PPO pieces against hand computations and formulas, and the loop learning a programmatic reward."""

from __future__ import annotations

import copy
import math
import re

import pandas as pd
import pytest
import torch
from preference_fixtures import one_torch_thread  # noqa: F401

from sft_dagster.spec.preference import PPOConfig
from sft_dagster.preference.ppo import (
    AdaptiveKLController,
    gae_advantages,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    ppo_train,
    rollout,
    value_loss,
)
from sft_dagster.spec import TaskSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASK = TaskSpec(type="instruction")


def test_gae_equals_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 9.0]])  # 9.0 sits past row 1's reply: ignored
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - .3 = .7; d1 = .9*.3 - .2 = .07; d0 = .9*.2 - .1 = .08
    #        A2 = .7; A1 = .07 + .72*.7 = .574; A0 = .08 + .72*.574 = .49328
    # row 1: the reply ends at t=1 (terminal): d1 = 0 - .5 = -.5; d0 = .5 + .9*.5 - .4 = .55
    #        A1 = -.5; A0 = .55 + .72*(-.5) = .19
    expected = torch.tensor([[0.49328, 0.574, 0.7], [0.19, -0.5, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-6)


def test_rewards_are_the_kl_penalty_plus_the_score_at_the_last_reply_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, 0.0]])
    ref = torch.tensor([[-1.2, -1.0, -0.5], [-1.0, -0.4, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards, kl = per_token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.2, -1.0, 0.0], [-0.5, 0.2, 0.0]]), atol=1e-6)
    assert torch.allclose(rewards, torch.tensor([[-0.02, 0.1, 2.0], [0.05, -0.02 - 1.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="at least one reply token"):
        per_token_rewards(torch.tensor([1.0]), logprobs[:1], ref[:1], torch.zeros(1, 3, dtype=torch.bool), 0.1)


def test_whitening_over_the_masked_entries_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    white = masked_whiten(x, mask)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(white[mask], (kept - kept.mean()) / kept.std(unbiased=True), atol=1e-4)
    assert (white[~mask] == 0).all()
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False)[mask],
                          (kept - kept.mean()) / kept.std() + kept.mean(), atol=1e-4)


def test_clipped_policy_loss_equals_the_formula_and_ignores_masked_tokens():
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    new = torch.tensor([[-0.5, -1.5, -1.05, -0.2]], requires_grad=True)  # ratios e^.5, e^-.5, e^-.05, e^.8
    advantages = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = policy_loss(new, old, advantages, mask, clip_range=0.2)
    terms = []
    for n, o, a in zip([-0.5, -1.5, -1.05], [-1.0] * 3, [1.0, -2.0, 0.5]):
        ratio = math.exp(n - o)
        terms.append(max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
    assert float(loss.detach()) == pytest.approx(sum(terms) / 3, rel=1e-6)
    assert stats["clipfrac"] == pytest.approx(2 / 3)  # the first two ratios are clipped, the third is not
    loss.backward()
    assert new.grad[0, 3] == 0 and new.grad[0, 0] == 0  # masked; and clipped (no gradient past the clip)
    assert new.grad[0, 2] != 0


def test_clipped_value_loss_equals_the_formula():
    values = torch.tensor([[1.0, 0.0, 2.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.1, 0.0]])
    returns = torch.tensor([[2.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    loss, _ = value_loss(values, old, returns, mask, clip_range_value=0.2)
    expected = 0.0
    for v, o, r in [(1.0, 0.5, 2.0), (0.0, 0.1, -1.0)]:
        clipped = o + min(max(v - o, -0.2), 0.2)
        expected += max((v - r) ** 2, (clipped - r) ** 2)
    assert float(loss.detach()) == pytest.approx(0.5 * expected / 2, rel=1e-6)
    loss.backward()
    assert values.grad[0, 2] == 0


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # error clipped to +0.2
    before = ctl.value
    assert ctl.update(5.4, 100) == pytest.approx(before * (1 - 0.1 * 100 / 10000))  # error -0.1
    assert ctl.update(6.0, 100) == pytest.approx(before * (1 - 0.1 * 100 / 10000))  # on target: unchanged


def has_digit(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0 if re.search(r"\d", r) else 0.0 for r in responses]


PROMPTS = pd.DataFrame({"prompt": [f"review {i}: the item is great" for i in range(16)]})


def train_tiny(model_dir, **cfg) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    config = PPOConfig(**({"steps": 20, "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2, "learning_rate": 1e-2,
                           "max_new_tokens": 12, "init_kl_coef": 0.1, "target_kl": 3.0, "kl_horizon": 100} | cfg))
    result = ppo_train(policy, AutoTokenizer.from_pretrained(model_dir), PROMPTS, TASK, has_digit, config, max_length=64,
                       reference=reference, log=lambda _: None)
    return result.history


def test_ppo_learns_a_programmatic_reward_with_bounded_kl(tiny_model_dir):
    # Reward: 1 when the reply contains a digit (10 of the tiny model's 512 tokens): about 0.1 at the start.
    history = train_tiny(tiny_model_dir)
    scores = [h["mean_score"] for h in history]
    kls = [h["kl"] for h in history]
    first, last = sum(scores[:5]) / 5, sum(scores[-10:]) / 10
    assert last >= first + 0.25, scores  # measured: 0.32 -> 0.73
    assert max(kls) < 8.0, kls  # nats per reply, with the adaptive penalty (target 3); measured at most 6.1
    assert history[-1]["kl_coef"] > history[0]["kl_coef"]  # KL above target raised the coefficient
    # The same run without the KL penalty drifts far further from the reference.
    free = train_tiny(tiny_model_dir, init_kl_coef=0.0, adaptive_kl=False)
    assert max(h["kl"] for h in free) > 1.5 * max(kls), ([h["kl"] for h in free], kls)  # measured 16.1


def test_lora_policy_uses_its_base_as_reference(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_dagster.formatting import generation_prompt_ids
    from sft_dagster.preference.ppo import ValueHead, policy_forward

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                              target_modules="all-linear", init_lora_weights=False))
    prompts = [generation_prompt_ids(tokenizer, p, None, TASK) for p in PROMPTS["prompt"][:4]]
    data = rollout(policy, ValueHead(32), tokenizer, prompts, list(PROMPTS["prompt"][:4]), has_digit, [1, 2, 3, 4],
                   max_new_tokens=5)
    with torch.no_grad():
        base_logprobs, _, _ = policy_forward(base, None, data.batch)
    assert torch.allclose(data.ref_logprobs, base_logprobs, atol=1e-5)
    assert not torch.allclose(data.logprobs, data.ref_logprobs, atol=1e-3)
    assert (data.values == 0).all()  # a new value head starts at V = 0
    frozen = {n: p.clone() for n, p in policy.named_parameters() if not p.requires_grad}
    result = ppo_train(policy, tokenizer, PROMPTS.head(4), TASK, has_digit,
                       PPOConfig(steps=2, batch_size=8, mini_batch_size=4, max_new_tokens=5, learning_rate=1e-2),
                       max_length=64, log=lambda _: None)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, frozen.get(n, p * 0)) for n, p in policy.named_parameters() if p.requires_grad)
    # Dropout (0.5 here) is off during rollouts and updates: before any update the ratio is exactly 1.
    assert all(h["start_ratio_error"] < 1e-5 for h in result.history)


def test_prompts_that_leave_no_room_are_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.raises(ValueError, match=r"1 prompts leave no room for max_new_tokens=12.*rows \[1\]"):
        ppo_train(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir),
                  pd.DataFrame({"prompt": ["short", "long " * 60]}), TASK, has_digit, PPOConfig(max_new_tokens=12),
                  max_length=64, log=lambda _: None)
