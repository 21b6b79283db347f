"""Reward model, DPO and PPO trained through the shared loop / training entry points on the tiny model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from preference_fixtures import one_torch_thread  # noqa: F401

from sft_dagster.spec.preference import DPOConfig, PPOConfig, RewardModelConfig
from sft_dagster.spec import PipelineSpec
from sft_dagster.training import load_trained_reward_model, train_dpo, train_ppo, train_reward_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spec_for(model_dir: Path, **training) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "p",
        "task": {"type": "instruction"},
        "sources": [{"path": "unused.jsonl"}],
        "model": {"base": str(model_dir), "max_length": 96},
        "training": {"learning_rate": 5e-3, "batch_size": 8, "epochs": 3, "warmup_ratio": 0.0, "precision": "fp32",
                     "early_stopping_patience": None, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}} | training,
    })


def pairs(n: int, offset: int = 0) -> pd.DataFrame:
    """A separable preference: the chosen reply is positive, the rejected one negative (other words vary)."""
    fill = ["great", "okay", "average", "lovely", "broken", "nothing special"]
    rows = []
    for i in range(offset, offset + n):
        extra = fill[i % len(fill)] + " really" * (i % 3)
        rows.append({"pair_id": f"p{i}", "prompt": f"review {i}: the item is {fill[(i + 2) % len(fill)]}",
                     "chosen": f"positive {extra}", "rejected": f"negative {extra}", "system": None, "history": None})
    return pd.DataFrame(rows)


def quiet(_):
    return None


# ---------------------------------------------------------------------------------------------- reward model
def test_reward_model_learns_a_separable_preference(tiny_model_dir, tmp_path):
    spec = spec_for(tiny_model_dir)
    result = train_reward_model(spec, RewardModelConfig(), tiny_model_dir, pairs(48), pairs(16, offset=100),
                                tmp_path / "rm", device="cpu", log=quiet)
    assert result.metrics["pairwise_accuracy"] >= 0.9, result.metrics  # chance is 0.5
    # The saved folder scores on its own: chosen above rejected on held-out pairs, as the metric says.
    loaded = load_trained_reward_model(tmp_path / "rm", "cpu")
    held_out = pairs(16, offset=100)
    score = loaded.reward_fn()
    chosen, rejected = score(list(held_out["prompt"]), list(held_out["chosen"])), score(list(held_out["prompt"]),
                                                                                         list(held_out["rejected"]))
    from sft_dagster.preference.losses import pairwise_accuracy

    assert pairwise_accuracy(chosen, rejected) == pytest.approx(result.metrics["pairwise_accuracy"])


def test_reward_model_with_the_loss_sign_flipped_learns_the_opposite(tiny_model_dir, tmp_path, monkeypatch):
    """The accuracy threshold above is not met by construction: the same run minimising the flipped
    Bradley-Terry loss ranks the held-out pairs the wrong way round."""
    import sft_dagster.preference.losses as losses

    right = losses.bradley_terry_loss
    monkeypatch.setattr(losses, "bradley_terry_loss", lambda c, r, *a, **k: right(r, c, *a, **k))
    result = train_reward_model(spec_for(tiny_model_dir), RewardModelConfig(), tiny_model_dir, pairs(48),
                                pairs(16, offset=100), tmp_path / "rm", device="cpu", log=quiet)
    # the flipped stats measure "rejected above chosen": accuracy of the real orientation is 1 - that
    assert 1 - result.metrics["pairwise_accuracy"] < 0.5


# ----------------------------------------------------------------------------------------------------- DPO
def sft_adapter(model_dir: Path, out: Path, seed: int = 7, dropout: float = 0.0) -> Path:
    """A LoRA adapter with random weights, standing in for the SFT adapter: the SFT model differs from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                      init_lora_weights=False))
    model.save_pretrained(out)
    return out


def sft_model(model_dir: Path, adapter: Path):
    from sft_dagster.evaluation import load_tuned_model

    return load_tuned_model(model_dir, adapter, "lora", "cpu")


