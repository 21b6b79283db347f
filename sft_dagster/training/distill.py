"""Distillation against forgetting: KL(teacher || student) on general replay examples.

While the adapter learns the task, a second loss term keeps the tuned model's next-token distributions
on general examples (prompt + reference answer, `training.distillation.replay`) close to a frozen
teacher's: by default the base model itself, or a local model with the same tokenizer. Per optimizer
step, `batch_size` replay examples are scored by the student and

    loss += weight x T^2 x mean over answer positions of  KL(q || p)

over k + 1 outcomes: the teacher's top-k tokens one by one, and "any other token" as one bucket.
q and p are the teacher's and the student's softmax at temperature T, so q's bucket holds the
teacher's tail mass (from its cached log-sum-exp) and p's bucket the student's mass outside those k
tokens. With k = the vocabulary this is the exact KL(teacher || student). With a smaller k it is the
KL of the two distributions coarsened to k + 1 outcomes: never more than the full KL, 0 when the
student equals the teacher, and the student is still held to the teacher's tail mass (dropping the
tail and renormalising the teacher's top k instead would push the student to put *all* its mass on
those k tokens: on the tiny test model, a student identical to its teacher scored 188 with k = 5).
What is cached is k logits and one log-sum-exp per position instead of the 49k-wide row.

With `replay.source: train` the term is computed on the train split's own rows instead, each rendered
with its task's template (word-level distillation of a student from a teacher: `PipelineSpec.student_pipeline`).

The teacher runs **once per replay example**, before training: its top-k logits go to an on-disk cache
keyed by the teacher's weights, the tokenizer, k and the rendered text, so another epoch, a resumed
run or the next training run with the same teacher reads them back instead of running the teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import atomic
from ..formatting import IGNORE_INDEX, EncodedExample
from ..spec import PipelineSpec


class TeacherError(ValueError):
    """A distillation teacher that cannot be used (missing, or another tokenizer)."""


@dataclass
class TeacherTargets:
    """The teacher's top-k logits at one example's answer positions (row i predicts answer token i)."""

    indices: torch.Tensor  # (positions, k) int64
    logprobs: torch.Tensor  # (positions, k) float32: log-softmax of the logits at the temperature
    tail: torch.Tensor  # (positions,) float32: log of the mass outside the k tokens (-inf for k = vocabulary)


def teacher_dir(spec: PipelineSpec, model_dir: Path) -> Path:
    """The teacher's local directory: the base model for `base`, else the spec's path."""
    teacher = spec.training.distillation.teacher
    if teacher == "base":
        return Path(model_dir)
    path = spec.resolve(teacher)
    if not (path / "config.json").is_file():
        raise TeacherError(f"{spec.spec_path or '<spec>'}: training.distillation.teacher: {path} is not a local "
                           "model directory (no config.json)")
    return path


def tokenizer_differences(a: Path, b: Path) -> list[str]:
    """What differs between two model directories' tokenizers (vocabulary, end-of-sequence token, chat
    template); empty when they tokenize alike. Equal tokenizer file hashes answer without loading them."""
    from transformers import AutoTokenizer

    from ..models import directory_hashes

    if directory_hashes(a)[1] == directory_hashes(b)[1]:
        return []
    tok_a, tok_b = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b)
    return [what for what, x, y in (
        ("vocabulary", tok_a.get_vocab(), tok_b.get_vocab()),
        ("end-of-sequence token", tok_a.eos_token, tok_b.eos_token),
        ("chat template", tok_a.chat_template, tok_b.chat_template),
    ) if x != y]


def check_same_tokenizer(base_dir: Path, teacher: Path) -> None:
    """Refuse a teacher whose tokenizer differs from the base model's: the KL compares the two models'
    distributions token id by token id, which means nothing across vocabularies."""
    if differences := tokenizer_differences(base_dir, teacher):
        raise TeacherError(f"training.distillation.teacher {teacher}: its tokenizer differs from the base model's "
                           f"({', '.join(differences)} differ); the teacher must share the base model's tokenizer")


def _cache_key(teacher_hash: str, tokenizer_hash: str, top_k: int, temperature: float, example: EncodedExample,
               text: str) -> str:
    blob = json.dumps([teacher_hash, tokenizer_hash, top_k, temperature, text, example.input_ids, example.labels])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _loss_positions(example: EncodedExample) -> int:
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


@torch.no_grad()
def teacher_targets(teacher_path: Path, examples: list[EncodedExample], texts: list[str], top_k: int,
                    temperature: float, cache_dir: Path, device: str, batch_size: int = 8) -> tuple[list[TeacherTargets], dict]:
    """The teacher's top-k logits for each example, from the cache or computed (then cached).

    Returns the targets and {"hits", "computed"}. The teacher is loaded only when something is missing.
    """
    from transformers import AutoModelForCausalLM

    from ..models import directory_hashes
    from ..torchkit import collate, response_logits

    model_hash, tokenizer_hash = directory_hashes(teacher_path)
    keys = [_cache_key(model_hash, tokenizer_hash, top_k, temperature, e, t) for e, t in zip(examples, texts)]
    out: list[TeacherTargets | None] = [None] * len(examples)
    for i, key in enumerate(keys):
        path = cache_dir / f"{key}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=True)
            out[i] = TeacherTargets(saved["indices"].long(), saved["logprobs"].float(), saved["tail"].float())
    missing = [i for i, t in enumerate(out) if t is None]
    if missing:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).to(device).eval()
        pad_id = teacher.config.pad_token_id if teacher.config.pad_token_id is not None else teacher.config.eos_token_id
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            logits, _ = response_logits(teacher, collate([examples[i] for i in chunk], pad_id, device))
            logprobs = torch.log_softmax(logits / temperature, dim=-1)
            values, indices = logprobs.topk(min(top_k, logits.shape[-1]), dim=-1)
            tails = torch.logsumexp(logprobs.scatter(-1, indices, float("-inf")), dim=-1)
            sizes = [_loss_positions(examples[i]) for i in chunk]
            for i, v, ix, tail in zip(chunk, values.cpu().split(sizes), indices.cpu().split(sizes), tails.cpu().split(sizes)):
                out[i] = TeacherTargets(ix, v, tail)
                atomic.torch_save(cache_dir / f"{keys[i]}.pt", {"indices": ix.to(torch.int32), "logprobs": v, "tail": tail})
        del teacher
    return out, {"hits": len(examples) - len(missing), "computed": len(missing)}


def _with_tail(top_logprobs: torch.Tensor, tail_logprob: torch.Tensor) -> torch.Tensor:
    return torch.cat([top_logprobs, tail_logprob[:, None].clamp(min=-1e4)], dim=-1)


def summed_kl(student_logits: torch.Tensor, targets: list[TeacherTargets], temperature: float) -> torch.Tensor:
    """Sum over positions of T^2 x KL(teacher || student) over the teacher's top k + a tail bucket
    (see the module docstring). `student_logits`: (positions, vocabulary), the targets' positions
    concatenated in the same order."""
    indices = torch.cat([t.indices for t in targets]).to(student_logits.device)
    teacher_top = torch.cat([t.logprobs for t in targets]).to(student_logits.device)
    scaled = student_logits / temperature
    total = torch.logsumexp(scaled, dim=-1)
    student_top = scaled.gather(-1, indices) - total[:, None]
    # the student's mass outside the k tokens: a large negative (not -inf) for them keeps gradients finite
    student_tail = torch.logsumexp(scaled.scatter(-1, indices, -1e9), dim=-1) - total
    teacher_tail = torch.cat([t.tail for t in targets]).to(student_logits.device)
    teacher = _with_tail(teacher_top, teacher_tail)
    student = _with_tail(student_top, student_tail)
    return (teacher.exp() * (teacher - student)).sum() * temperature ** 2


class Distiller:
    """The replay examples, their cached teacher targets, and the per-step loss term."""

    def __init__(self, spec: PipelineSpec, examples: list[EncodedExample], targets: list[TeacherTargets], stats: dict,
                 pad_id: int, device: str):
        self.cfg = spec.training.distillation
        self.examples, self.targets, self.stats = examples, targets, stats
        self.pad_id, self.device = pad_id, device
        self.order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(spec.training.seed)).tolist()

    @classmethod
    def prepare(cls, spec: PipelineSpec, model_dir: Path, tokenizer, cache_dir: Path, device: str,
                pad_id: int, train_frame=None, train_tasks=None) -> "Distiller | None":
        """None when `distillation.weight` is 0 (the run is exactly a run without distillation).

        `train_frame` (with `train_tasks`, each row's task or None for the spec's): the train split, whose
        rows the term scores when `distillation.replay.source` is `train`.
        """
        cfg = spec.training.distillation
        if cfg.weight == 0:
            return None
        from ..spec import TRAIN_ROWS
        from .augment import GENERAL_TASK, load_replay
        from ..formatting import encode_frame

        teacher = teacher_dir(spec, model_dir)
        if teacher != Path(model_dir):
            check_same_tokenizer(Path(model_dir), teacher)
        if cfg.replay.source == TRAIN_ROWS:  # the train rows, each with its task's main template
            if train_frame is None:
                raise ValueError("training.distillation.replay.source: train needs the train split")
            n = min(cfg.replay.examples, len(train_frame))
            examples = encode_frame(tokenizer, train_frame.iloc[:n], spec, train_tasks[:n] if train_tasks else None)
        else:
            replay = load_replay(spec, cfg.replay, cfg.replay.examples, spec.training.seed)
            examples = encode_frame(tokenizer, replay, spec, [GENERAL_TASK] * len(replay))
        texts = [tokenizer.decode(e.input_ids) for e in examples]
        targets, stats = teacher_targets(teacher, examples, texts, cfg.top_k, cfg.temperature, cache_dir, device)
        return cls(spec, examples, targets, stats | {"teacher": str(teacher), "replay_examples": len(examples),
                                                     "source": cfg.replay.source}, pad_id, device)

    def batch_for_step(self, step: int) -> list[int]:
        """The replay examples of optimizer step `step` (0-based): a seeded cycle through the set."""
        n, size = len(self.examples), min(self.cfg.batch_size, len(self.examples))
        return [self.order[(step * size + j) % n] for j in range(size)]

    def loss(self, model, rows: list[int]) -> tuple[torch.Tensor, int]:
        """(summed T^2-scaled KL over the answer positions of `rows`, number of positions)."""
        from ..torchkit import collate, response_logits

        logits, _ = response_logits(model, collate([self.examples[i] for i in rows], self.pad_id, self.device))
        return summed_kl(logits, [self.targets[i] for i in rows], self.cfg.temperature), len(logits)
