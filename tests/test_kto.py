"""KTO (`training/methods/kto.py`): the loss against the paper's formula by hand; pairs as unpaired
examples; the loop's loss and KL estimate from log-probs by hand (the SFT model as reference, the
mismatched prompt/reply combinations); 8 x 1 = 1 x 8; resume = straight run; refusals."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from preference_fixtures import one_torch_thread  # noqa: F401
from test_preference_training import (
    assert_resume_equals_a_straight_run,
    hand_logps,
    pairs,
    quiet,
    rankings,
    sft_adapter,
    sft_model,
    spec_for,
)

from sft_dagster.spec.preference import KTOConfig
from sft_dagster.training import train_kto
from sft_dagster.training.methods.kto import KTOMethod, kto_loss, unpaired_from_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def paper_kto(ratio: float, desirable: bool, kl: float, beta: float, w_good: float, w_bad: float) -> float:
    """Ethayarajh et al. 2024, eq. 8 with v(x, y) as 1 - value: z_0 = max(0, KL estimate);
    lambda_D (1 - sigma(beta (r - z_0))) for a desirable reply, lambda_U (1 - sigma(beta (z_0 - r))) otherwise."""
    z0 = max(0.0, kl)
    return w_good * (1 - sigmoid(beta * (ratio - z0))) if desirable else w_bad * (1 - sigmoid(beta * (z0 - ratio)))


@pytest.mark.parametrize("kl", [0.7, -0.4])  # a negative estimate is clamped to 0
def test_kto_loss_equals_the_papers_formula(kl):
    policy = torch.tensor([-3.0, -5.5, -2.0, -8.0, -4.0], dtype=torch.float64)
    reference = torch.tensor([-4.0, -5.0, -2.5, -6.0, -4.0], dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False, True])
    losses, stats = kto_loss(policy, reference, desirable, torch.tensor(kl, dtype=torch.float64), beta=0.5,
                             desirable_weight=1.3, undesirable_weight=0.8)
    expected = [paper_kto(p - r, d, kl, 0.5, 1.3, 0.8) for p, r, d in zip(policy.tolist(), reference.tolist(),
                                                                         desirable.tolist())]
    assert losses.tolist() == pytest.approx(expected, rel=1e-10)
    assert stats["kl"] == max(0.0, kl)
    assert stats["desirable_share"] == pytest.approx(0.6)


def test_kto_loss_pushes_good_replies_up_and_bad_ones_down():
    policy = torch.tensor([-3.0, -3.0], requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-3.0, -3.0]), torch.tensor([True, False]), torch.tensor(0.2), beta=0.1)
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descending raises the good reply's log-prob, lowers the bad one's


def test_pairs_become_unpaired_examples_by_their_wins_and_losses():
    one = unpaired_from_pairs(pairs(2))
    assert list(zip(one["response"], one["desirable"])) == [
        ("positive great", True), ("negative great", False), ("positive okay really", True),
        ("negative okay really", False)]
    ranked = unpaired_from_pairs(rankings(1))  # 4 replies ranked: 3, 1, -1, -3 net wins
    assert list(ranked["desirable"]) == [True, True, False, False]
    even = pd.DataFrame([{"pair_id": "a", "prompt": "q", "chosen": "x", "rejected": "y"},
                         {"pair_id": "b", "prompt": "q", "chosen": "y", "rejected": "x"}])
    assert unpaired_from_pairs(even).empty  # a reply that wins and loses alike teaches nothing


def test_kto_loss_in_the_loop_equals_the_formula_with_the_window_kl(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    adapter = sft_adapter(tiny_model_dir, tmp_path / "sft")
    spec = spec_for(tiny_model_dir)
    config = KTOConfig(beta=0.3, desirable_weight=1.5)
    method = KTOMethod(spec, config, adapter)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    frame = pairs(4)
    items = method.encode(tokenizer, frame)
    policy = method.load_model(tiny_model_dir, "cpu", "fp32")
    method.prepare(policy, items, [], tokenizer.pad_token_id, "cpu", "fp32", quiet)
    assert method.reference_sequences == 16  # 8 replies and their 8 mismatched combinations
    torch.manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    policy.eval()
    method.begin_window(policy, items, tokenizer.pad_token_id, "cpu", "fp32")
    loss, n = method.loss(policy, method.collate(items, tokenizer.pad_token_id, "cpu"))
    reference, task = sft_model(tiny_model_dir, adapter), spec.task
    prompts, replies = list(frame["prompt"]), [list(frame["chosen"]), list(frame["rejected"])]
    ratio = lambda prompt, reply: (hand_logps(policy, tokenizer, task, prompt, reply)  # noqa: E731
                                   - hand_logps(reference, tokenizer, task, prompt, reply))
    # The KL estimate: each prompt with the reply of the next prompt (the same side), both sides.
    kl = sum(ratio(prompts[i], side[(i + 1) % 4]) for side in replies for i in range(4)) / 8
    assert float(method.kl) == pytest.approx(kl, rel=1e-4, abs=1e-5)
    assert abs(kl) > 1e-3  # the policy moved: z_ref is not trivially 0
    expected = sum(paper_kto(ratio(prompts[i], replies[s][i]), s == 0, kl, 0.3, 1.5, 1.0)
                   for i in range(4) for s in (0, 1))
    assert n == 8
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)


def test_kto_batch_8x1_equals_batch_1x8(tiny_model_dir, tmp_path):
    """The KL estimate is the window's, so the loss of a step is the same however the window is split."""
    runs = {}
    for name, batch, accumulation in (("8x1", 8, 1), ("1x8", 1, 8)):
        spec = spec_for(tiny_model_dir, batch_size=batch, gradient_accumulation_steps=accumulation, epochs=6,
                        learning_rate=2e-2)
        history = []
        # desirable examples weighted up: the policy's KL to the reference grows, so z_ref > 0 is in play
        train_kto(spec, KTOConfig(beta=0.5, desirable_weight=3.0), tiny_model_dir, None, pairs(8), pairs(4, offset=100),
                  tmp_path / name, device="cpu", log=quiet,
                  on_metrics=lambda m, h=history: h.append((m["train_loss"], m["kl"])))
        runs[name] = history
    assert len(runs["8x1"]) == 6
    assert runs["8x1"][-1][0] < runs["8x1"][0][0] - 0.05  # it trains: the comparison is not of constant curves
    assert runs["8x1"][0][1] == 0 and min(kl for _, kl in runs["8x1"][1:]) > 0.1  # from policy = reference, then apart
    assert [x for row in runs["8x1"] for x in row] == pytest.approx([x for row in runs["1x8"] for x in row],
                                                                    rel=1e-4, abs=1e-6)


def test_kto_resume_equals_a_straight_run(tiny_model_dir, tmp_path):
    trained, start = assert_resume_equals_a_straight_run(train_kto, KTOConfig(), tiny_model_dir, tmp_path)
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k in start)  # it trained away from its start

def test_kto_refuses_train_data_without_both_kinds_of_example(tiny_model_dir, tmp_path):
    good_only = pd.DataFrame([{"example_id": f"e{i}", "prompt": f"q{i}", "system": None, "history": None,
                               "response": "positive", "desirable": True} for i in range(4)])
    with pytest.raises(ValueError, match="needs desirable and undesirable train examples; there are 4 and 0"):
        train_kto(spec_for(tiny_model_dir), KTOConfig(), tiny_model_dir, None, good_only, good_only, tmp_path / "k",
                  device="cpu", log=quiet)
