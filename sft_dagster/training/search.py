"""Hyperparameter search before the final training run: grid or Bayesian (optuna TPE).

Each trial trains with the spec's training settings overridden by the trial's values and is scored by
its best validation loss; the final adapter is trained with the best trial's values. Keys of
`training.search.space` are training fields (`learning_rate`, `batch_size`, `epochs`, `weight_decay`,
`warmup_ratio`, ...) or LoRA fields (`lora.r`, `lora.alpha`, `lora.dropout`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ..spec import PipelineSpec
from .methods.sft import train


def with_overrides(spec: PipelineSpec, params: dict) -> PipelineSpec:
    """The spec with training values replaced (validated again) and search switched off."""
    training = spec.training.model_dump()
    for key, value in params.items():
        node = training
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    training["search"] = {"strategy": "none"}
    data = spec.model_dump() | {"training": training}
    return PipelineSpec.model_validate(data).model_copy(update={"spec_path": spec.spec_path})


def grid(space: dict[str, list]) -> list[dict]:
    keys = sorted(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def _suggest(trial, key: str, values: list):
    """[low, high] numbers are ranges (log scale when they span 10x or more); other lists are choices."""
    numeric = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric:
        return trial.suggest_categorical(key, values)
    low, high = values
    if all(isinstance(v, int) for v in values):
        return trial.suggest_int(key, low, high)
    log = low > 0 and high / low >= 10
    return trial.suggest_float(key, float(low), float(high), log=log)


def search_hyperparameters(spec: PipelineSpec, model_dir: Path, train_df: pd.DataFrame, val_df: pd.DataFrame,
                           output_dir: Path, device: str = "auto", log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """Run the trials; returns (best values, every trial's values and validation loss)."""
    cfg = spec.training.search
    trials: list[dict] = []

    def score(params: dict) -> float:
        n = len(trials)
        result = train(with_overrides(spec, params), model_dir, train_df, val_df, output_dir / f"trial-{n}",
                       device=device, log=lambda _: None)
        val = result.metrics["val_loss"]
        val = float("inf") if val is None or math.isnan(val) else float(val)
        trials.append({"trial": n, **params, "val_loss": val})
        log(f"search trial {n}: {params} -> validation loss {val:.4f}")
        return val

    if cfg.strategy == "grid":
        for params in grid(cfg.space)[: cfg.trials]:
            score(params)
    elif cfg.strategy == "bayesian":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=spec.training.seed))
        study.optimize(lambda t: score({k: _suggest(t, k, v) for k, v in cfg.space.items()}), n_trials=cfg.trials)
    else:
        raise ValueError(f"training.search.strategy is {cfg.strategy!r}: nothing to search")
    best = min(trials, key=lambda t: t["val_loss"])
    return {k: v for k, v in best.items() if k not in ("trial", "val_loss")}, trials
