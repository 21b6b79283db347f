"""The training objectives, one entry each: where its settings live in the spec and their model, the
method class the shared loop runs, its entry point, and the artefact it saves (`artefacts.py`).

An objective says what a run optimises; the artefact what it leaves. SFT's artefact is the spec's
`training.adapter` (a LoRA or QLoRA adapter, or the whole model); the preference objectives train
from the SFT model and save a LoRA adapter (DPO, PPO) or a reward model. `training.method`, the old
name of `training.adapter`, meant both: `training.method: lora` is objective `sft`, adapter `lora`.

A new objective is a method module (`methods/<name>.py`: its `TrainingMethod` subclass and
`train_<name>`), its config model where the spec keeps it, and one line in `OBJECTIVES`;
`tests/test_objectives.py` checks each line against the spec, the method class and the saved folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import artefacts
from ..spec import PipelineSpec, TrainingSpec
from ..spec.preference import DPOConfig, KTOConfig, ORPOConfig, PPOConfig, RewardModelConfig
from .methods.base import TrainingMethod
from .methods.dpo import DPOMethod, train_dpo
from .methods.kto import KTOMethod, train_kto
from .methods.orpo import ORPOMethod, train_orpo
from .methods.ppo import train_ppo
from .methods.reward_model import RewardModelMethod, train_reward_model
from .methods.sft import SFTMethod, train


@dataclass(frozen=True)
class Objective:
    name: str
    spec_key: str  # where the spec keeps its settings (dotted)
    config: type  # their model
    method: type[TrainingMethod] | None  # the class `trainer.run_training` runs; None: its own loop (PPO)
    train: Callable  # the entry point
    artefact: str | None  # what it saves (an `artefacts` kind); None: `training.adapter` decides
    policy: bool = False  # a preference-tuned policy: `preference.train` may list it, the report compares it

    def artefact_for(self, spec: PipelineSpec) -> str:
        return self.artefact or artefacts.kind_of(spec.training.adapter)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("sft", "training", TrainingSpec, SFTMethod, train, None),
    Objective("reward_model", "preference.reward_model", RewardModelConfig, RewardModelMethod, train_reward_model,
              artefacts.REWARD_MODEL),
    Objective("dpo", "preference.dpo", DPOConfig, DPOMethod, train_dpo, artefacts.ADAPTER, policy=True),
    Objective("ppo", "preference.ppo", PPOConfig, None, train_ppo, artefacts.ADAPTER, policy=True),
    Objective("orpo", "preference.orpo", ORPOConfig, ORPOMethod, train_orpo, artefacts.ADAPTER, policy=True),
    Objective("kto", "preference.kto", KTOConfig, KTOMethod, train_kto, artefacts.ADAPTER, policy=True),
)}


def objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise KeyError(f"no training objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def policies() -> list[str]:
    """The preference-tuned policies (`preference.train`, `preference.promotion.candidate`)."""
    return [name for name, o in OBJECTIVES.items() if o.policy]
