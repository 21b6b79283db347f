"""Pydantic models of the preference stages' settings, strict like the pipeline spec.

`spec/__init__.py` builds the spec's optional `preference:` section (`PreferenceSpec`) from them. Every model
forbids unknown keys and is frozen, as the spec's own sections are.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..strict import _Strict

# The preference-tuned policies `preference.train` and `preference.promotion.candidate` may name: the
# registry's policies (`training.objectives.policies()`, checked by tests/test_objectives.py).
Policy = Literal["dpo", "ppo", "orpo", "kto"]


class CandidateGenerationConfig(_Strict):
    """How candidate replies are sampled for ranking (`preference.generation.generate_candidates`)."""

    k: int = Field(4, ge=2, le=16)  # candidates per prompt
    temperature: float = Field(0.8, gt=0, le=5)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0  # same seed, same prompts, same model -> the same candidates


class RankingConfig(_Strict):
    """Where rankings are kept and how many people rank each prompt."""

    rankings_file: str | None = None  # default: <storage>/<pipeline>/preference/rankings.jsonl
    candidates_file: str | None = None  # default: <storage>/<pipeline>/preference/candidates.parquet
    # A prompt leaves the queue after this many rankings by different people (>1 measures agreement).
    rankings_per_prompt: int = Field(1, ge=1)
    mode: Literal["full", "best_worst"] = "full"


class PreferenceSourceConfig(_Strict):
    """An imported preference data set: JSONL/CSV with prompt/chosen/rejected, or chat-style lists."""

    path: str
    format: Literal["jsonl", "csv"] | None = None  # default: from the extension
    # canonical field -> column in the file
    columns: dict[Literal["prompt", "chosen", "rejected", "system", "author", "split", "tie", "score_chosen",
                          "score_rejected"], str] = Field(default_factory=dict)


class RowGate(_Strict):
    """A pair check whose failing pairs cannot be trained on (they are always quarantined). It fails,
    and blocks training when `blocking`, if more than `max_rate` of the pairs fail it."""

    blocking: bool = True
    max_rate: float = Field(0.0, ge=0, le=1)


class InconsistencyGate(_Strict):
    blocking: bool = False
    # share of a person's repeated judgements of the same two replies that contradict each other
    max_rate: float = Field(0.1, ge=0, le=1)


class LengthBiasGate(_Strict):
    blocking: bool = False
    # fails when the longer reply wins more than this share of the pairs (lengths differing)
    max_longer_win_rate: float = Field(0.8, gt=0, le=1)
    min_pairs: int = Field(20, ge=1)  # fewer comparable pairs: reported, not evaluated


class AgreementGate(_Strict):
    blocking: bool = False
    # pairwise agreement between people who judged the same two replies
    min_agreement: float = Field(0.6, ge=0, le=1)


class PairGatesConfig(_Strict):
    """The gates on preference pairs (`preference.pairs.run_pair_checks`); the caller picks which block."""

    identical_sides: RowGate = RowGate()
    empty_sides: RowGate = RowGate()
    ties: RowGate = RowGate(blocking=False, max_rate=1.0)
    over_length: RowGate = RowGate()
    duplicates: RowGate = RowGate(blocking=False, max_rate=1.0)
    split_leakage: RowGate = RowGate()
    inconsistent_rankings: InconsistencyGate = InconsistencyGate()
    length_bias: LengthBiasGate = LengthBiasGate()
    ranker_agreement: AgreementGate = AgreementGate()


class DPOConfig(_Strict):
    """Direct preference optimisation (Rafailov et al. 2023), sigmoid loss."""

    method: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    # conservative DPO: the share of labels assumed flipped (0 = plain DPO)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    # dropout off in the policy (LoRA's too), as TRL's DPOConfig: the reference log-probs are computed
    # without dropout, and a policy forward with it makes the log-ratio noise from the first step
    disable_dropout: bool = True
    # prompts per micro-batch, each with all its pairs (training.methods.pairs); None: training.batch_size
    batch_size: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)  # None: training.learning_rate


class ORPOConfig(_Strict):
    """ORPO (Hong et al. 2024): SFT on the chosen reply plus beta x the odds-ratio loss, no reference model."""

    method: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0)  # the paper's lambda: weight of the odds-ratio term against the SFT loss
    disable_dropout: bool = True  # as DPO's
    # prompts per micro-batch, each with all its pairs (training.methods.pairs); None: training.batch_size
    batch_size: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)  # None: training.learning_rate


class KTOConfig(_Strict):
    """KTO (Ethayarajh et al. 2024): unpaired good/bad replies against the SFT model as reference."""

    method: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    # weights of the desirable and undesirable examples' losses; TRL advises desirable_weight x good /
    # (undesirable_weight x bad) within [1, 4/3]
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    disable_dropout: bool = True  # as DPO's
    # prompts per micro-batch, each with all its examples (training.methods.pairs); None: training.batch_size
    batch_size: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)  # None: training.learning_rate


class RewardModelConfig(_Strict):
    """A Bradley-Terry reward model: a sequence-classification head scoring the reply's last token."""

    method: Literal["reward_model"] = "reward_model"
    # adds coef * mean((r_chosen + r_rejected)^2): keeps rewards centred on 0 (Eisenstein et al. 2023)
    center_rewards_coefficient: float | None = Field(None, ge=0)
    # dropout off (LoRA's too), as TRL's RewardConfig: scores are then the same in training and scoring
    disable_dropout: bool = True
    # prompts per micro-batch, each with all its pairs (training.methods.pairs); None: training.batch_size
    batch_size: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)  # None: training.learning_rate


class PPOConfig(_Strict):
    """PPO for a causal LM policy against a reward (`preference.ppo.ppo_train`).

    Defaults follow the usual RLHF settings (Ziegler et al. 2019; TRL's PPO): no discount, GAE
    lambda 0.95, clip 0.2, an adaptive KL coefficient aiming at `target_kl` nats per reply.
    """

    method: Literal["ppo"] = "ppo"
    steps: int = Field(20, ge=1)  # rollout + update rounds
    batch_size: int = Field(16, ge=1)  # prompts per rollout
    mini_batch_size: int = Field(8, ge=1)
    ppo_epochs: int = Field(2, ge=1)  # passes over each rollout
    learning_rate: float = Field(1e-5, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    init_kl_coef: float = Field(0.2, ge=0)
    adaptive_kl: bool = True
    target_kl: float = Field(6.0, gt=0)  # nats per reply (summed over its tokens)
    kl_horizon: int = Field(10000, ge=1)
    whiten_advantages: bool = True
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _mini_batches(self) -> PPOConfig:
        if self.batch_size % self.mini_batch_size:
            raise ValueError("ppo.batch_size must be a multiple of ppo.mini_batch_size")
        return self
