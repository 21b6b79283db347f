"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"): the
SFT loss on the chosen reply and an odds-ratio preference term in one stage, no reference model.

With p(y|x) = exp(mean over the reply's tokens of log pi(y_t | x, y_<t)) and odds(y|x) = p / (1 - p),

    L_SFT  = -mean-token log pi(y_w | x)
    L_OR   = -log sigmoid(log odds(y_w | x) - log odds(y_l | x))
    L_ORPO = L_SFT + beta * L_OR            (the paper's lambda; TRL calls it beta)

per pair, the mean over the pairs of an optimizer step (the loop's count is pairs, as DPO's), with
log odds = log p - log(1 - p) = m - log(-expm1(m)) for the mean token log-prob m < 0. The pairs of a
prompt are one item (`pairs.PairMethod`); the policy starts from the SFT adapter (`PolicyPairMethod`),
and the result is a LoRA adapter like SFT's and DPO's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from ...preference.losses import collate_pair_groups, pair_sides, sequence_logprobs
from ...spec import PipelineSpec
from .pairs import PolicyPairMethod, pair_training_spec, train_pair_policy


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logp) < 1, without cancellation near p = 1 or p = 0."""
    return mean_logp - torch.where(mean_logp > -0.6931, torch.log(-torch.expm1(mean_logp)),
                                   torch.log1p(-torch.exp(mean_logp)))


def orpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, dict]:
    """The ORPO loss of each pair (not reduced) from the mean token log-probs of its two replies, and
    the statistics of the pairs."""
    ratio = log_odds(chosen_mean_logp) - log_odds(rejected_mean_logp)
    nll = -chosen_mean_logp
    odds_ratio_loss = -F.logsigmoid(ratio)
    stats = {"nll": float(nll.detach().mean()), "odds_ratio_loss": float(odds_ratio_loss.detach().mean()),
             "log_odds_ratio": float(ratio.detach().mean()), "accuracy": float((ratio.detach() > 0).float().mean()),
             "logps_chosen": float(chosen_mean_logp.detach().mean()),
             "logps_rejected": float(rejected_mean_logp.detach().mean())}
    return nll + beta * odds_ratio_loss, stats


def mean_token_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(reply | prompt) / reply tokens, per sequence of a `collate_pair_groups` batch."""
    counts = torch.bincount(batch["token_sequence"], minlength=len(batch["sequence_last"]))
    return sequence_logprobs(model, batch) / counts.clamp(min=1)


class ORPOMethod(PolicyPairMethod):
    name = objective = "orpo"

    def collate(self, items, pad_id, device):
        return collate_pair_groups(items, pad_id, device)

    def loss(self, model, batch):
        losses, stats = orpo_loss(*pair_sides(mean_token_logprobs(model, batch), batch), self.config.beta)
        n = len(losses)
        self.record(stats, n)
        return losses.sum(), n


def train_orpo(spec: PipelineSpec, config, model_dir: Path, sft_adapter_dir: Path | None, train_pairs: pd.DataFrame,
               val_pairs: pd.DataFrame, output_dir: Path, device: str = "auto", log: Callable[[str], None] = print,
               on_metrics: Callable[[dict], None] | None = None, stop_after_steps: int | None = None):
    """ORPO (`spec.preference.ORPOConfig`) from the SFT adapter (None: the base model with a new LoRA
    adapter, the paper's setting); batch size and learning rate as DPO's (`pair_training_spec`). Saves
    `output_dir/adapter`."""
    return train_pair_policy(ORPOMethod(pair_training_spec(spec, config), config, sft_adapter_dir), model_dir,
                             train_pairs, val_pairs, output_dir, device, log, on_metrics, stop_after_steps)
