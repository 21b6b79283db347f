"""Sequence log-probs, DPO, Bradley-Terry and pairwise accuracy against hand-written formulas (tiny model)."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from pair_batches import collate_pairs, collate_reward_pairs, dpo_batch_loss
from preference_fixtures import one_torch_thread  # noqa: F401

from sft_dagster.formatting import IGNORE_INDEX
from sft_dagster.preference.losses import (
    bradley_terry_loss,
    collate_pair_groups,
    dpo_loss,
    encode_pair,
    encode_pairs,
    group_pairs,
    load_reward_model,
    pair_sides,
    pairwise_accuracy,
    reward_batch_loss,
    reward_input,
    reward_scores,
    sequence_logprobs,
)
from sft_dagster.spec import TaskSpec
from sft_dagster.torchkit import collate, shared_row_length

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASK = TaskSpec(type="qa", prompt_template="Q: {prompt}")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def pairs_of(tokenizer):
    return [encode_pair(tokenizer, TASK, "great product", "positive", "the item is negative really", 128, pair_id="a"),
            encode_pair(tokenizer, TASK, "it is okay, nothing special at all", "neutral", "okay", 128, pair_id="b")]


def reference_sequence_logprob(model, input_ids: list[int], labels: list[int]) -> float:
    """By the book: the full forward pass alone, log-softmax over the vocabulary, gather reply tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    return sum(float(logprobs[t - 1, labels[t]]) for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX)


def sequence_tokens(batch, s: int) -> list[int]:
    """The tokens sequence `s` of a `collate_pair_groups` batch sees at its last token: itself, in order."""
    row, last = batch["sequence_last"][s].tolist()
    return batch["input_ids"][row, : last + 1][batch["attention_mask"][row, 0, last, : last + 1]].tolist()


