"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): unpaired
feedback, each reply marked desirable (good) or undesirable (bad), against the SFT model as reference.

With r(x, y) = log pi(y|x) - log ref(y|x) (summed over the reply's tokens) and z_ref the policy's KL
to the reference estimated on mismatched (prompt, reply) combinations,

    z_ref           = max(0, mean over mismatched (x, y') of r(x, y'))      (no gradient)
    L(x, y good)    = desirable_weight   * (1 - sigmoid(beta * (r(x, y) - z_ref)))
    L(x, y bad)     = undesirable_weight * (1 - sigmoid(beta * (z_ref - r(x, y))))

the mean over the examples of an optimizer step (TRL's KTOTrainer: the same value function and KL
clamp). z_ref is estimated once per optimizer step over the whole accumulation window
(`begin_window`), so batch 8 x 1 equals 1 x 8; TRL estimates it per micro-batch. Each prompt's reply
is paired for the estimate with a reply of the next prompt in the data (a fixed pairing, so a resumed
run sees the same), and the reference's log-probs of those combinations are computed once with the
others (`DPOMethod.prepare`).

Examples are rows (prompt, response, desirable) with optional system and history; preference pairs
become such rows by `unpaired_from_pairs` (a reply is good when it wins more of its pairs than it
loses, bad when it loses more; even replies teach nothing and are left out). The examples of a prompt
are one item over its distinct replies, like the pairs of DPO (`PairGroup`: `chosen` holds the
sequences of its desirable examples, `rejected` those of its undesirable ones; they are not pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ...formatting import IGNORE_INDEX, EncodedExample, build_messages, encode_example
from ...preference.losses import PairGroup, _reply_start, pair_sides, sequence_logprobs
from ...spec import PipelineSpec
from .dpo import DPOMethod, ReferencedGroup
from .pairs import PolicyPairMethod, pair_training_spec, sequence_logprobs_of, train_pair_policy

EXAMPLE_COLUMNS = ["example_id", "prompt", "system", "history", "response", "desirable"]


def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The KTO loss of each example (not reduced), given the window's KL estimate `kl` (clamped at 0 here,
    detached), and the examples' statistics."""
    z_ref = kl.detach().clamp(min=0)
    ratio = policy_logps - reference_logps.detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z_ref)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z_ref - ratio)))
    losses = torch.where(desirable, good, bad)
    right_side = torch.where(desirable, ratio.detach() > z_ref, ratio.detach() < z_ref)
    stats = {"kl": float(z_ref), "kl_estimate": float(kl), "desirable_share": float(desirable.float().mean()),
             "accuracy": float(right_side.float().mean())}  # examples on their side of z_ref
    return losses, stats


def unpaired_from_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """Preference pairs as KTO examples: each distinct reply of a prompt once, desirable when it is chosen
    in more of its pairs than rejected, undesirable when rejected more; replies even in wins and losses
    are left out. A frame that already has `desirable` (thumbs) is returned as it is."""
    if "desirable" in pairs:
        return pairs
    score: dict[tuple, int] = {}
    first: dict[tuple, tuple] = {}
    systems = pairs["system"] if "system" in pairs else [None] * len(pairs)
    histories = pairs["history"] if "history" in pairs else [None] * len(pairs)
    for pair_id, prompt, chosen, rejected, system, history in zip(pairs["pair_id"], pairs["prompt"], pairs["chosen"],
                                                                  pairs["rejected"], systems, histories):
        context = (prompt, system if isinstance(system, str) else None, history if isinstance(history, str) else None)
        for reply, won in ((chosen, 1), (rejected, -1)):
            key = (*context, reply)
            score[key] = score.get(key, 0) + won
            first.setdefault(key, str(pair_id))
    rows = [{"example_id": f"{first[key]}:{'good' if s > 0 else 'bad'}", "prompt": key[0], "system": key[1],
             "history": key[2], "response": key[3], "desirable": s > 0} for key, s in score.items() if s != 0]
    return pd.DataFrame(rows, columns=EXAMPLE_COLUMNS)


def encode_examples(tokenizer, frame: pd.DataFrame, task, max_length: int) -> list[PairGroup]:
    """KTO examples grouped by prompt, each distinct reply one sequence; refuses (never truncates) replies
    over `max_length` or without reply tokens."""
    groups: dict[tuple, tuple[PairGroup, dict[tuple, int]]] = {}
    refused = []
    for row in frame.itertuples(index=False):
        system = row.system if isinstance(getattr(row, "system", None), str) else None
        history = row.history if isinstance(getattr(row, "history", None), str) else None
        e = encode_example(tokenizer, build_messages(row.prompt, row.response, system, task, history), max_length)
        if e.truncated or e.n_loss_tokens == 0:
            refused.append(str(row.example_id))
            continue
        key = tuple(e.input_ids[: _reply_start(e)])
        group, index = groups.setdefault(key, (PairGroup([], [], [], []), {}))
        tokens = tuple(e.input_ids)
        if tokens not in index:
            index[tokens] = len(group.sequences)
            group.sequences.append(e)
        group.pair_ids.append(str(row.example_id))
        (group.chosen if bool(row.desirable) else group.rejected).append(index[tokens])
    if refused:
        raise ValueError(f"{len(refused)} KTO examples would be truncated at max_length={max_length} or carry no "
                         f"reply token: {refused[:10]}")
    return [group for group, _ in groups.values()]


