"""Base model vs fine-tuned model on the test split: task metric, loss, error analysis, samples.

Label tasks score accuracy and macro-F1 on the first word of a greedy generation, mapped to the label
set (anything else counts as an invalid answer, and wrong). Generation tasks score exact match
(GSM8K-style `#### answer` compared on the final answer). Both get the mean response-token loss and
perplexity. The test split is scored as labelled; for label tasks with cleanlab flags, a corrected
view (suggested labels on flagged rows) is reported beside it, never instead of it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .formatting import build_messages, encode_example, generation_prompt_ids
from .schema import column_or_none
from .spec import PipelineSpec, TaskSpec
from .training.trainer import autocast, collate, pick_device, pick_precision, summed_response_loss

INVALID = "<invalid>"


def normalise_label(text: str, labels: list[str]) -> str:
    """The label a generation names: its first word if that is a label, else the one label its first
    line mentions ("The review is positive"). No label, or several, is an invalid answer."""
    first_line = text.strip().split("\n", 1)[0].strip().lower()
    words = re.findall(r"[\w-]+", first_line)
    lookup = {label.lower(): label for label in labels}
    if words and words[0] in lookup:
        return lookup[words[0]]
    named = {lookup[w] for w in words if w in lookup}
    return named.pop() if len(named) == 1 else INVALID


def normalise_answer(text: str) -> str:
    text = text.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return re.sub(r"\s+", " ", text).strip().strip(".").lower()


@dataclass
class ModelScores:
    predictions: list[str]
    raw_outputs: list[str]
    loss: float
    metrics: dict = field(default_factory=dict)


def _label_metrics(expected: list[str], predicted: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(expected, predicted)),
        "macro_f1": float(f1_score(expected, predicted, labels=labels, average="macro", zero_division=0)),
        "invalid_rate": float(sum(p == INVALID for p in predicted) / max(1, len(predicted))),
    }


def _generation_metrics(expected: list[str], raw: list[str]) -> dict:
    matches = [normalise_answer(e) == normalise_answer(r) for e, r in zip(expected, raw)]
    return {"exact_match": float(sum(matches) / max(1, len(matches)))}


@torch.no_grad()
def generate(model, tokenizer, df: pd.DataFrame, task: TaskSpec, max_new_tokens: int, batch_size: int, device: str,
             precision: str = "fp32") -> list[str]:
    """Greedy generations for each row's prompt (batched, left-padded)."""
    prompts = [generation_prompt_ids(tokenizer, p, s, task, h)
               for p, s, h in zip(df["prompt"], df["system"], column_or_none(df, "history"))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with autocast(device, precision):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )
        outputs.extend(tokenizer.decode(row[width:], skip_special_tokens=True) for row in out)
    return outputs


@torch.no_grad()
def response_loss(model, tokenizer, df: pd.DataFrame, task: TaskSpec, max_length: int, batch_size: int, device: str,
                  precision: str = "fp32") -> float:
    """Mean cross-entropy over reply tokens: the same tokens and the same loss as training."""
    encoded = [
        encode_example(tokenizer, build_messages(p, r, s, task, h), max_length)
        for p, r, s, h in zip(df["prompt"], df["response"], df["system"], column_or_none(df, "history"))
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad, device)
        with autocast(device, precision):
            loss, n = summed_response_loss(model, batch)
        total, count = total + float(loss), count + n
    return total / max(1, count)