def test_sequence_logprobs_equal_the_formula_and_ignore_padding(tiny):
    model, tokenizer = tiny
    pairs = pairs_of(tokenizer)
    batch = collate_pair_groups(group_pairs(pairs), tokenizer.pad_token_id, "cpu")
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    lengths = [shared_row_length([p.chosen.input_ids, p.rejected.input_ids]) for p in pairs]
    assert batch["input_ids"].shape == (2, max(lengths)) and min(lengths) < max(lengths)  # a padded row
    assert max(lengths) < max(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)  # prompt shared
    chosen_rows, rejected_rows = (batch[k].tolist() for k in ("chosen_index", "rejected_index"))
    assert [sequence_tokens(batch, s) for s in chosen_rows + rejected_rows] == [e.input_ids for e in sides]
    with torch.no_grad():
        got = torch.cat(pair_sides(sequence_logprobs(model, batch), batch))
        plain = sequence_logprobs(model, collate(sides, tokenizer.pad_token_id, "cpu"))  # one row per side
    expected = [reference_sequence_logprob(model, e.input_ids, e.labels) for e in sides]
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(plain.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"  # takes the mask as an additive float mask
    with torch.no_grad():
        assert torch.allclose(sequence_logprobs(eager, batch), sequence_logprobs(model, batch), atol=1e-5)
    padded = dict(batch, input_ids=batch["input_ids"].clone())
    padded["input_ids"][0 if lengths[0] < lengths[1] else 1, min(lengths):] = 7
    with torch.no_grad():
        assert torch.allclose(sequence_logprobs(model, padded), sequence_logprobs(model, batch), atol=1e-6)
    # Only reply tokens (and the end-of-turn token) are scored: the prompt, the template and the newline
    # after the turn are not.
    e = pairs[0].chosen
    scored = [t for t, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(scored) == "positive<|im_end|>"


def test_shared_prefix_rows_give_the_gradients_of_one_row_per_sequence(tiny, tiny_model_dir):
    """Computing a group's shared tokens once changes no gradient: DPO's and the reward model's losses
    backpropagate to every weight as the one-row-per-sequence batch of the same replies does."""
    model, tokenizer = tiny
    groups = group_pairs(ranked_pairs(tokenizer))

    def plain_batch(cut=None):  # the old layout: one right-padded row per distinct reply
        sequences = [cut(e) if cut else e for g in groups for e in g.sequences]
        batch = collate(sequences, tokenizer.pad_token_id, "cpu")
        offsets = [sum(len(g.sequences) for g in groups[:i]) for i in range(len(groups))]
        for key, side in (("chosen_index", "chosen"), ("rejected_index", "rejected")):
            batch[key] = torch.tensor([o + i for g, o in zip(groups, offsets) for i in getattr(g, side)])
        return batch

    def gradients(net, loss_fn, batch):
        net.zero_grad()
        loss, _ = loss_fn(net, batch)
        loss.backward()
        return float(loss.detach()), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    policy = copy.deepcopy(model).train()  # dropout: none in the tiny model, so both passes see one function
    with torch.no_grad():
        policy.lm_head.weight.add_(0.05 * torch.randn_like(policy.lm_head.weight))
    dpo = lambda net, batch: dpo_batch_loss(net, batch, beta=0.2, reference=model)
    shared = collate_pair_groups(groups, tokenizer.pad_token_id, "cpu")
    assert shared["input_ids"].numel() < plain_batch()["input_ids"].numel()
    for net, loss_fn, cut in ((policy, dpo, None), (load_reward_model(tiny_model_dir, seed=0), reward_batch_loss,
                                                    reward_input)):
        a, grads_a = gradients(net, loss_fn, collate_pair_groups(groups, tokenizer.pad_token_id, "cpu", cut=cut))
        b, grads_b = gradients(net, loss_fn, plain_batch(cut))
        assert a == pytest.approx(b, rel=1e-5)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
        for key in grads_a:
            assert torch.allclose(grads_a[key], grads_b[key], rtol=1e-4, atol=1e-6), key
        assert any(g.abs().sum() > 0 for g in grads_a.values())


def test_gradients_reach_the_reply_context_but_not_padding_or_the_trailing_newline(tiny):
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    pairs = pairs_of(tokenizer)
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = collate(sides, tokenizer.pad_token_id, "cpu")
    captured = {}

    def keep(_, __, output):
        output.retain_grad()
        captured["embeddings"] = output

    handle = model.model.embed_tokens.register_forward_hook(keep)
    sequence_logprobs(model, batch).sum().backward()
    handle.remove()
    grad = captured["embeddings"].grad.abs().sum(-1)  # [rows, positions]
    for row, e in enumerate(sides):
        last_scored = max(i for i, label in enumerate(e.labels) if label != IGNORE_INDEX)
        assert (grad[row, :last_scored] > 0).all()  # the prompt conditions the reply
        assert (grad[row, last_scored:] == 0).all()  # the end-of-turn token predicts nothing scored; pads neither


def test_dpo_loss_equals_the_formula():
    pc, pr = torch.tensor([-3.0, -7.5, -2.0]), torch.tensor([-4.0, -5.0, -9.0])
    rc, rr = torch.tensor([-3.5, -7.0, -2.5]), torch.tensor([-3.0, -5.5, -8.0])
    beta = 0.3
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    terms = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    expected = sum(-math.log(1 / (1 + math.exp(-z))) for z in terms) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    chosen_rewards = [beta * (a - c) for a, c in zip(pc.tolist(), rc.tolist())]
    assert stats["rewards_chosen"] == pytest.approx(sum(chosen_rewards) / 3)
    assert stats["margin"] == pytest.approx(sum(terms) / 3)
    assert stats["accuracy"] == pytest.approx(sum(z > 0 for z in terms) / 3)
    eps = 0.1
    smoothed, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    expected_smoothed = sum((1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z)) for z in terms) / 3
    assert float(smoothed) == pytest.approx(expected_smoothed, rel=1e-6)


def test_dpo_gradients_reach_the_policy_only(tiny):
    model, tokenizer = tiny
    policy, reference = copy.deepcopy(model).train(), copy.deepcopy(model).eval()
    with torch.no_grad():  # make the policy differ from the reference
        policy.lm_head.weight.add_(0.01 * torch.randn_like(policy.lm_head.weight))
    batch = collate_pairs(pairs_of(tokenizer), tokenizer.pad_token_id, "cpu")
    loss, stats = dpo_batch_loss(policy, batch, beta=0.1, reference=reference)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert policy.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # With policy == reference the implicit rewards are 0 and the loss is log 2.
    same, stats = dpo_batch_loss(reference, batch, beta=0.1, reference=reference)
    assert float(same.detach()) == pytest.approx(math.log(2), abs=1e-6) and stats["margin"] == 0.0


def test_dpo_reference_can_be_the_policy_without_its_adapter(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    base = copy.deepcopy(model)
    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False))
    batch = collate_pairs(pairs_of(tokenizer), tokenizer.pad_token_id, "cpu")
    _, stats = dpo_batch_loss(policy, batch, beta=0.1)
    _, explicit = dpo_batch_loss(policy, batch, beta=0.1, reference=base)
    assert stats["margin"] == pytest.approx(explicit["margin"], abs=1e-6) and stats["margin"] != 0.0
    with pytest.raises(ValueError, match="reference model is needed"):
        dpo_batch_loss(base, batch, beta=0.1)