def mismatched(prompt_of: EncodedExample, reply_of: EncodedExample) -> EncodedExample:
    """The prompt tokens of one sequence followed by the reply tokens (and their labels) of another."""
    a, b = _reply_start(prompt_of), _reply_start(reply_of)
    return EncodedExample(prompt_of.input_ids[:a] + reply_of.input_ids[b:],
                          [IGNORE_INDEX] * a + reply_of.labels[b:], False)


@dataclass
class KTOItem(ReferencedGroup):
    kl: PairGroup | None = None  # the prompt with other prompts' replies: the KL estimate's sequences
    kl_reference: list[float] | None = None


class KTOMethod(DPOMethod):
    """DPO's reference pass, start and saved adapter; KTO's examples, loss and KL estimate."""

    name = objective = "kto"
    unit = "examples"

    def __init__(self, spec: PipelineSpec, config, sft_adapter_dir: Path | None = None):
        super().__init__(spec, config, sft_adapter_dir)
        self.kl = torch.zeros(())  # the current window's (or validation's) KL estimate
        self.balance: dict = {}  # the train split's desirable / undesirable counts (`train_kto`)

    def encode(self, tokenizer, frame):
        groups = encode_examples(tokenizer, unpaired_from_pairs(frame), self.spec.task, self.spec.model.max_length)
        items = []
        for i, group in enumerate(groups):
            other = groups[(i + 1) % len(groups)].sequences
            kl = [mismatched(s, other[k % len(other)]) for k, s in enumerate(group.sequences)]
            items.append(KTOItem(group, kl=PairGroup([], kl, [], [])))
        return items

    def reference_groups(self, item) -> list:
        return [item.group, item.kl]

    def set_reference(self, item, logps: list[list[float]]) -> None:
        item.reference, item.kl_reference = logps

    def estimate_kl(self, model, items: list, pad_id: int, device: str, autocast_precision: str) -> None:
        """z_ref of `items`: the policy's mean log-ratio to the reference on their mismatched sequences."""
        policy = sequence_logprobs_of(model, [i.kl for i in items], self.spec.training.batch_size, pad_id, device,
                                      autocast_precision)
        ratios = [p - r for item, logps in zip(items, policy) for p, r in zip(logps, item.kl_reference)]
        self.kl = torch.tensor(sum(ratios) / len(ratios) if ratios else 0.0, device=device)

    def begin_window(self, model, items, pad_id, device, autocast_precision) -> None:
        self.estimate_kl(model, items, pad_id, device, autocast_precision)

    def validate(self, model, items, batch_size, pad_id, device, autocast_precision) -> dict:
        self.estimate_kl(model, items, pad_id, device, autocast_precision)
        return super().validate(model, items, batch_size, pad_id, device, autocast_precision)

    def loss(self, model, batch):
        logps, reference = sequence_logprobs(model, batch), batch["reference_logps"]
        (good, bad), (good_ref, bad_ref) = pair_sides(logps, batch), pair_sides(reference, batch)
        desirable = torch.cat([torch.ones_like(good, dtype=torch.bool), torch.zeros_like(bad, dtype=torch.bool)])
        losses, stats = kto_loss(torch.cat([good, bad]), torch.cat([good_ref, bad_ref]), desirable, self.kl,
                                 self.config.beta, self.config.desirable_weight, self.config.undesirable_weight)
        self.record(stats, len(losses))
        return losses.sum(), len(losses)

    def extra_metrics(self) -> dict:
        return {**PolicyPairMethod.extra_metrics(self), "desirable_weight": self.config.desirable_weight,
                "undesirable_weight": self.config.undesirable_weight, **self.balance, **self.reference_metrics()}


def train_kto(spec: PipelineSpec, config, model_dir: Path, sft_adapter_dir: Path | None, train_data: pd.DataFrame,
              val_data: pd.DataFrame, output_dir: Path, device: str = "auto", log: Callable[[str], None] = print,
              on_metrics: Callable[[dict], None] | None = None, stop_after_steps: int | None = None):
    """KTO (`spec.preference.KTOConfig`) from the SFT adapter, the SFT model as reference, on examples
    (prompt, response, desirable) or on preference pairs (`unpaired_from_pairs`); batch size (prompts)
    and learning rate as DPO's. Refuses a train split without desirable or without undesirable examples
    (the loss then has nothing to weigh them against). Saves `output_dir/adapter`."""
    train_data = unpaired_from_pairs(train_data)
    good = int(train_data["desirable"].sum())
    bad = len(train_data) - good
    if not good or not bad:
        raise ValueError(f"KTO needs desirable and undesirable train examples; there are {good} and {bad}")
    # TRL's advice: desirable_weight x good / (undesirable_weight x bad) within [1, 4/3].
    balance = config.desirable_weight * good / (config.undesirable_weight * bad)
    log(f"kto: {good} desirable and {bad} undesirable train examples; weighted balance {balance:.2f}"
        + ("" if 1 <= balance <= 4 / 3 else " (outside [1, 1.33]: adjust preference.kto.desirable_weight)"))
    method = KTOMethod(pair_training_spec(spec, config), config, sft_adapter_dir)
    method.balance = {"desirable_examples": good, "undesirable_examples": bad, "weighted_balance": round(balance, 4)}
    return train_pair_policy(method, model_dir, train_data, unpaired_from_pairs(val_data), output_dir, device, log,
                             on_metrics, stop_after_steps)
