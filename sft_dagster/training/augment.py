"""Data augmentation and replay for training: NEFTune noise, prompt-template variation, replay mixing.

- **NEFTune** (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): during
  training forwards only, uniform noise in [-a, a] with a = alpha / sqrt(L x d) is added to the input
  embeddings, L the example's own token count and d the hidden size. As in the paper's code, L is the
  example's length (attention mask, or the packed segment), not the padded width that transformers'
  Trainer uses, so a padded or packed batch gets the same noise scale per example as a batch of one.
  Validation, evaluation and generation never see noise: the hook acts only in train mode, and only on
  the model the trainer attached it to.
- **Prompt-template variation** (label tasks): each training example is rendered with one of
  `task.prompt_templates`, drawn from a hash of `training.seed` and the example id: the same example
  always gets the same template whatever the row order, and another seed draws again. Validation and
  evaluation use the first (main) template.
- **Replay mixing**: general examples (prompt, reference answer) from `retention.replay_set` or a file
  are added to the train split, rendered as plain chat turns (no task template, no task system prompt).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import torch

from ..spec import PipelineSpec, ReplaySourceSpec, SourceSpec, TaskSpec

# General replay examples are plain chat turns: no task template, no task system prompt.
GENERAL_TASK = TaskSpec(type="instruction")
REPLAY_COLUMN = "replay"


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def example_lengths(shape: tuple[int, int], attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None) -> torch.Tensor:
    """(batch, tokens) float tensor: the token count of the example each position belongs to.

    Packed rows (position ids restarting at 0 per example, no attention mask) are split at the restarts;
    padded rows count their attention mask; otherwise the row is one example.
    """
    rows, width = shape
    if attention_mask is not None:
        return attention_mask.sum(-1, keepdim=True).to(torch.float32).expand(rows, width)
    if position_ids is not None:
        out = torch.empty((rows, width), dtype=torch.float32, device=position_ids.device)
        for r in range(rows):
            segment = torch.cumsum(position_ids[r] == 0, 0)
            _, counts = torch.unique_consecutive(segment, return_counts=True)
            out[r] = torch.repeat_interleave(counts, counts).to(torch.float32)
        return out
    return torch.full((rows, width), float(width))


class NEFTune:
    """Noisy input embeddings in train mode, attached to one model (`remove()` detaches it)."""

    def __init__(self, model, alpha: float):
        lm = _causal_lm(model)
        self.alpha = float(alpha)
        embeddings = lm.get_input_embeddings()
        self.hidden = embeddings.embedding_dim
        self._batch: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        # The decoder (`lm.model`) is called with the mask and positions; the embedding layer inside it
        # sees only the ids, so the first hook hands them to the second.
        self._handles = [lm.model.register_forward_pre_hook(self._capture, with_kwargs=True),
                         embeddings.register_forward_hook(self._noise)]

    def _capture(self, module, args, kwargs):
        self._batch = (kwargs.get("attention_mask"), kwargs.get("position_ids"))

    def magnitude(self, embedded: torch.Tensor) -> torch.Tensor:
        """alpha / sqrt(L x d) per position, shape (batch, tokens, 1)."""
        mask, positions = self._batch
        lengths = example_lengths(tuple(embedded.shape[:2]), mask, positions).to(embedded.device)
        return (self.alpha / torch.sqrt(lengths * self.hidden))[..., None]

    def _noise(self, module, args, output: torch.Tensor):
        if not module.training:
            return None
        with torch.no_grad():
            noise = (torch.rand(output.shape, device=output.device) * 2 - 1) * self.magnitude(output)
            mask = self._batch[0]
            if mask is not None:  # padding stays as it was
                noise = noise * mask[..., None].to(noise.dtype)
        return output + noise.to(output.dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def attach_neftune(model, alpha: float) -> NEFTune | None:
    """NEFTune on `model` for `alpha` > 0; None (nothing attached, the run unchanged) for 0."""
    return NEFTune(model, alpha) if alpha > 0 else None


def template_index(example_id: str, seed: int, n: int) -> int:
    """Which of `n` templates an example gets: a hash of the seed and the example id."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def _template_variants(task: TaskSpec) -> list[TaskSpec]:
    return [task.model_copy(update={"prompt_template": t}) for t in task.prompt_templates or [task.prompt_template]]


