"""Test-only batching of preference pairs: production groups pairs by prompt (`collate_pair_groups`)
and passes precomputed reference log-probs to `dpo_batch_loss`; these build the flat, side-by-side
batch and compute the reference in the same step, for tests that compare against them."""

from __future__ import annotations

import torch

from sft_dagster.preference import losses
from sft_dagster.preference.losses import EncodedPair, PairGroup, collate_pair_groups, reward_input, sequence_logprobs


def _side_by_side(pairs: list[EncodedPair]) -> PairGroup:
    """Pairs as one group without sharing: chosen sides in rows [0, n), rejected sides in rows [n, 2n)."""
    n = len(pairs)
    return PairGroup([p.pair_id for p in pairs], [p.chosen for p in pairs] + [p.rejected for p in pairs],
                     list(range(n)), list(range(n, 2 * n)))


def collate_pairs(pairs: list[EncodedPair], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """The pairs as one `collate_pair_groups` group: chosen sides are sequences [0, n), rejected sides
    [n, 2n); the tokens all of them share (the template's system turn) are computed once."""
    return collate_pair_groups([_side_by_side(pairs)], pad_id, device)


def collate_reward_pairs(pairs: list[EncodedPair], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Like `collate_pairs`, each side cut after its reply (`reward_input`)."""
    return collate_pair_groups([_side_by_side(pairs)], pad_id, device, cut=reward_input)


@torch.no_grad()
def reference_logprobs(policy, batch: dict[str, torch.Tensor], reference=None) -> torch.Tensor:
    """Sequence log-probs under the reference: `reference` if given, else the policy with its peft
    adapter switched off (the base model, without a second copy in memory)."""
    if reference is not None:
        return sequence_logprobs(reference, batch)
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("a reference model is needed: the policy has no adapter to switch off")
    with policy.disable_adapter():
        return sequence_logprobs(policy, batch)


def dpo_batch_loss(policy, batch: dict[str, torch.Tensor], beta: float, label_smoothing: float = 0.0,
                   reference=None, reference_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """`losses.dpo_batch_loss` with the reference's log-probs computed here unless given."""
    ref = reference_logps if reference_logps is not None else reference_logprobs(policy, batch, reference)
    return losses.dpo_batch_loss(policy, batch, beta, label_smoothing, reference_logps=ref)