def score_model(model, tokenizer, test: pd.DataFrame, spec: PipelineSpec, device: str) -> ModelScores:
    cfg, task = spec.evaluation, spec.task
    precision = pick_precision(spec.training.precision, device)
    raw = generate(model, tokenizer, test, task, cfg.max_new_tokens, cfg.batch_size, device, precision)
    loss = response_loss(model, tokenizer, test, task, spec.model.max_length, cfg.batch_size, device, precision)
    expected = test["response"].astype(str).tolist()
    if task.is_label_task:
        predictions = [normalise_label(r, task.labels) for r in raw]
        metrics = _label_metrics(expected, predictions, task.labels)
    else:
        predictions = [r.strip() for r in raw]
        metrics = _generation_metrics(expected, raw)
    metrics |= {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    return ModelScores(predictions=predictions, raw_outputs=raw, loss=loss, metrics=metrics)


def _slices(test: pd.DataFrame, base: ModelScores, tuned: ModelScores, task: TaskSpec) -> dict:
    """Error analysis: the task metric per label (label tasks) and per prompt-length quartile."""
    correct = lambda s: pd.Series(  # noqa: E731
        [p == e for p, e in zip(s.predictions, test["response"])] if task.is_label_task
        else [normalise_answer(p) == normalise_answer(e) for p, e in zip(s.raw_outputs, test["response"])],
        index=test.index,
    )
    frame = pd.DataFrame({"base": correct(base), "tuned": correct(tuned)})
    out: dict = {}
    if task.is_label_task:
        out["by_label"] = {
            str(k): {"n": int(len(g)), "base": float(g["base"].mean()), "tuned": float(g["tuned"].mean())}
            for k, g in frame.groupby(test["response"].astype(str))
        }
    length = test["prompt"].str.len()
    buckets = pd.qcut(length, q=min(4, max(1, length.nunique())), duplicates="drop")
    out["by_prompt_length"] = {
        str(k): {"n": int(len(g)), "base": float(g["base"].mean()), "tuned": float(g["tuned"].mean())}
        for k, g in frame.groupby(buckets, observed=True)
    }
    return out


def _corrected_view(test: pd.DataFrame, base: ModelScores, tuned: ModelScores, task: TaskSpec) -> dict | None:
    if not task.is_label_task or "is_label_issue" not in test:
        return None
    flagged = test["is_label_issue"].fillna(False).astype(bool) & test["suggested_label"].notna()
    corrected = test["response"].where(~flagged, test["suggested_label"]).astype(str).tolist()
    return {
        "relabelled_rows": int(flagged.sum()),
        "base": _label_metrics(corrected, base.predictions, task.labels),
        "tuned": _label_metrics(corrected, tuned.predictions, task.labels),
    }


def primary_metric(task: TaskSpec) -> str:
    return "accuracy" if task.is_label_task else "exact_match"


def build_report(test: pd.DataFrame, base: ModelScores, tuned: ModelScores, spec: PipelineSpec) -> dict:
    task = spec.task
    improvement = {k: tuned.metrics[k] - base.metrics[k] for k in base.metrics if isinstance(base.metrics[k], float)}
    samples = [
        {
            "example_id": str(row.example_id),
            "prompt": str(row.prompt),
            "expected": str(row.response),
            "base": base.raw_outputs[i].strip(),
            "tuned": tuned.raw_outputs[i].strip(),
        }
        for i, row in enumerate(test.head(spec.evaluation.num_samples).itertuples())
    ]
    report = {
        "pipeline": spec.name,
        "task": task.type,
        "primary_metric": primary_metric(task),
        "n_test": len(test),
        "base": base.metrics,
        "tuned": tuned.metrics,
        "improvement": improvement,
        "slices": _slices(test, base, tuned, task),
        "samples": samples,
    }
    if (view := _corrected_view(test, base, tuned, task)) is not None:
        report["corrected_view"] = view
    return report


def test_rows(test: pd.DataFrame, spec: PipelineSpec) -> pd.DataFrame:
    """The rows scored: the whole test split, or a deterministic subset of `max_examples`."""
    rows = test.sort_values("example_id").reset_index(drop=True)
    if spec.evaluation.max_examples:
        rows = rows.head(spec.evaluation.max_examples)
    return rows


def evaluate(spec: PipelineSpec, model_dir: Path, adapter_dir: Path, test: pd.DataFrame, device: str = "auto") -> dict:
    """Score the base model, then the fine-tuned one, on the same test rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    rows = test_rows(test, spec)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    base = score_model(base_model, tokenizer, rows, spec, device)
    if spec.training.method == "full":
        del base_model
        tuned_model = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32).to(device).eval()
    else:
        from peft import PeftModel

        # Merged weights score exactly like the adapter and generate faster.
        tuned_model = PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload().to(device).eval()
    tuned = score_model(tuned_model, tokenizer, rows, spec, device)
    return build_report(rows, base, tuned, spec)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_markdown(report: dict) -> str:
    metrics = list(report["base"])
    lines = [
        f"# Evaluation report: {report['pipeline']}",
        "",
        f"Task: {report['task']}; test rows: {report['n_test']}; primary metric: **{report['primary_metric']}**.",
        "",
        "| metric | base | fine-tuned | change |",
        "|---|---|---|---|",
        *(f"| {m} | {_fmt(report['base'][m])} | {_fmt(report['tuned'][m])} | {_fmt(report['improvement'].get(m, ''))} |" for m in metrics),
    ]
    if view := report.get("corrected_view"):
        lines += [
            "",
            f"Corrected view ({view['relabelled_rows']} test rows flagged by cleanlab scored against the suggested label): "
            f"base accuracy {_fmt(view['base']['accuracy'])}, fine-tuned {_fmt(view['tuned']['accuracy'])}.",
        ]
    for name, table in report["slices"].items():
        lines += ["", f"## Error analysis {name.replace('_', ' ')}", "", "| slice | n | base | fine-tuned |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {_fmt(v['base'])} | {_fmt(v['tuned'])} |" for k, v in table.items()]
    lines += ["", "## Sample generations", "", "| prompt | expected | base | fine-tuned |", "|---|---|---|---|"]
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")[:160]  # noqa: E731
    lines += [f"| {cell(s['prompt'])} | {cell(s['expected'])} | {cell(s['base'])} | {cell(s['tuned'])} |" for s in report["samples"]]
    return "\n".join(lines) + "\n"