def row_tasks(df: pd.DataFrame, spec: PipelineSpec, tasks: dict[str, TaskSpec] | None = None) -> list[TaskSpec]:
    """The task (hence template and system prompt) each training row is rendered with: the spec's, or
    for a multi-task mix the row's own (`task` column, names in `tasks`; sft_dagster/multitask.py)."""
    from ..multitask import task_of_rows

    replay = df[REPLAY_COLUMN].fillna(False).astype(bool).tolist() if REPLAY_COLUMN in df else [False] * len(df)
    own = task_of_rows(df.loc[[not r for r in replay]], tasks) if tasks else None
    variants: dict[int, list[TaskSpec]] = {}
    out, k = [], 0
    for eid, is_replay in zip(df["example_id"], replay):
        if is_replay:
            out.append(GENERAL_TASK)
            continue
        task = own[k] if own is not None else spec.task
        k += 1
        options = variants.setdefault(id(task), _template_variants(task))
        out.append(options[template_index(str(eid), spec.training.seed, len(options))])
    return out


def template_counts(df: pd.DataFrame, spec: PipelineSpec, tasks: dict[str, TaskSpec] | None = None) -> dict[str, int]:
    """How many training rows each template renders (the run's metrics show it)."""
    counts = {t: 0 for t in spec.task.prompt_templates or [spec.task.prompt_template]}
    for task in row_tasks(df, spec, tasks):
        if task is not GENERAL_TASK:
            counts[task.prompt_template] = counts.get(task.prompt_template, 0) + 1
    return counts


def load_replay(spec: PipelineSpec, source: ReplaySourceSpec, n: int, seed: int) -> pd.DataFrame:
    """`n` general examples (example_id, prompt, response, system) from the builtin set or a file.

    A file row without a usable prompt or response is an error naming the file and line: the replay
    file is configuration, not data to quarantine.
    """
    from ..retention import replay_set

    if source.source == "builtin":
        return replay_set(n, seed)[["example_id", "prompt", "response", "system"]]
    from ..ingest import read_source_file

    path = spec.resolve(source.source)
    if not path.is_file():
        raise ValueError(f"{spec.spec_path or '<spec>'}: training replay source {path} is not a file")
    kept, bad = read_source_file(path, SourceSpec(path=str(path), columns=dict(source.columns)))
    if bad:
        raise ValueError(f"{path}:{bad[0]['source_line']}: replay example unusable: {bad[0]['reason']}")
    if not kept:
        raise ValueError(f"{path}: the replay file has no rows")
    frame = pd.DataFrame(kept)
    missing = frame["response"].isna()
    if missing.any():
        line = frame.loc[missing, "source_line"].iloc[0]
        raise ValueError(f"{path}:{line}: response: a replay example needs a reference answer")
    frame = frame.sample(n=min(n, len(frame)), random_state=seed).sort_values("source_line")
    frame["example_id"] = [f"replay-{Path(path).stem}-{line}" for line in frame["source_line"]]
    frame["system"] = None
    return frame[["example_id", "prompt", "response", "system"]].reset_index(drop=True)


def with_replay(train_df: pd.DataFrame, spec: PipelineSpec) -> pd.DataFrame:
    """The train split plus round(ratio x rows) general examples (capped by `replay.examples`), marked
    in the `replay` column; the split itself when the ratio is 0."""
    mix = spec.training.replay
    n = min(mix.examples, round(mix.ratio * len(train_df)))
    if n == 0:
        return train_df
    general = load_replay(spec, mix, n, spec.training.seed).assign(**{REPLAY_COLUMN: True})
    task_rows = train_df.assign(**{REPLAY_COLUMN: False})
    return pd.concat([task_rows, general[[c for c in general.columns if c in task_rows.columns]]], ignore_index=True)


def run_metrics(train_df: pd.DataFrame, spec: PipelineSpec, tasks: dict[str, TaskSpec] | None = None) -> dict:
    """What augmentation did in a run, for its metrics: noise, templates used, replay rows mixed in,
    and for a multi-task mix the train rows of each task."""
    from ..multitask import TASK_COLUMN

    out: dict = {"neftune_alpha": spec.training.neftune_alpha}
    if spec.task.prompt_templates or (tasks and any(t.prompt_templates for t in tasks.values())):
        out["prompt_template_counts"] = template_counts(train_df, spec, tasks)
    if tasks and TASK_COLUMN in train_df:
        out["task_rows"] = {k: int(v) for k, v in train_df[TASK_COLUMN].value_counts().sort_index().items()}
    if REPLAY_COLUMN in train_df:
        out["replay_examples_mixed"] = int(train_df[REPLAY_COLUMN].fillna(False).astype(bool).sum())
    return out


def main_tasks(df: pd.DataFrame, spec: PipelineSpec, tasks: dict[str, TaskSpec] | None = None) -> list[TaskSpec] | None:
    """Validation rows: each with its task's main template (no variation); None for a single task."""
    from ..multitask import task_of_rows

    return task_of_rows(df, tasks) if tasks else None
