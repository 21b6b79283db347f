"""Distillation into a smaller model (the spec's `student:` section): the teacher's answers, and the
teacher vs student report. Pure stages; the Dagster layer is `defs/student.py`, training is `training.train`.

- **Teacher answers** (sequence-level distillation, Kim & Rush 2016): the teacher answers every train and
  validation prompt, greedily by default (or one seeded sample per prompt: the seed is a function of
  `generation.seed` and the prompt's tokens, so an answer does not depend on the batch or row order).
  Answers are cached per teacher (its weights hash) and prompt, so a rerun, or a run with new rows,
  asks the teacher only about prompts it has not answered. A row is quarantined with its reason when its
  prompt leaves no room for `max_new_tokens` within the pipeline's `model.max_length`, when the answer
  has not ended within `max_new_tokens` (cutting it would teach the student to stop mid-answer), when
  it is empty, or when prompt + answer do not fit the student's `max_length`: rows in = answered rows +
  quarantined rows.
- **The report** scores the teacher and the student on the same test rows with `evaluation.score_model`
  (task metric, loss) and measures, in the same run, their parameter counts and greedy generation
  speed: each model generates exactly `speed_new_tokens` tokens for each of the first `speed_prompts`
  test prompts (the end-of-turn token held back, so both do the same work), batched as the evaluation
  is; after one untimed warm-up batch each, the timed passes alternate teacher, student, teacher, ...
  (`speed_repeats` each) and the fastest pass of each model counts, so that load from other processes
  hits both alike. Speed figures are this machine's at that moment: the report says where and when.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from . import atomic
from .evaluation import ModelScores, primary_metric, score_model, test_rows
from .formatting import build_messages, encode_example, generation_prompt_ids
from .quality.pii import mask_pii
from .schema import column_or_none, quarantine_rows
from .spec import PipelineSpec, StudentGenerationSpec, StudentReportSpec, TaskSpec

ANSWER_STAGE = "student_answers"
ANSWER_CACHE_COLUMNS = ["key", "answer", "finished", "n_tokens"]


class StudentError(ValueError):
    """A student section that cannot be carried out (no promoted teacher, tokenizers that differ, ...)."""


def check_logits_teacher(spec: PipelineSpec, student_dir: Path, teacher_dir: Path) -> None:
    """Logits distillation compares the two models' next-token distributions token id by token id: refuse a
    teacher whose tokenizer differs from the student's, saying what differs."""
    from .training.distill import tokenizer_differences

    if spec.student.uses_logits and (differences := tokenizer_differences(student_dir, teacher_dir)):
        raise StudentError(
            f"{spec.spec_path or '<spec>'}: student.distillation: {spec.student.distillation} compares the two models' "
            f"next-token distributions token by token, but the student's tokenizer differs from the teacher's "
            f"({', '.join(differences)} differ); use distillation: sequence, or a student with the teacher's tokenizer")


def answer_key(teacher_hash: str, prompt_ids: list[int], cfg: StudentGenerationSpec) -> str:
    """The cache key of one answer: the teacher's weights, the prompt's tokens and what shapes decoding."""
    decoding = [cfg.max_new_tokens, cfg.temperature] + ([cfg.top_p, cfg.seed] if cfg.temperature > 0 else [])
    blob = json.dumps([teacher_hash, prompt_ids, decoding])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {r["key"]: r for r in pd.read_parquet(path).to_dict("records")}


