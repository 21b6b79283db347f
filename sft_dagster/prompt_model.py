"""A few-shot prompt as the model, for a task with too few labelled rows to train.

When the train split has fewer rows than `training.min_rows_to_train`, `fine_tuned_adapter` trains
nothing: it writes a prompt model, `prompt/prompt.json` in the run folder, holding the system text, the
prompt template, the k examples drawn from the train split (`evaluation.few_shot_k` and
`evaluation.few_shot_seed`: the same draw as the report's k-shot baseline) with their example ids, and
the base model it prompts (source and content hashes). Evaluation scores it as that base model with the
examples as earlier chat turns (`with_few_shot`, the k-shot baseline's own path), and the
registry promotes the folder like an adapter, through the same gate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from . import atomic
from .formatting import history_turns
from .schema import column_or_none
from .spec import PipelineSpec, TaskSpec

METHOD = "few_shot"  # the `method` of a prompt model in its lineage, the adapter record and the registry
FOLDER = "prompt"  # the model's folder in a training run folder (an adapter's is `adapter`)
PROMPT_FILE = "prompt.json"
FORMAT = 1


class PromptModelError(ValueError):
    """A prompt model that cannot be built or read; the message says why."""


def few_shot_examples(train: pd.DataFrame, task: TaskSpec, k: int, seed: int) -> pd.DataFrame:
    """k examples from the train split, drawn with a fixed seed; for label tasks one label after another
    (round-robin over the labels in a seeded order), so that k >= the label count shows every label."""
    if k == 0 or train.empty:
        return train.head(0)
    pool = train.sort_values("example_id").sample(frac=1.0, random_state=seed)
    if task.is_label_task:
        pool = pool.assign(_turn=pool.groupby("response").cumcount()).sort_values("_turn", kind="stable").drop(columns="_turn")
    return pool.head(k)


def with_few_shot(rows: pd.DataFrame, examples: pd.DataFrame, task: TaskSpec) -> pd.DataFrame:
    """`rows` with the examples as earlier chat turns (before any history a row already has)."""
    turns = []
    for ex in examples.itertuples():
        turns += [{"role": "user", "content": task.prompt_template.format(prompt=ex.prompt)},
                  {"role": "assistant", "content": str(ex.response)}]
    histories = [json.dumps(turns + history_turns(h), ensure_ascii=False) for h in column_or_none(rows, "history")]
    return rows.assign(history=histories)


def applies(spec: PipelineSpec, n_train: int) -> bool:
    """Whether a train split of `n_train` rows is too small to train on (the spec's threshold)."""
    threshold = spec.training.min_rows_to_train
    return threshold is not None and n_train < threshold


def build_prompt(spec: PipelineSpec, train: pd.DataFrame, base_model: dict) -> dict:
    """The prompt model of `spec` on these train rows: its examples are the report's k-shot examples.

    base_model: the `base_model` asset's record (`source`, `model_hash`, `tokenizer_hash`).
    """
    cfg = spec.evaluation
    shots = few_shot_examples(train, spec.task, cfg.few_shot_k, cfg.few_shot_seed)
    if shots.empty:
        raise PromptModelError("the train split has no rows: a few-shot prompt model needs at least one example")
    return {
        "format": FORMAT, "method": METHOD, "task": spec.task.type, "labels": spec.task.labels,
        "system": spec.task.system, "template": spec.task.prompt_template,
        "k": len(shots), "seed": cfg.few_shot_seed,
        "examples": [{"example_id": str(r.example_id), "prompt": str(r.prompt), "response": str(r.response)}
                     for r in shots.itertuples()],
        "base_model": {k: base_model[k] for k in ("source", "model_hash", "tokenizer_hash")},
    }


def lineage(prompt: dict, code_version: str) -> dict:
    """What names a prompt model: a hash of the whole prompt (system, template, every example's text,
    the base model's hashes), with the example ids and the base model readable beside it. The keys a
    champion is compared by (`method`, `base_model_hash`) are the ones a training run's lineage has."""
    return {
        "method": METHOD,
        "prompt_hash": hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16],
        "example_ids": [e["example_id"] for e in prompt["examples"]],
        "few_shot_seed": prompt["seed"],
        "base_model": prompt["base_model"]["source"],
        "base_model_hash": prompt["base_model"]["model_hash"],
        "tokenizer_hash": prompt["base_model"]["tokenizer_hash"],
        "code_version": code_version,
    }


def write(run_dir: Path, prompt: dict) -> Path:
    """The prompt model's folder in a run folder, built under a temp name and renamed into place."""
    with atomic.atomic_dir(run_dir / FOLDER) as tmp:
        (tmp / PROMPT_FILE).write_text(json.dumps(prompt, indent=2, ensure_ascii=False))
    return run_dir / FOLDER


def read(directory: Path) -> dict:
    """The prompt of a prompt model folder (a run's `prompt/` or a registry version)."""
    path = Path(directory) / PROMPT_FILE
    if not path.exists():
        raise PromptModelError(f"{directory}: not a few-shot prompt model (no {PROMPT_FILE})")
    prompt = json.loads(path.read_text())
    if prompt.get("format") != FORMAT or prompt.get("method") != METHOD:
        raise PromptModelError(f"{path}: unknown prompt model format {prompt.get('format')!r}")
    return prompt


def prompted(spec: PipelineSpec, rows: pd.DataFrame, prompt: dict) -> tuple[PipelineSpec, pd.DataFrame]:
    """The spec and rows that score a prompt model: its own template and system text, and its examples
    as earlier turns of every row (`with_few_shot`)."""
    task = spec.task.model_copy(update={"prompt_template": prompt["template"], "system": prompt["system"]})
    return spec.model_copy(update={"task": task}), with_few_shot(rows, pd.DataFrame(prompt["examples"]), task)