def hand_logps(model, tokenizer, task, prompt: str, reply: str) -> float:
    """log p(reply tokens and end-of-turn | prompt) from a full forward, log-softmax and gather."""
    from sft_dagster.formatting import IGNORE_INDEX, build_messages, encode_example

    e = encode_example(tokenizer, build_messages(prompt, reply, None, task), 96)
    ids = torch.tensor([e.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    labels = torch.tensor(e.labels[1:])
    logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
    return float(logp[labels != IGNORE_INDEX].sum())


def test_dpo_loss_in_the_loop_equals_the_formula_and_the_reference_is_cached_once(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from sft_dagster.training.methods.dpo import DPOMethod

    adapter = sft_adapter(tiny_model_dir, tmp_path / "sft")
    spec = spec_for(tiny_model_dir)
    method = DPOMethod(spec, DPOConfig(beta=0.3, label_smoothing=0.1), adapter)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    frame = pairs(6)
    items = method.encode(tokenizer, frame)
    policy = method.load_model(tiny_model_dir, "cpu", "fp32")
    method.prepare(policy, items, [], tokenizer.pad_token_id, "cpu", "fp32", quiet)
    assert method.reference_sequences == 12
    # Cached reference log-probs = the SFT model's, recomputed by hand (not the base model's).
    reference = sft_model(tiny_model_dir, adapter)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref_c = [hand_logps(reference, tokenizer, spec.task, p, c) for p, c in zip(frame["prompt"], frame["chosen"])]
    ref_r = [hand_logps(reference, tokenizer, spec.task, p, r) for p, r in zip(frame["prompt"], frame["rejected"])]
    assert [i.reference[i.group.chosen[0]] for i in items] == pytest.approx(ref_c, abs=1e-4)
    assert [i.reference[i.group.rejected[0]] for i in items] == pytest.approx(ref_r, abs=1e-4)
    base_c = [hand_logps(base, tokenizer, spec.task, p, c) for p, c in zip(frame["prompt"], frame["chosen"])]
    assert max(abs(a - b) for a, b in zip(base_c, ref_c)) > 1e-2  # the check above can tell SFT from base
    # Move the policy away from the reference, then the loop's loss must equal the formula.
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    policy.eval()
    loss, n = method.loss(policy, method.collate(items, tokenizer.pad_token_id, "cpu"))
    stats = method.pop_stats()
    pol_c = [hand_logps(policy, tokenizer, spec.task, p, c) for p, c in zip(frame["prompt"], frame["chosen"])]
    pol_r = [hand_logps(policy, tokenizer, spec.task, p, r) for p, r in zip(frame["prompt"], frame["rejected"])]
    expected = 0.0
    for pc, pr, rc, rr in zip(pol_c, pol_r, ref_c, ref_r):
        z = 0.3 * ((pc - rc) - (pr - rr))
        expected += -(0.9 * math.log(1 / (1 + math.exp(-z))) + 0.1 * math.log(1 / (1 + math.exp(z))))
    assert n == 6
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    margin = sum(0.3 * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in zip(pol_c, pol_r, ref_c, ref_r)) / 6
    assert stats["margin"] == pytest.approx(margin, rel=1e-3, abs=1e-5)
    assert stats["logps_chosen"] == pytest.approx(sum(pol_c) / 6, rel=1e-4)


def test_dpo_trains_from_the_sft_adapter_and_saves_an_adapter_like_sft(tiny_model_dir, tmp_path):
    adapter = sft_adapter(tiny_model_dir, tmp_path / "sft")
    spec = spec_for(tiny_model_dir, epochs=4)
    history = []
    result = train_dpo(spec, DPOConfig(beta=0.5), tiny_model_dir, adapter, pairs(24), pairs(8, offset=100),
                       tmp_path / "dpo", device="cpu", log=quiet, on_metrics=history.append)
    # Step 1: the policy is the SFT model, which is the reference: loss log 2, margin 0.
    assert history[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    assert history[-1]["margin"] > 0.1 and history[-1]["train_loss"] < math.log(2) - 0.05
    assert {"logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected", "accuracy"} <= set(history[-1])
    # The reference ran once per pair (train + validation, 2 rows each), not per step.
    assert result.metrics["reference_sequences"] == 2 * (24 + 8)
    assert result.metrics["steps"] == 12
    assert result.metrics["val_accuracy"] > 0.5
    # Loadable exactly like an SFT adapter.
    from sft_dagster.evaluation import load_tuned_model

    assert result.adapter_dir == tmp_path / "dpo" / "adapter"
    tuned = load_tuned_model(tiny_model_dir, result.adapter_dir, "lora", "cpu")
    sft = sft_model(tiny_model_dir, adapter)
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    assert not torch.allclose(tuned(input_ids=ids).logits, sft(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("disable", [True, False])
def test_dpo_policy_trains_without_dropout_unless_asked(tiny_model_dir, tmp_path, disable):
    """The SFT adapter was trained with LoRA dropout 0.2; the reference log-probs are computed without
    dropout. With dropout off (the default, as TRL's), the first step's policy is the reference exactly:
    loss log 2; with it on, the policy's log-probs are noisy and the first loss is not log 2."""
    adapter = sft_adapter(tiny_model_dir, tmp_path / "sft", dropout=0.2)
    history = []
    train_dpo(spec_for(tiny_model_dir, epochs=1), DPOConfig(beta=0.5, disable_dropout=disable), tiny_model_dir,
              adapter, pairs(8), pairs(4, offset=100), tmp_path / "dpo", device="cpu", log=quiet,
              on_metrics=history.append)
    gap = abs(history[0]["train_loss"] - math.log(2))
    assert (gap < 1e-5) if disable else (gap > 1e-4), history[0]


@pytest.mark.parametrize("disable", [True, False])
def test_reward_model_scores_alike_in_training_unless_dropout_is_asked_for(tiny_model_dir, tmp_path, disable):
    from sft_dagster.training.methods.reward_model import RewardModelMethod

    spec = spec_for(tiny_model_dir, lora={"r": 4, "alpha": 8, "dropout": 0.2})
    method = RewardModelMethod(spec, RewardModelConfig(disable_dropout=disable))
    model = method.load_model(tiny_model_dir, "cpu", "fp32").train()
    with torch.no_grad():  # a random head and B = 0: move B so that the LoRA branch (and its dropout) counts
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[1, 5, 9, 14, 20, 7]])
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second) == disable


def test_dpo_batch_8x1_equals_batch_1x8(tiny_model_dir, tmp_path):
    """The loss of a step is the mean over the pairs of its accumulation window, however it is split
    (8 pairs: each step's window holds all of them, in either shape, as in the SFT test)."""
    runs = {}
    for name, batch, accumulation in (("8x1", 8, 1), ("1x8", 1, 8)):
        spec = spec_for(tiny_model_dir, batch_size=batch, gradient_accumulation_steps=accumulation, epochs=6,
                        learning_rate=2e-2)
        history = []
        train_dpo(spec, DPOConfig(beta=0.5), tiny_model_dir, None, pairs(8), pairs(4, offset=100), tmp_path / name,
                  device="cpu", log=quiet, on_metrics=lambda m, h=history: h.append(m["train_loss"]))
        runs[name] = history
    assert len(runs["8x1"]) == 6
    assert runs["8x1"][-1] < runs["8x1"][0] - 0.05  # it trains: the comparison is not of constant curves
    assert runs["8x1"] == pytest.approx(runs["1x8"], rel=1e-4)


def rankings(n_prompts: int, offset: int = 0) -> pd.DataFrame:
    """Full rankings of four replies per prompt, as the demo's: 6 pairs over 4 distinct replies each."""
    replies = ["positive great", "positive okay", "negative okay", "negative broken"]
    return pd.DataFrame([{"pair_id": f"q{q}:{i}{j}", "prompt": f"review {q}: how was it?", "chosen": f"{replies[i]} {q}",
                          "rejected": f"{replies[j]} {q}", "system": None, "history": None}
                         for q in range(offset, offset + n_prompts) for i in range(4) for j in range(i + 1, 4)])


@pytest.mark.parametrize("train", ["dpo", "reward_model"])
def test_pairs_grouped_by_prompt_train_exactly_like_separate_pairs(tiny_model_dir, tmp_path, monkeypatch, train):
    """The pairs of a prompt are one item over its distinct replies: the reference runs once per reply
    (16, not 48 sides) and the loss trajectory equals that of the same pairs as separate items."""
    import sft_dagster.preference.losses as losses

    def run(name: str, batch_size: int):
        spec = spec_for(tiny_model_dir, batch_size=batch_size, epochs=4, learning_rate=2e-2)
        history = []
        kwargs = dict(device="cpu", log=quiet, on_metrics=lambda m: history.append(m["train_loss"]))
        if train == "dpo":
            result = train_dpo(spec, DPOConfig(beta=0.5), tiny_model_dir, None, rankings(4), rankings(1, offset=9),
                               tmp_path / name, **kwargs)
        else:
            result = train_reward_model(spec, RewardModelConfig(), tiny_model_dir, rankings(4), rankings(1, offset=9),
                                        tmp_path / name, **kwargs)
        return result, history

    grouped, grouped_losses = run("grouped", 4)  # 4 prompts, each one item of 6 pairs: one step per epoch
    monkeypatch.setattr(losses, "group_pairs", lambda pairs: [losses.PairGroup([p.pair_id], [p.chosen, p.rejected],
                                                                               [0], [1]) for p in pairs])
    separate, separate_losses = run("separate", 24)  # the same 24 pairs as 24 items: one step per epoch
    assert grouped.metrics["steps"] == separate.metrics["steps"] == 4
    assert grouped_losses[-1] < grouped_losses[0] - 0.05  # it trains: the comparison is not of constant curves
    assert grouped_losses == pytest.approx(separate_losses, rel=1e-4)
    assert grouped.metrics["trained_tokens"] < separate.metrics["trained_tokens"] / 2
    if train == "dpo":
        assert grouped.metrics["reference_sequences"] == 4 * 4 + 4  # distinct replies of train + validation
        assert separate.metrics["reference_sequences"] == 2 * 6 * 5


def test_pair_methods_count_their_own_batch_size_in_prompts(tiny_model_dir, tmp_path):
    spec = spec_for(tiny_model_dir, batch_size=8, epochs=1)  # 8 would hold all 4 prompts: one step
    dpo = train_dpo(spec, DPOConfig(batch_size=1), tiny_model_dir, None, rankings(4), rankings(1, offset=9),
                    tmp_path / "dpo", device="cpu", log=quiet)
    assert dpo.metrics["steps"] == 4  # one prompt (its 6 pairs) per step
    rm = train_reward_model(spec, RewardModelConfig(batch_size=2), tiny_model_dir, rankings(4), rankings(1, offset=9),
                            tmp_path / "rm", device="cpu", log=quiet)
    assert rm.metrics["steps"] == 2
    assert train_dpo(spec, DPOConfig(), tiny_model_dir, None, rankings(4), rankings(1, offset=9), tmp_path / "dpo8",
                     device="cpu", log=quiet).metrics["steps"] == 1


@pytest.mark.parametrize("train", ["dpo", "reward_model"])
def test_pair_methods_take_their_own_learning_rate(tiny_model_dir, tmp_path, train):
    spec = spec_for(tiny_model_dir, batch_size=1, epochs=1, learning_rate=5e-3)
    rates = {}
    for name, lr in (("own", 1e-3), ("training", None)):
        seen = []
        args = (tiny_model_dir, rankings(2), rankings(1, offset=9), tmp_path / name)
        if train == "dpo":
            train_dpo(spec, DPOConfig(learning_rate=lr), args[0], None, *args[1:], device="cpu", log=quiet,
                      on_metrics=lambda m: seen.append(m["lr"]))
        else:
            train_reward_model(spec, RewardModelConfig(learning_rate=lr), *args, device="cpu", log=quiet,
                               on_metrics=lambda m: seen.append(m["lr"]))
        rates[name] = seen[0]
    assert rates["own"] == pytest.approx(rates["training"] * 1e-3 / 5e-3)


def assert_resume_equals_a_straight_run(train, config, tiny_model_dir: Path, tmp_path: Path):
    """A pair-trained policy (`train_dpo`, `train_orpo`, `train_kto`) stopped after 4 steps and resumed
    saves the adapter of a straight run; returns (its tensors, the SFT adapter's it started from)."""
    from safetensors.torch import load_file

    adapter = sft_adapter(tiny_model_dir, tmp_path / "sft")
    spec = spec_for(tiny_model_dir, epochs=2, batch_size=4, checkpoint_every_steps=2, lora={"r": 4, "alpha": 8,
                                                                                               "dropout": 0.1})
    args = (spec, config, tiny_model_dir, adapter, pairs(16), pairs(4, offset=100))
    straight = train(*args, tmp_path / "straight", device="cpu", log=quiet)
    train(*args, tmp_path / "resumed", device="cpu", log=quiet, stop_after_steps=4)
    resumed = train(*args, tmp_path / "resumed", device="cpu", log=quiet)
    assert resumed.metrics["resumed_from_step"] == 4
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    return a, load_file(adapter / "adapter_model.safetensors")


def test_dpo_resume_equals_a_straight_run(tiny_model_dir, tmp_path):
    assert_resume_equals_a_straight_run(train_dpo, DPOConfig(), tiny_model_dir, tmp_path)


# ----------------------------------------------------------------------------------------------------- PPO
def has_digit(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0 if re.search(r"\d", r) else 0.0 for r in responses]


def untied_copy(model_dir: Path, out: Path) -> Path:
    """The tiny model with its output layer untied from the input embeddings (LoRA may adapt it alone)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


# peft saves the adapted output layer's base weights with the adapter and says so
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
def test_ppo_entry_point_improves_held_out_reward_with_bounded_kl(tiny_model_dir, tmp_path):
    # LoRA on the output layer too: the tiny random model's logits stay near 0 whatever its decoder
    # layers do (its lm_head is small and the final norm rescales), so adapters there alone barely move
    # the policy (measured: held-out reward flat at 0.19 over 15 steps with all-linear LoRA).
    tiny_model_dir = untied_copy(tiny_model_dir, tmp_path / "untied")
    spec = spec_for(tiny_model_dir, lora={"r": 8, "alpha": 16, "dropout": 0.0,
                                          "target_modules": ["q_proj", "v_proj", "lm_head"]})
    prompts = pd.DataFrame({"prompt": [f"review {i}: the item is great" for i in range(16)]})
    held_out = pd.DataFrame({"prompt": [f"review {i}: the item is okay" for i in range(100, 116)]})
    config = PPOConfig(steps=15, batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=3e-2, max_new_tokens=12,
                       init_kl_coef=0.1, target_kl=3.0, kl_horizon=100)
    result = train_ppo(spec, config, tiny_model_dir, None, has_digit, prompts, held_out, tmp_path / "ppo",
                       device="cpu", log=quiet)
    history = result.metrics["history"]
    assert len(history) == 15 and {"kl", "val_mean_reward", "val_mean_reply_tokens", "mean_score"} <= set(history[0])
    late = sum(h["val_mean_reward"] for h in history[-8:]) / 8
    before = result.metrics["val_mean_reward_before"]
    assert late >= before + 0.25, (before, [h["val_mean_reward"] for h in history])  # measured 0.19 -> 0.64
    kls = [h["kl"] for h in history]
    assert max(kls) < 15.0, kls  # nats per reply; measured at most 10.4 (target 3)
    assert history[-1]["kl_coef"] > history[0]["kl_coef"]  # KL above target raised the penalty
    assert (tmp_path / "ppo" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "ppo" / "value_head.pt").exists()