@torch.no_grad()
def teacher_answers(rows: pd.DataFrame, teacher_dir: Path, teacher_hash: str, task: TaskSpec,
                    cfg: StudentGenerationSpec, max_length: int, student_dir: Path, student_max_length: int,
                    cache_file: Path, device: str, precision: str = "fp32") -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The teacher's answer to each row's prompt -> (answered rows, quarantine, stats).

    Answered rows keep every input column; `response` becomes the teacher's answer and the row's own
    answer moves to `gold_response`. `cache_file`: the teacher's answers so far (read, then extended).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .preference.generation import sample_continuations, sample_seed

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    frame = rows.reset_index(drop=True)
    prompt_ids = [generation_prompt_ids(tokenizer, p, s if isinstance(s, str) else None, task, h)
                  for p, s, h in zip(frame["prompt"], frame["system"], column_or_none(frame, "history"))]
    keys = [answer_key(teacher_hash, ids, cfg) for ids in prompt_ids]
    fits = [len(ids) + cfg.max_new_tokens <= max_length for ids in prompt_ids]
    cache = _read_cache(cache_file)
    cached_before = sum(1 for k, ok in zip(keys, fits) if ok and k in cache)
    todo = sorted({k for k, ok in zip(keys, fits) if ok and k not in cache})
    if todo:
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).to(device).eval()
        outputs = sample_continuations(
            teacher, tokenizer, [prompt_ids[first[k]] for k in todo], [sample_seed(cfg.seed, k, 0) for k in todo],
            temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size, device=device, precision=precision)
        eos = tokenizer.eos_token_id
        for k, (ids, finished) in zip(todo, outputs):
            text = tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True).strip()
            cache[k] = {"key": k, "answer": text, "finished": bool(finished), "n_tokens": len(ids)}
        del teacher
        atomic.write_parquet(cache_file, pd.DataFrame(list(cache.values()), columns=ANSWER_CACHE_COLUMNS))

    student_tokenizer = AutoTokenizer.from_pretrained(student_dir)
    reasons: list[str | None] = []
    for i, (key, ok) in enumerate(zip(keys, fits)):
        if not ok:
            reasons.append(f"prompt is {len(prompt_ids[i])} tokens; with generation.max_new_tokens {cfg.max_new_tokens} "
                           f"it does not fit model.max_length {max_length} (refused, not truncated)")
            continue
        answer = cache[key]
        if not answer["finished"]:
            reasons.append(f"the teacher's answer did not end within student.generation.max_new_tokens "
                           f"{cfg.max_new_tokens} (not cut: the student would learn to stop mid-answer)")
        elif not answer["answer"]:
            reasons.append("the teacher's answer is empty")
        else:
            row = frame.iloc[i]
            system = row["system"] if isinstance(row["system"], str) else None
            encoded = encode_example(student_tokenizer, build_messages(row["prompt"], answer["answer"], system, task,
                                                                       row.get("history")), student_max_length)
            reasons.append(None if not encoded.truncated else
                           f"prompt + teacher answer are {len(encoded.input_ids)}+ tokens for the student, over its "
                           f"max_length {student_max_length} (refused, not truncated)")
    bad = pd.Series([r is not None for r in reasons])
    refused = frame[bad.to_numpy()]
    quarantine = quarantine_rows(refused, ANSWER_STAGE, pd.Series([r for r in reasons if r is not None], dtype=object))
    kept_idx = [i for i, r in enumerate(reasons) if r is None]
    answered = frame.iloc[kept_idx].rename(columns={"response": "gold_response"}).reset_index(drop=True)
    answered.insert(answered.columns.get_loc("gold_response"), "response",
                    pd.Series([cache[keys[i]]["answer"] for i in kept_idx], dtype=object))
    answered["teacher_tokens"] = [int(cache[keys[i]]["n_tokens"]) for i in kept_idx]
    stats = {"rows_in": len(frame), "rows_answered": len(answered), "rows_quarantined": len(quarantine),
             "teacher_generated": len(todo), "rows_read_from_cache": cached_before,
             "answers_equal_to_gold": int((answered["response"].astype(str).str.strip().str.lower()
                                           == answered["gold_response"].astype(str).str.strip().str.lower()).sum())}
    return answered, quarantine, stats


