"""Sequence log-probabilities, the DPO loss, the Bradley-Terry reward-model loss and pairwise accuracy.

A pair becomes two conversations through the base model's chat template (`formatting.build_messages`
and `encode_example`): the reply tokens and their end-of-turn token are the only positions scored,
exactly the SFT loss mask. Log-probabilities compute vocabulary logits only at those positions (the
prompt never goes through the output layer), as `torchkit.summed_response_loss` does.

    log pi(y|x)  = sum over reply tokens t of log softmax(logits_{t-1})[y_t]
    DPO          = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))
    conservative = (1 - eps) * DPO(delta) + eps * DPO(-delta)                     (label_smoothing eps)
    Bradley-Terry = -log sigmoid(r(x, y_w) - r(x, y_l) - margin)                   (+ c * (r_w + r_l)^2)

References: Rafailov et al. 2023 (DPO); Mitchell 2023 (conservative DPO); Bradley & Terry 1952,
Ouyang et al. 2022 (reward model); Eisenstein et al. 2023 (reward centring).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from ..formatting import IGNORE_INDEX, EncodedExample, build_messages, encode_example, pad_id
from ..spec import TaskSpec
from ..torchkit import causal_lm, collate_shared_prefix, decoder_hidden, response_logits


@dataclass
class EncodedPair:
    pair_id: str
    chosen: EncodedExample
    rejected: EncodedExample


def encode_pair(tokenizer, task: TaskSpec, prompt: str, chosen: str, rejected: str, max_length: int,
                system: str | None = None, history=None, pair_id: str = "") -> EncodedPair:
    """Both sides of a pair through the chat template; reply tokens (and end-of-turn) carry the labels."""
    def side(reply: str) -> EncodedExample:
        return encode_example(tokenizer, build_messages(prompt, reply, system, task, history), max_length)

    return EncodedPair(pair_id, side(chosen), side(rejected))


def encode_pairs(tokenizer, pairs: pd.DataFrame, task: TaskSpec, max_length: int) -> list[EncodedPair]:
    """Every pair encoded; refuses (never truncates) pairs with a side over `max_length` or without reply tokens."""
    encoded, refused = [], []
    systems = pairs["system"] if "system" in pairs else [None] * len(pairs)
    histories = pairs["history"] if "history" in pairs else [None] * len(pairs)
    for pair_id, prompt, chosen, rejected, system, history in zip(
            pairs["pair_id"], pairs["prompt"], pairs["chosen"], pairs["rejected"], systems, histories):
        pair = encode_pair(tokenizer, task, prompt, chosen, rejected, max_length,
                           system if isinstance(system, str) else None, history if isinstance(history, str) else None,
                           str(pair_id))
        if any(e.truncated or e.n_loss_tokens == 0 for e in (pair.chosen, pair.rejected)):
            refused.append(str(pair_id))
        encoded.append(pair)
    if refused:
        raise ValueError(f"{len(refused)} pairs would be truncated at max_length={max_length} or carry no reply "
                         f"token; the over_length gate should have quarantined them: {refused[:10]}")
    return encoded


@dataclass
class PairGroup:
    """The pairs that share a prompt, over its distinct replies: each reply is one sequence, encoded and
    scored once however many pairs it is in. A full ranking of K replies gives K(K-1)/2 pairs over K
    sequences (6 pairs over 4 for the demo's K=4), so scoring sequences rather than pair sides does a
    third of the forward work at K=4 for the same losses; InstructGPT trains its reward model on all
    comparisons of a prompt as one batch element for the same reason (Ouyang et al. 2022, sec. 3.5)."""

    pair_ids: list[str]
    sequences: list[EncodedExample]
    chosen: list[int]  # per pair: the index of its chosen reply in `sequences`
    rejected: list[int]

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)


def group_pairs(pairs: list[EncodedPair]) -> list[PairGroup]:
    """Encoded pairs grouped by prompt (the tokens before the reply), in order of first appearance; the
    sides are kept once per distinct token sequence."""
    groups: dict[tuple, tuple[PairGroup, dict[tuple, int]]] = {}
    for pair in pairs:
        key = tuple(pair.chosen.input_ids[: _reply_start(pair.chosen)])
        if key not in groups:
            groups[key] = (PairGroup([], [], [], []), {})
        group, index = groups[key]
        sides = []
        for side in (pair.chosen, pair.rejected):
            tokens = tuple(side.input_ids)
            if tokens not in index:
                index[tokens] = len(group.sequences)
                group.sequences.append(side)
            sides.append(index[tokens])
        group.pair_ids.append(pair.pair_id)
        group.chosen.append(sides[0])
        group.rejected.append(sides[1])
    return [group for group, _ in groups.values()]


def _reply_start(encoded: EncodedExample) -> int:
    return next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)


def collate_pair_groups(groups: list[PairGroup], pad_id: int, device: str, cut=None) -> dict[str, torch.Tensor]:
    """One row per group (`torchkit.collate_shared_prefix`): the tokens its sequences share
    (the chat template's system turn and the prompt, sometimes a reply's first words) computed once,
    then each reply's own tokens; with `chosen_index` / `rejected_index`, each pair's chosen and
    rejected sequence (sequences numbered in group order). On the throughput benchmark's demo pairs
    (one pair per prompt) the rows hold 10,866 tokens where one row per reply holds 17,117 (1.58x
    fewer; a ranking of four replies shares its prompt four ways). `cut` maps a sequence to the tokens
    scored (`reward_input`)."""
    batch = collate_shared_prefix([[cut(e) if cut else e for e in g.sequences] for g in groups], pad_id, device)
    offsets = [0]
    for group in groups:
        offsets.append(offsets[-1] + len(group.sequences))
    for key, side in (("chosen_index", "chosen"), ("rejected_index", "rejected")):
        batch[key] = torch.tensor([o + i for g, o in zip(groups, offsets) for i in getattr(g, side)], dtype=torch.long,
                                  device=device)
    return batch


def pair_sides(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) per pair of a per-sequence tensor of a `collate_pair_groups` batch."""
    return values[batch["chosen_index"]], values[batch["rejected_index"]]


def response_token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) at each reply position: (logprobs [B, T-1], mask [B, T-1]); 0 where the mask is False.

    Position t holds the log-probability of token t+1 given tokens <= t. Vocabulary logits are computed
    only where the mask is True.
    """
    lm = causal_lm(model)
    return logprobs_from_hidden(lm, decoder_hidden(lm.model, batch), batch["labels"])


def logprobs_from_hidden(lm, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_token_logprobs` from the decoder's last hidden states (shared with the PPO value head)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = lm.lm_head(hidden[:, :-1][mask]).float()
    picked = -F.cross_entropy(logits, targets[mask], reduction="none")
    out = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(mask, picked), mask


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(reply | prompt) per sequence: the sum over its reply tokens (per row of a plain batch, per
    sequence of a `collate_pair_groups` batch)."""
    if "token_sequence" not in batch:
        logprobs, _ = response_token_logprobs(model, batch)
        return logprobs.sum(dim=-1)
    logits, targets = response_logits(model, batch)
    picked = -F.cross_entropy(logits, targets, reduction="none")
    out = torch.zeros(len(batch["sequence_last"]), dtype=picked.dtype, device=picked.device)
    return out.index_add(0, batch["token_sequence"], picked)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The DPO sigmoid loss (mean over pairs) and its statistics.

    Implicit rewards are beta * (log pi - log ref) per side (detached); `accuracy` is the share of pairs
    whose chosen reward is higher, `margin` the mean reward difference.
    """
    chosen_ratio = policy_chosen - reference_chosen.detach()
    rejected_ratio = policy_rejected - reference_rejected.detach()
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    stats = {
        "loss": float(losses.mean().detach()),
        "rewards_chosen": float(chosen_reward.mean()),
        "rewards_rejected": float(rejected_reward.mean()),
        "margin": float((chosen_reward - rejected_reward).mean()),
        "accuracy": float((chosen_reward > rejected_reward).float().mean()),
        "logps_chosen": float(policy_chosen.detach().mean()),
        "logps_rejected": float(policy_rejected.detach().mean()),
    }
    return losses.mean(), stats


def dpo_batch_loss(policy, batch: dict[str, torch.Tensor], beta: float, label_smoothing: float = 0.0, *,
                   reference_logps: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """DPO on a `collate_pair_groups` batch: one policy forward over its sequences. `reference_logps`:
    the reference's sequence log-probs of the same rows, computed once per data set (the SFT model,
    `training.methods.dpo`)."""
    logps = sequence_logprobs(policy, batch)
    return dpo_loss(*pair_sides(logps, batch), *pair_sides(reference_logps, batch), beta, label_smoothing)


def pairwise_accuracy(chosen_scores, rejected_scores) -> float:
    """Share of pairs scored chosen > rejected; a tie counts one half (a constant scorer gets 0.5)."""
    chosen = torch.as_tensor(chosen_scores, dtype=torch.float64)
    rejected = torch.as_tensor(rejected_scores, dtype=torch.float64)
    if chosen.numel() == 0:
        return float("nan")
    return float(((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean())


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict]:
    """-log sigmoid(r_chosen - r_rejected - margin), mean over pairs, plus the optional centring term."""
    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_scores + rejected_scores) ** 2).mean()
    stats = {"loss": float(loss.detach()), "accuracy": pairwise_accuracy(chosen_scores.detach(), rejected_scores.detach()),
             "margin": float((chosen_scores - rejected_scores).detach().mean()),
             "mean_reward": float(torch.cat([chosen_scores, rejected_scores]).detach().mean())}
    return loss, stats


def reward_input(encoded: EncodedExample) -> EncodedExample:
    """The tokens a reward model reads: the conversation up to and including the reply's end-of-turn
    token (the template's trailing newline dropped), so the last token scored is the reply's end."""
    last = max(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    return EncodedExample(encoded.input_ids[: last + 1], encoded.labels[: last + 1], encoded.truncated)


def _backbone_and_head(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.score


def reward_scores(reward_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One scalar per sequence: the score head on the hidden state of its last token (per row of a plain
    batch: the last non-pad token)."""
    backbone, head = _backbone_and_head(reward_model)
    hidden = decoder_hidden(backbone, batch)
    if "sequence_last" in batch:
        rows, last = batch["sequence_last"].unbind(-1)
    else:
        mask = batch["attention_mask"]
        last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(dim=-1)
        rows = torch.arange(len(last), device=mask.device)
    return head(hidden[rows, last]).float().squeeze(-1)


def reward_batch_loss(reward_model, batch: dict[str, torch.Tensor], margin: torch.Tensor | None = None,
                      center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict]:
    scores = reward_scores(reward_model, batch)
    return bradley_terry_loss(*pair_sides(scores, batch), margin, center_rewards_coefficient)


def load_reward_model(model_dir: str | Path, device: str = "cpu", seed: int = 0):
    """A causal LM checkpoint as a sequence classifier with one output: the transformer body is the
    checkpoint's, the score head is new (initialised from `seed`, so runs are reproducible)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = pad_id(tokenizer)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point here, not a problem
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32,
                                                                       pad_token_id=pad)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device)
