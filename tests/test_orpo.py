"""ORPO (`training/methods/orpo.py`): the loss against the paper's formula, computed by hand; the loop's
loss on real pairs from per-token log-probs by hand (mean, not sum, over the reply's tokens); 8 x 1 =
1 x 8; resume = straight run; its spec errors. Its asset and report: tests/test_policy_objectives_dagster.py."""

from __future__ import annotations

import math

import pytest
import torch
from preference_fixtures import one_torch_thread  # noqa: F401
from test_preference_training import assert_resume_equals_a_straight_run, pairs, quiet, sft_adapter, spec_for

from sft_dagster.spec.preference import ORPOConfig
from sft_dagster.training import train_orpo
from sft_dagster.training.methods.orpo import ORPOMethod, orpo_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def paper_orpo(chosen_mean_logp: float, rejected_mean_logp: float, lam: float) -> float:
    """Hong et al. 2024, eq. 6-7: odds(y|x) = P / (1 - P), P = exp(mean token log-prob);
    L = -mean log P(y_w) - lam * log sigmoid(log(odds_w / odds_l))."""
    p_w, p_l = math.exp(chosen_mean_logp), math.exp(rejected_mean_logp)
    odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
    return -chosen_mean_logp - lam * math.log(1 / (1 + 1 / odds_ratio))


def test_orpo_loss_equals_the_papers_formula():
    chosen = torch.tensor([-0.3, -1.2, -2.5, -0.05], dtype=torch.float64)
    rejected = torch.tensor([-0.9, -0.1, -2.4, -3.0], dtype=torch.float64)
    losses, stats = orpo_loss(chosen, rejected, beta=0.25)
    expected = [paper_orpo(c, r, 0.25) for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert losses.tolist() == pytest.approx(expected, rel=1e-10)
    # Without the log(1 - p) terms (log p_w - log p_l in place of the log odds) the second pair differs a lot.
    naive = -chosen - 0.25 * torch.nn.functional.logsigmoid(chosen - rejected)
    assert abs(float(naive[1]) - expected[1]) > 0.05
    assert stats["accuracy"] == pytest.approx(0.5)  # pairs 1 and 3 prefer the chosen reply's odds
    assert stats["nll"] == pytest.approx(-float(chosen.mean()))


def test_orpo_log_odds_are_finite_near_probability_one():
    """A reply the model is nearly certain of (mean log-prob -1e-7): log(1 - p) by expm1, not 1 - exp."""
    losses, _ = orpo_loss(torch.tensor([-1e-7]), torch.tensor([-1.0]), beta=0.1)
    assert math.isfinite(float(losses[0]))
    assert float(losses[0]) == pytest.approx(paper_orpo(-1e-7, -1.0, 0.1), rel=1e-4)


def hand_token_logprobs(model, tokenizer, task, prompt: str, reply: str) -> list[float]:
    from sft_dagster.formatting import IGNORE_INDEX, build_messages, encode_example

    e = encode_example(tokenizer, build_messages(prompt, reply, None, task), 96)
    ids = torch.tensor([e.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
    return logp[torch.tensor(e.labels[1:]) != IGNORE_INDEX].tolist()


def test_orpo_loss_in_the_loop_uses_the_mean_token_logprob_of_each_reply(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    spec = spec_for(tiny_model_dir)
    method = ORPOMethod(spec, ORPOConfig(beta=0.5), sft_adapter(tiny_model_dir, tmp_path / "sft"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    frame = pairs(5)
    items = method.encode(tokenizer, frame)
    policy = method.load_model(tiny_model_dir, "cpu", "fp32").eval()
    loss, n = method.loss(policy, method.collate(items, tokenizer.pad_token_id, "cpu"))
    stats = method.pop_stats()
    expected, lengths = 0.0, set()
    for prompt, chosen, rejected in zip(frame["prompt"], frame["chosen"], frame["rejected"]):
        c = hand_token_logprobs(policy, tokenizer, spec.task, prompt, chosen)
        r = hand_token_logprobs(policy, tokenizer, spec.task, prompt, rejected)
        lengths |= {len(c), len(r)}
        expected += paper_orpo(sum(c) / len(c), sum(r) / len(r), 0.5)
    assert len(lengths) > 1  # replies of different lengths: a sum in place of the mean would not match
    assert n == 5
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    assert stats["odds_ratio_loss"] > 0


def test_orpo_batch_8x1_equals_batch_1x8_and_prefers_the_chosen_replies(tiny_model_dir, tmp_path):
    runs, results = {}, {}
    for name, batch, accumulation in (("8x1", 8, 1), ("1x8", 1, 8)):
        spec = spec_for(tiny_model_dir, batch_size=batch, gradient_accumulation_steps=accumulation, epochs=6,
                        learning_rate=2e-2)
        history = []
        results[name] = train_orpo(spec, ORPOConfig(beta=0.5), tiny_model_dir, None, pairs(8), pairs(4, offset=100),
                                   tmp_path / name, device="cpu", log=quiet,
                                   on_metrics=lambda m, h=history: h.append(m["train_loss"]))
        runs[name] = history
    assert len(runs["8x1"]) == 6
    assert runs["8x1"][-1] < runs["8x1"][0] - 0.05  # it trains: the comparison is not of constant curves
    assert runs["8x1"] == pytest.approx(runs["1x8"], rel=1e-4)
    assert (results["8x1"].adapter_dir / "adapter_model.safetensors").exists()


def test_orpo_resume_equals_a_straight_run(tiny_model_dir, tmp_path):
    trained, start = assert_resume_equals_a_straight_run(train_orpo, ORPOConfig(), tiny_model_dir, tmp_path)
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k in start)  # it trained away from its start

def test_orpo_settings_that_cannot_succeed_fail_at_load_with_file_line_and_key(tmp_path, tiny_model_dir):
    from test_preference_dagster import write_preference_spec

    from sft_dagster.spec import SpecError, load_spec

    path = write_preference_spec(tmp_path, tiny_model_dir, **{"preference.orpo": {"beta": 0}})
    with pytest.raises(SpecError, match=r"spec\.yaml:\d+: preference\.orpo\.beta"):
        load_spec(path)
    path = write_preference_spec(tmp_path, tiny_model_dir, **{"preference.promotion.candidate": "orpo"})
    with pytest.raises(SpecError, match=r"preference\.promotion\.candidate 'orpo' is not trained"):
        load_spec(path)