def test_bradley_terry_loss_and_accuracy_equal_the_formula():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.5, 0.5])
    loss, stats = bradley_terry_loss(chosen, rejected)
    expected = sum(math.log1p(math.exp(-(a - b))) for a, b in zip(chosen.tolist(), rejected.tolist())) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert stats["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)  # a tie counts one half
    margin = torch.tensor([0.5, 0.0, 1.0])
    with_margin, _ = bradley_terry_loss(chosen, rejected, margin=margin, center_rewards_coefficient=0.01)
    expected = (sum(math.log1p(math.exp(-(a - b - m))) for a, b, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist())) / 3
                + 0.01 * sum((a + b) ** 2 for a, b in zip(chosen.tolist(), rejected.tolist())) / 3)
    assert float(with_margin) == pytest.approx(expected, rel=1e-6)
    assert pairwise_accuracy([3, 1, 2, 2], [1, 3, 0, 2]) == pytest.approx(2.5 / 4)


def test_reward_model_scores_the_last_reply_token_and_learns(tiny_model_dir, tiny):
    _, tokenizer = tiny
    reward_model = load_reward_model(tiny_model_dir, seed=0)
    again = load_reward_model(tiny_model_dir, seed=0)
    assert torch.equal(reward_model.score.weight, again.score.weight)  # the new head is seeded
    pairs = pairs_of(tokenizer)
    cut = reward_input(pairs[0].chosen)
    assert tokenizer.decode(cut.input_ids[-1:]) == "<|im_end|>"  # the reply's end, not the template's newline
    batch = collate_reward_pairs(pairs, tokenizer.pad_token_id, "cpu")
    sides = [reward_input(p.chosen) for p in pairs] + [reward_input(p.rejected) for p in pairs]
    with torch.no_grad():
        scores = reward_scores(reward_model, batch)
        for s, e in enumerate(sides):  # each side scored alone, by hand: the head on the last token's hidden state
            hidden = reward_model.model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0, -1]
            assert float(scores[s]) == pytest.approx(float(reward_model.score(hidden)), abs=1e-5)
        plain = collate(sides, tokenizer.pad_token_id, "cpu")  # one right-padded row per side: the last real token
        assert (plain["attention_mask"] == 0).any()
        assert torch.allclose(reward_scores(reward_model, plain), scores, atol=1e-5)
        padded = dict(plain, input_ids=plain["input_ids"].masked_fill(plain["attention_mask"] == 0, 7))
        assert torch.allclose(reward_scores(reward_model, padded), scores, atol=1e-5)  # pad ids do not matter
    # A few Bradley-Terry steps separate chosen from rejected on these pairs.
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=1e-2)
    history = []
    for _ in range(15):
        scores = reward_scores(reward_model, batch)
        loss, stats = bradley_terry_loss(*pair_sides(scores, batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(stats)
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["accuracy"] == 1.0


def test_encode_pairs_refuses_pairs_that_do_not_fit(tiny):
    _, tokenizer = tiny
    frame = pd.DataFrame({"pair_id": ["ok", "long"], "prompt": ["q", "q"], "chosen": ["a", "a"],
                          "rejected": ["b", "word " * 200], "system": [None, None], "history": [None, None]})
    with pytest.raises(ValueError, match=r"1 pairs would be truncated at max_length=64.*\['long'\]"):
        encode_pairs(tokenizer, frame, TASK, 64)
    assert [p.pair_id for p in encode_pairs(tokenizer, frame.head(1), TASK, 64)] == ["ok"]


def ranked_pairs(tokenizer) -> list:
    """A full ranking of four replies to one prompt (6 pairs over 4 replies) and one pair of another."""
    replies = ["fine", "good enough", "it is bad", "terrible, broken"]
    ranked = [encode_pair(tokenizer, TASK, "how is it?", replies[i], replies[j], 128, pair_id=f"r{i}{j}")
              for i in range(4) for j in range(i + 1, 4)]
    return ranked + [encode_pair(tokenizer, TASK, "and this one?", "nice", "bad", 128, pair_id="o")]


def test_pairs_of_a_prompt_share_their_replies_and_give_the_same_losses(tiny, tiny_model_dir):
    """Grouping by prompt scores each distinct reply once (4 + 2 sequences instead of 14) and changes no
    loss: DPO, Bradley-Terry and the statistics equal those of the side-by-side batch of the same pairs."""
    model, tokenizer = tiny
    pairs = ranked_pairs(tokenizer)
    groups = group_pairs(pairs)
    assert [g.pair_ids for g in groups] == [[p.pair_id for p in pairs[:6]], ["o"]]
    assert [len(g.sequences) for g in groups] == [4, 2]
    assert groups[0].chosen == [0, 0, 0, 1, 1, 2] and groups[0].rejected == [1, 2, 3, 2, 3, 3]
    grouped = collate_pair_groups(groups, tokenizer.pad_token_id, "cpu")
    flat = collate_pairs(pairs, tokenizer.pad_token_id, "cpu")
    assert len(grouped["sequence_last"]) == 6 and len(flat["sequence_last"]) == 14
    for p, c, r in zip(pairs, grouped["chosen_index"].tolist(), grouped["rejected_index"].tolist()):
        assert sequence_tokens(grouped, c) == p.chosen.input_ids
        assert sequence_tokens(grouped, r) == p.rejected.input_ids

    policy = copy.deepcopy(model)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.05 * torch.randn_like(policy.lm_head.weight))
        a, a_stats = dpo_batch_loss(policy, grouped, beta=0.2, reference=model)
        b, b_stats = dpo_batch_loss(policy, flat, beta=0.2, reference=model)
    assert float(a) == pytest.approx(float(b), rel=1e-5) and a_stats["margin"] != 0.0
    assert a_stats == pytest.approx(b_stats, rel=1e-4, abs=1e-6)

    reward_model = load_reward_model(tiny_model_dir, seed=0)
    with torch.no_grad():
        cut = collate_pair_groups(groups, tokenizer.pad_token_id, "cpu", cut=reward_input)
        a, a_stats = reward_batch_loss(reward_model, cut, center_rewards_coefficient=0.1)
        b, b_stats = reward_batch_loss(reward_model, collate_reward_pairs(pairs, tokenizer.pad_token_id, "cpu"),
                                       center_rewards_coefficient=0.1)
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    assert a_stats == pytest.approx(b_stats, rel=1e-4, abs=1e-6)


def test_reward_fn_scores_each_distinct_reply_once(tiny_model_dir, tiny, monkeypatch):
    """Repeated (prompt, reply) pairs (a sharpened policy's samples) are scored once and get the same
    score as when scored alone."""
    import sft_dagster.preference.losses as losses
    from sft_dagster.preference.ppo import reward_model_fn

    _, tokenizer = tiny
    reward_model = load_reward_model(tiny_model_dir, seed=0).eval()
    rows = []
    real = losses.reward_scores
    monkeypatch.setattr(losses, "reward_scores", lambda model, batch: rows.append(batch["input_ids"].shape[0])
                        or real(model, batch))
    score = reward_model_fn(reward_model, tokenizer, TASK, 128, batch_size=2)
    prompts = ["how is it?", "how is it?", "and this?", "how is it?", "how is it?"]
    replies = ["fine", "fine", "fine", "bad", "fine"]
    scores = score(prompts, replies)
    assert sum(rows) == 3  # (how, fine), (and this, fine), (how, bad)
    assert scores[0] == scores[1] == scores[4] and scores[0] != scores[2]
    alone = [score([p], [r])[0] for p, r in zip(prompts, replies)]
    assert scores == pytest.approx(alone, abs=1e-5)