def parameter_count(model) -> int:
    """Parameters of a model as it is served (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _timed_generation(model, tokenizer, prompt_ids: list[list[int]], new_tokens: int, batch_size: int, device: str,
                      precision: str) -> tuple[float, int]:
    """(seconds, tokens generated) of greedy generation of exactly `new_tokens` tokens per prompt."""
    from .preference.generation import sample_continuations

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = sample_continuations(model, tokenizer, prompt_ids, [0] * len(prompt_ids), temperature=0.0, top_p=1.0,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, batch_size=batch_size,
                               device=device, precision=precision)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, sum(len(ids) for ids, _ in out)


def measure_speed(models: dict[str, tuple], rows: pd.DataFrame, task: TaskSpec, cfg: StudentReportSpec,
                  batch_size: int, device: str, precision: str) -> dict[str, dict]:
    """Greedy generation speed of each `(model, tokenizer)`, measured alternately (module docstring)."""
    prompts = rows.head(cfg.speed_prompts)
    ids = {name: [generation_prompt_ids(tok, p, s if isinstance(s, str) else None, task, h)
                  for p, s, h in zip(prompts["prompt"], prompts["system"], column_or_none(prompts, "history"))]
           for name, (_, tok) in models.items()}
    for name, (model, tok) in models.items():  # warm-up: one batch, untimed
        _timed_generation(model, tok, ids[name][:batch_size], cfg.speed_new_tokens, batch_size, device, precision)
    passes: dict[str, list[tuple[float, int]]] = {name: [] for name in models}
    for _ in range(cfg.speed_repeats):
        for name, (model, tok) in models.items():
            passes[name].append(_timed_generation(model, tok, ids[name], cfg.speed_new_tokens, batch_size, device,
                                                  precision))
    out = {}
    for name, timings in passes.items():
        seconds, tokens = min(timings)
        out[name] = {"prompts": len(prompts), "new_tokens_per_prompt": cfg.speed_new_tokens, "batch_size": batch_size,
                     "tokens": tokens, "seconds": round(seconds, 4), "tokens_per_second": round(tokens / seconds, 2),
                     "passes_seconds": [round(s, 4) for s, _ in timings]}
    return out


def compare(spec: PipelineSpec, student_spec: PipelineSpec, test: pd.DataFrame, teacher: tuple, student: tuple,
            device: str, precision: str, described: dict[str, str]) -> dict:
    """Teacher vs student on the test rows: `evaluation.score_model` for each (the student with its own
    max_length), parameter counts, and speed measured here (`measure_speed`). `teacher`/`student`: a
    loaded (model, tokenizer) each; `described`: what each model is, for the report."""
    rows = test_rows(test, spec)
    scores: dict[str, ModelScores] = {
        "teacher": score_model(*teacher, rows, spec, device),
        "student": score_model(*student, rows, student_spec, device),
    }
    speed = measure_speed({"teacher": teacher, "student": student}, rows, spec.task, spec.student.report,
                          spec.evaluation.batch_size, device, precision)
    metric = primary_metric(spec.task)
    report = {"pipeline": spec.name, "task": spec.task.type, "primary_metric": metric, "n_test": len(rows),
              "distillation": spec.student.distillation, "device": device, "precision": precision,
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for name, (model, _) in (("teacher", teacher), ("student", student)):
        report[name] = {"model": described[name], "metrics": scores[name].metrics, "parameters": parameter_count(model),
                        "speed": speed[name]}
    t, s = report["teacher"], report["student"]
    report["student_vs_teacher"] = {
        f"{metric}_change": s["metrics"][metric] - t["metrics"][metric],
        "parameters_ratio": s["parameters"] / t["parameters"],
        "speedup": s["speed"]["tokens_per_second"] / t["speed"]["tokens_per_second"],
    }
    report["samples"] = [
        {"example_id": str(row.example_id), "prompt": str(row.prompt), "expected": str(row.response),
         "teacher": scores["teacher"].raw_outputs[i].strip(), "student": scores["student"].raw_outputs[i].strip()}
        for i, row in enumerate(rows.head(spec.evaluation.num_samples).itertuples())]
    return report


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_markdown(report: dict) -> str:
    t, s, d = report["teacher"], report["student"], report["student_vs_teacher"]
    metric = report["primary_metric"]
    names = [m for m in t["metrics"] if m in s["metrics"]]
    heading = (f"Distillation: {report['distillation']}; test rows: {report['n_test']}; primary metric: **{metric}**. "
               f"Teacher: {t['model']}. Student: {s['model']}.")
    lines = [f"# Student report: {report['pipeline']}", "", heading, "",
             "| | teacher | student | student vs teacher |", "|---|---|---|---|"]
    lines += [f"| {m} | {_fmt(t['metrics'][m])} | {_fmt(s['metrics'][m])} | "
              f"{_fmt(d[f'{metric}_change']) if m == metric else ''} |" for m in names]
    ts, ss = t["speed"], s["speed"]
    how = (f"Speed: greedy generation of {ts['new_tokens_per_prompt']} tokens for each of {ts['prompts']} test prompts, "
           f"batch {ts['batch_size']}, {report['precision']} on {report['device']}, fastest of the alternating passes "
           f"(teacher {ts['passes_seconds']} s, student {ss['passes_seconds']} s), measured {report['measured_at']}: "
           "compare the two within this report only.")
    lines += [f"| parameters | {t['parameters']:,} | {s['parameters']:,} | x{d['parameters_ratio']:.3f} |",
              f"| generation tokens/s | {ts['tokens_per_second']} | {ss['tokens_per_second']} | x{d['speedup']:.2f} |",
              "", how]

    def cell(v) -> str:
        return mask_pii(str(v)).replace("|", "\\|").replace("\n", " ")[:160]

    lines += ["", "## Sample generations", "", "| prompt | expected | teacher | student |", "|---|---|---|---|"]
    lines += [f"| {cell(x['prompt'])} | {cell(x['expected'])} | {cell(x['teacher'])} | {cell(x['student'])} |"
              for x in report["samples"]]
    return "\n".join(lines) + "\n"


def write_report(directory: Path, report: dict) -> None:
    atomic.write_json(directory / "student_report.json", report)
    atomic.write_text(directory / "student_report.md", render_markdown(report))
