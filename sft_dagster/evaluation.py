"""Base model vs fine-tuned model on the test split: task metric, loss, error analysis, samples.

Label tasks score accuracy and macro-F1 on the first word of a greedy generation, mapped to the label
set (anything else counts as an invalid answer, and wrong). Generation tasks score their task type's
metrics (chrF/BLEU/TER, ROUGE, exact match and token F1, length and repetition statistics:
sft_dagster/metrics/), each with a paired bootstrap 95% interval over the test rows for every model and
for the candidate's difference from the champion (or the base model). Both get the mean response-token
loss and perplexity. The test split is scored as labelled; for label tasks with cleanlab flags, a corrected
view (suggested labels on flagged rows) is reported beside it, never instead of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import judge as judging
from . import artefacts, metrics, prompt_model
from .artefacts import load_tuned_model
from .decoding import SharedPrefix, cache_argument, greedy
from .formatting import IGNORE_INDEX, EncodedExample, build_messages, encode_example, generation_prompt_ids, pad_id
from .metrics.label import INVALID
from .metrics.qa import normalise_answer
from .models import ResolvedModel
from .prompt_model import few_shot_examples, with_few_shot
from .quality.pii import mask_pii
from .schema import column_or_none, frame_hash
from .spec import MAIN_TASK, PipelineSpec, TaskSpec
from .torchkit import collate, mean_loss_over, pick_device, pick_precision, summed_response_loss


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


@dataclass
class ModelScores:
    predictions: list[str]
    raw_outputs: list[str]
    loss: float
    metrics: dict = field(default_factory=dict)
    # generated tokens per row (generation tasks; None in scores cached before it existed): cut-off outputs
    output_tokens: list[int] | None = None


class MetricValues(dict):
    """A model's metric values (`ModelScores.metrics`) carrying the per-row statistics they were computed
    from (`statistics`, of `rows`), so that the report's intervals reuse them rather than compute them a
    second time (`_statistics`). Only the values are data: JSON (the score cache, the report) writes a plain
    dict, so scores read back from the cache carry none and the report computes them once (what it saves:
    `_intervals`)."""

    def __init__(self, values: dict, rows: metrics.Rows | None = None, statistics: dict | None = None):
        super().__init__(values)
        self.rows, self.statistics = rows, statistics


def task_metrics(test: pd.DataFrame, scores: ModelScores, spec: PipelineSpec) -> MetricValues:
    """The task's metrics of one model's outputs (sft_dagster/metrics/), with the statistics they came from."""
    rows = metric_rows(test, scores, spec)
    stats = metrics.statistics(rows)
    return MetricValues(metrics.values(stats), rows, stats)


def _statistics(rows: metrics.Rows, scores: ModelScores) -> dict:
    """The per-row statistics of `rows`: those `scores.metrics` carries when they are of equal rows, else computed."""
    kept = scores.metrics
    if isinstance(kept, MetricValues) and kept.statistics is not None and kept.rows == rows:
        return kept.statistics
    return metrics.statistics(rows)


def _listed(value) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def references(test: pd.DataFrame) -> list[list[str]]:
    """Each row's references: its response, then those of a `references` column (a list of strings; from a
    source it lands in `metadata`, like every other extra field) that differ from it."""
    if "references" in test.columns:
        given = list(test["references"])
    else:
        given = [(json.loads(m) if isinstance(m, str) else {}).get("references") for m in column_or_none(test, "metadata")]
    return [[response, *dict.fromkeys(r for r in _listed(more) if r != response)]
            for response, more in zip(test["response"].astype(str), given)]


def metric_rows(test: pd.DataFrame, scores: ModelScores, spec: PipelineSpec,
                refs: list[list[str]] | None = None) -> metrics.Rows:
    """One model's scored outputs on the test rows, as the metrics read them."""
    task = spec.task
    return metrics.Rows(task=task.type, outputs=scores.raw_outputs, references=refs or references(test),
                        predictions=scores.predictions if task.is_label_task else None, labels=task.labels,
                        output_tokens=scores.output_tokens, max_new_tokens=spec.evaluation.max_new_tokens)


def _prompt_ids(tokenizer, df: pd.DataFrame, task: TaskSpec) -> list[list[int]]:
    return [generation_prompt_ids(tokenizer, p, s, task, h)
            for p, s, h in zip(df["prompt"], df["system"], column_or_none(df, "history"))]


def _encoded(tokenizer, df: pd.DataFrame, task: TaskSpec, max_length: int) -> list[EncodedExample]:
    return [encode_example(tokenizer, build_messages(p, r, s, task, h), max_length)
            for p, r, s, h in zip(df["prompt"], df["response"], df["system"], column_or_none(df, "history"))]


def _generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device: str,
              precision: str, replies: list[list[int]] | None = None,
              store: RowStore | None = None) -> tuple[list[str], float, int]:
    """Greedy generations in the prompts' order (`decoding.greedy`); with `replies`, also the summed
    cross-entropy of the replies given their prompts and the number of reply tokens. With `store`, rows
    it holds are read from it and only the others are generated (then added to it)."""
    keys = [RowStore.key(p, replies[i] if replies is not None else None, max_new_tokens) for i, p in enumerate(prompts)]
    todo = [i for i, k in enumerate(keys) if store is None or store.get(k) is None]
    done: dict[int, dict] = {} if store is None else {i: store.get(k) for i, k in enumerate(keys) if i not in set(todo)}
    if todo:
        tokens, losses = greedy(model, [prompts[i] for i in todo], max_new_tokens, batch_size, device, precision,
                                pad_id(tokenizer), tokenizer.eos_token_id,
                                replies=[replies[i] for i in todo] if replies is not None else None)
        for j, i in enumerate(todo):
            done[i] = {"output": tokenizer.decode(tokens[j], skip_special_tokens=True),
                       **({"loss": losses[j][0], "tokens": losses[j][1]} if losses is not None else {})}
            if store is not None:
                store.put(keys[i], done[i])
        if store is not None:
            store.save()
    rows = [done[i] for i in range(len(prompts))]
    return ([r["output"] for r in rows], sum(r.get("loss", 0.0) for r in rows), sum(r.get("tokens", 0) for r in rows))


def generate(model, tokenizer, df: pd.DataFrame, task: TaskSpec, max_new_tokens: int, batch_size: int, device: str,
             precision: str = "fp32", store: RowStore | None = None) -> list[str]:
    """Greedy generations for each row's prompt, in the rows' order (`decoding.greedy`: after the
    prompts' shared prefix, computed once; rows in prompt-length order, each leaving the batch at its
    end-of-turn token or `max_new_tokens`, the next rows taking its place). `store`: see `_generate`.

    Greedy decoding is a function of the prompt's tokens, so rows with the same prompt are generated
    once and share the reply: a test split with several reference replies per prompt (the preference
    demo's has four) costs one generation per distinct prompt.
    """
    rows = [tuple(p) for p in _prompt_ids(tokenizer, df, task)]
    distinct = list(dict.fromkeys(rows))
    replies = dict(zip(distinct, _generate(model, tokenizer, [list(p) for p in distinct], max_new_tokens, batch_size,
                                           device, precision, store=store)[0]))
    return [replies[p] for p in rows]


@torch.no_grad()
def response_loss(model, tokenizer, df: pd.DataFrame, task: TaskSpec, max_length: int, batch_size: int, device: str,
                  precision: str = "fp32", context_turns: int = 0) -> float:
    """Mean cross-entropy over reply tokens: the same tokens and the same loss as training.

    context_turns: the first turns of every row's history are prompt context (a few-shot prompt's
    examples): their replies carry no loss and their tokens do not count against `max_length`, so the
    loss is over the same reply tokens as the row scored without them.

    In length order, after the conversations' shared prefix (computed once, `SharedPrefix`), which
    ends before the first token that carries loss anywhere.
    """
    encoded = _encoded(tokenizer, df, task, max_length) if not context_turns else [
        _without_context(tokenizer, build_messages(p, r, s, task, h), context_turns, max_length)
        for p, r, s, h in zip(df["prompt"], df["response"], df["system"], column_or_none(df, "history"))]
    pad = pad_id(tokenizer)
    # labels[i] is the target of position i - 1: the prefix's last position must predict no loss token
    first_loss = min((next((i for i, t in enumerate(e.labels) if t != IGNORE_INDEX), len(e.labels)) for e in encoded),
                     default=0)
    prefix = SharedPrefix(model, [e.input_ids for e in encoded], device, precision, limit=first_loss - 1)
    n = len(prefix)
    tails = [EncodedExample(e.input_ids[n:], e.labels[n:], e.truncated) for e in encoded]

    def batch(rows: list[EncodedExample]) -> dict:
        out = collate(rows, pad, device)
        if n:
            out["attention_mask"] = torch.cat([out["attention_mask"].new_ones(len(rows), n), out["attention_mask"]], dim=1)
            out[cache_argument(model)] = prefix.cache_for(len(rows))
        return out

    return mean_loss_over(model, tails, batch_size, lambda e: len(e.input_ids), batch, summed_response_loss, device,
                          precision)


def _reply_after(prompt: list[int], example: EncodedExample) -> list[int] | None:
    """The loss tokens of `example` when they are one run right after `prompt` (the last reply, nothing
    truncated, no loss in earlier turns); else None."""
    n = len(prompt)
    if example.truncated or example.input_ids[:n] != prompt or any(t != IGNORE_INDEX for t in example.labels[:n]):
        return None
    rest = example.labels[n:]
    k = next((i for i, t in enumerate(rest) if t == IGNORE_INDEX), len(rest))
    return rest[:k] if k and all(t == IGNORE_INDEX for t in rest[k:]) else None


def generate_with_loss(model, tokenizer, df: pd.DataFrame, task: TaskSpec, max_new_tokens: int, max_length: int,
                       batch_size: int, device: str, precision: str = "fp32", context_turns: int = 0,
                       store: RowStore | None = None) -> tuple[list[str], float]:
    """`generate` and `response_loss` in one pass over the prompts: the loss reuses generation's prompt
    KV cache and first-step logits, so only the reply tokens run again (measured on the demo: the loss
    forward cost as much as generation). Rows with loss before their last reply (multi-turn history) or
    truncated ones, few-shot context turns (`context_turns`) and prompts repeated across rows (generated
    once by `generate`) take the two separate passes (`store`, see `_generate`, then holds the generations
    only: the loss is computed over all rows)."""
    prompts = _prompt_ids(tokenizer, df, task)
    replies = [_reply_after(p, e) for p, e in zip(prompts, _encoded(tokenizer, df, task, max_length))]
    if (not prompts or context_turns or any(r is None for r in replies)
            or len({tuple(p) for p in prompts}) < len(prompts)):
        return (generate(model, tokenizer, df, task, max_new_tokens, batch_size, device, precision, store),
                response_loss(model, tokenizer, df, task, max_length, batch_size, device, precision, context_turns))
    outputs, total, count = _generate(model, tokenizer, prompts, max_new_tokens, batch_size, device, precision, replies,
                                      store)
    return outputs, total / max(1, count)


def _without_context(tokenizer, messages: list[dict], context_turns: int, max_length: int):
    """A conversation encoded with no loss on its first `context_turns` history turns, cut at
    `max_length` tokens after them."""
    full = encode_example(tokenizer, messages, 10**9)
    n = context_turns + (messages[0]["role"] == "system")
    cut = len(encode_example(tokenizer, messages[:n], 10**9).input_ids)  # ends on an example's reply: a prefix
    labels = [IGNORE_INDEX] * cut + full.labels[cut:]
    return EncodedExample(input_ids=full.input_ids[:cut + max_length], labels=labels[:cut + max_length],
                      truncated=len(full.input_ids) > cut + max_length)


def score_model(model, tokenizer, test: pd.DataFrame, spec: PipelineSpec, device: str, with_loss: bool = True,
                context_turns: int = 0, store: RowStore | None = None) -> ModelScores:
    """The task's metrics (sft_dagster/metrics/) on greedy generations, and (`with_loss`) the mean
    reply-token loss and perplexity (`context_turns`: see `response_loss`; `store`: see `_generate`).

    Generation tasks also record each output's token count (`output_tokens`, for the share of outputs cut
    off at max_new_tokens): the decoded output re-tokenized, because generation returns text only. It
    equals the generated count when the text round-trips (whole characters, the tokenizer's own splits; the
    end-of-turn token is not in the text, so an output that ended counts fewer). It errs high where
    generation split a character's UTF-8 bytes (each decodes to U+FFFD, 3 bytes again: the test fixture's
    random model re-tokenized 6 generated tokens to 6-10) and low where it chose a non-canonical split;
    the cut-off flags agreed with generation's own tokens on all 8 rows of that fixture."""
    cfg, task = spec.evaluation, spec.task
    precision = pick_precision(spec.training.precision, device)
    if with_loss:
        raw, loss = generate_with_loss(model, tokenizer, test, task, cfg.max_new_tokens, spec.model.max_length,
                                       cfg.batch_size, device, precision, context_turns, store)
    else:
        raw, loss = generate(model, tokenizer, test, task, cfg.max_new_tokens, cfg.batch_size, device, precision,
                             store), float("nan")
    output_tokens = None
    if task.is_label_task:
        predictions = [normalise_label(r, task.labels) for r in raw]
    else:
        predictions = [r.strip() for r in raw]
        output_tokens = [len(ids) for ids in tokenizer(raw, add_special_tokens=False)["input_ids"]] if raw else []
    scores = ModelScores(predictions=predictions, raw_outputs=raw, loss=loss, output_tokens=output_tokens)
    scores.metrics = task_metrics(test, scores, spec)
    if with_loss:
        scores.metrics |= {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    return scores


def _correct(scores: ModelScores, test: pd.DataFrame, task: TaskSpec) -> pd.Series:
    if task.is_label_task:
        hits = [p == e for p, e in zip(scores.predictions, test["response"])]
    else:
        hits = [normalise_answer(p) == normalise_answer(e) for p, e in zip(scores.raw_outputs, test["response"])]
    return pd.Series(hits, index=test.index)


def _slices(test: pd.DataFrame, models: dict[str, ModelScores], task: TaskSpec) -> dict:
    """Error analysis: the task metric per label (label tasks) and per prompt-length quartile, per model."""
    frame = pd.DataFrame({name: _correct(scores, test, task) for name, scores in models.items()})

    def table(groups) -> dict:
        return {str(k): {"n": int(len(g)), **{name: float(g[name].mean()) for name in models}} for k, g in groups}

    out: dict = {}
    if task.is_label_task:
        out["by_label"] = table(frame.groupby(test["response"].astype(str)))
    length = test["prompt"].str.len()
    buckets = pd.qcut(length, q=min(4, max(1, length.nunique())), duplicates="drop")
    out["by_prompt_length"] = table(frame.groupby(buckets, observed=True))
    return out


def _corrected_view(test: pd.DataFrame, models: dict[str, ModelScores], task: TaskSpec) -> dict | None:
    if not task.is_label_task or "is_label_issue" not in test:
        return None
    flagged = test["is_label_issue"].fillna(False).astype(bool) & test["suggested_label"].notna()
    corrected = test["response"].where(~flagged, test["suggested_label"]).astype(str).tolist()
    return {"relabelled_rows": int(flagged.sum()),
            **{name: metrics.score(metrics.Rows(task=task.type, outputs=scores.raw_outputs, references=[[c] for c in corrected],
                                                predictions=scores.predictions, labels=task.labels))
               for name, scores in models.items()}}


def primary_metric(task: TaskSpec) -> str:
    """The task type's default metric (`promotion.metric` unless the spec names another): accuracy for label
    tasks, chrf (translation), rougeLsum (summarization), exact_match (qa), rougeL (instruction, style);
    the reasons are in the metric families' modules (sft_dagster/metrics/)."""
    return metrics.primary_metric(task.type)


def _difference(a: dict, b: dict) -> dict:
    return {k: a[k] - b[k] for k in b if isinstance(b[k], float) and isinstance(a.get(k), float)}


def build_report(test: pd.DataFrame, base: ModelScores, tuned: ModelScores, spec: PipelineSpec,
                 champion: ModelScores | None = None, champion_version: str | None = None,
                 base_few_shot: ModelScores | None = None, few_shot: dict | None = None,
                 retention: dict | None = None, judged: dict | None = None) -> dict:
    """Base model (zero-shot and, when given, k-shot), the current champion (the promoted version, when
    there is one) and the candidate (`tuned`), scored on the same test rows; retention beside them, and
    the candidate's judged win rates (`judged`: `judge_candidate`) when the spec has a judge."""
    task = spec.task
    models = {"base": base, **({"base_few_shot": base_few_shot} if base_few_shot is not None else {}),
              **({"champion": champion} if champion is not None else {}), "tuned": tuned}
    samples = [
        {"example_id": str(row.example_id), "prompt": str(row.prompt), "expected": str(row.response),
         **{name: scores.raw_outputs[i].strip() for name, scores in models.items()}}
        for i, row in enumerate(test.head(spec.evaluation.num_samples).itertuples())
    ]
    report = {
        "pipeline": spec.name,
        "task": task.type,
        "primary_metric": primary_metric(task),
        "n_test": len(test),
        "base": dict(base.metrics),  # the values only (MetricValues' statistics stay with the scores)
        "base_few_shot": dict(base_few_shot.metrics) if base_few_shot is not None else None,
        "few_shot": few_shot if base_few_shot is not None else None,
        "champion": dict(champion.metrics) if champion is not None else None,
        "champion_version": champion_version if champion is not None else None,
        "tuned": dict(tuned.metrics),
        "improvement": _difference(tuned.metrics, base.metrics),
        "improvement_over_champion": _difference(tuned.metrics, champion.metrics) if champion is not None else None,
        "retention": retention,
        "slices": _slices(test, models, task),
        "samples": samples,
    }
    report["intervals"], report["metric_info"] = _intervals(test, models, spec)
    if not task.is_label_task:
        report["references"] = metrics.reference_lengths(references(test)) | {"scoring": metrics.MULTI_REFERENCE}
    if judged is not None:
        report["win_rate"] = win_rates(judged, champion_version)
    if (view := _corrected_view(test, models, task)) is not None:
        report["corrected_view"] = view
    return report


def _intervals(test: pd.DataFrame, models: dict[str, ModelScores], spec: PipelineSpec) -> tuple[dict, dict]:
    """Paired bootstrap intervals of every model's metrics and of the candidate's difference from the base
    model and the champion (`metrics.paired_intervals`), and what each metric is (`metrics.describe`).

    Each model's per-row statistics are the ones `score_model` computed (`MetricValues`), not computed again:
    benchmarks/metrics_cost.py (200 rows, four models, 2 shared cores, three runs) measured the report at
    0.57-0.84 s instead of 0.93-1.31 s for translation and 0.23-0.37 s instead of 0.92-1.61 s for
    summarization (ROUGE's stemming was computed twice); qa and label tasks, whose statistics are cheap,
    the same. Scores read back from the score cache carry none, and their statistics are computed here once."""
    start = time.perf_counter()
    refs = references(test)
    stats = {name: _statistics(metric_rows(test, scores, spec, refs), scores) for name, scores in models.items()}
    pairs = {"tuned_minus_base": ("tuned", "base"), **({"tuned_minus_champion": ("tuned", "champion")}
                                                       if "champion" in models else {})}
    intervals = metrics.paired_intervals(stats, pairs)
    intervals["compared_with"] = "tuned_minus_champion" if "champion" in models else "tuned_minus_base"
    intervals["seconds"] = round(time.perf_counter() - start, 3)
    return intervals, metrics.describe(stats.get("tuned") or {})


def judge_candidate(judge: judging.Judge, test: pd.DataFrame, models: dict[str, ModelScores], spec: PipelineSpec,
                    source: str) -> dict:
    """The candidate's win value (1, 0.5, 0; `judge.Judge.wins`) on each of the first
    `evaluation.judge.max_examples` test rows against the base model and, when scored, the champion; the
    request the judge reads is the row's user turn (the task's prompt template applied).

    Returns {"judge": source, "n", "wins": {model: values}, "computed": ordered pairs run through the judge
    (not read from its cache), "seconds"}."""
    start = time.perf_counter()
    n = min(len(test), spec.evaluation.judge.max_examples or len(test))
    requests = [spec.task.prompt_template.format(prompt=p) for p in test["prompt"].astype(str).head(n)]
    tuned = models["tuned"].raw_outputs[:n]
    wins = {name: judge.wins(requests, tuned, models[name].raw_outputs[:n]) for name in ("base", "champion")
            if name in models}
    return {"judge": source, "n": n, "wins": wins, "computed": judge.computed,
            "seconds": round(time.perf_counter() - start, 2)}


def win_rates(judged: dict, champion_version: str | None = None) -> dict:
    """The report's `win_rate`: per judged model, the candidate's mean win value with its 95% bootstrap
    interval over the judged rows (the win values as a mean, resampled as the metrics' intervals are:
    `metrics.paired_intervals`), and its wins, ties and losses."""
    stats = {name: {"win_rate": metrics.mean_of(values)} for name, values in judged["wins"].items()}
    drawn = metrics.paired_intervals(stats, {})
    labels = {"base": "base", "champion": f"champion {champion_version}"}
    versus = {}
    for name, values in judged["wins"].items():
        value = stats[name]["win_rate"].value()  # NaN: no row judged
        versus[name] = {"label": labels[name], "value": None if value != value else value,
                        "interval": drawn["models"].get(name, {}).get("win_rate"), "wins": values.count(1.0),
                        "ties": values.count(0.5), "losses": values.count(0.0)}
    return {"judge": judged["judge"], "n": judged["n"], "method": judging.METHOD,
            "interval_method": (f"bootstrap over the {judged['n']} judged rows, {drawn['resamples']} resamples (seed "
                                f"{drawn['seed']}), percentile"), "confidence": drawn["confidence"], "versus": versus, "computed": judged["computed"],
            "seconds": judged["seconds"]}


def test_rows(test: pd.DataFrame, spec: PipelineSpec) -> pd.DataFrame:
    """The rows scored: the whole test split, or a deterministic subset of `max_examples`."""
    rows = test.sort_values("example_id").reset_index(drop=True)
    if spec.evaluation.max_examples:
        rows = rows.head(spec.evaluation.max_examples)
    return rows


def _cached(cache_dir: Path | None, key: dict, compute) -> dict:
    """Scores of a model that did not change (the base model, an adapter by its lineage hash) are computed
    once per test split and evaluation settings, then read back: a nightly run scores only what is new."""
    if cache_dir is None:
        return compute()
    from . import atomic

    path = cache_dir / f"{_digest(key, 16)}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic.write_json(path, value)
    return value


def _digest(value, n: int) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:n]


class RowStore:
    """One model's greedy generations (and reply losses) row by row, kept in one JSON file: a nightly run
    whose test split gained rows generates only the new ones, where the whole-part cache (`_cached`,
    keyed by every row) misses as soon as one row changes.

    A row is keyed by its prompt's token ids, its reply's (the loss; None without) and `max_new_tokens`;
    the file by everything else the generation depends on (`identity`: the model, base model and
    tokenizer hashes, code version, precision). `computed` counts the rows generated since it was opened.
    """

    def __init__(self, directory: Path | None, identity: dict):
        self.path = directory / "rows" / f"{_digest(identity, 16)}.json" if directory is not None else None
        self.rows: dict[str, dict] = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}
        self.computed, self._unsaved = 0, False

    @staticmethod
    def key(prompt: list[int], reply: list[int] | None, max_new_tokens: int) -> str:
        return _digest([prompt, reply, max_new_tokens], 24)

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        self.rows[key] = row
        self.computed, self._unsaved = self.computed + 1, True

    def save(self) -> None:
        from . import atomic

        if self.path is not None and self._unsaved:
            atomic.write_json(self.path, self.rows)
            self._unsaved = False


RETENTION_MAX_NEW_TOKENS = 12


def score_retention(model, tokenizer, items: pd.DataFrame, batch_size: int, device: str, precision: str,
                    store: RowStore | None = None) -> dict:
    """Greedy answers to the retention prompts and the mean NLL of their reference answers (`store`: see
    `_generate`)."""
    outputs, nll = generate_with_loss(model, tokenizer, items, TaskSpec(type="instruction"), RETENTION_MAX_NEW_TOKENS,
                                      10**6, batch_size, device, precision, store=store)
    return {"outputs": outputs, "nll": nll}


def evaluate(spec: PipelineSpec, model_dir: Path, adapter_dir: Path, test: pd.DataFrame, device: str = "auto",
             method: str | None = None, adapter_id: str | None = None, champion: dict | None = None,
             cache_dir: Path | None = None, cache_key: dict | None = None, train: pd.DataFrame | None = None,
             judge: ResolvedModel | None = None) -> dict:
    """Score the base model (zero-shot, and k-shot with examples from `train`), the champion (when given)
    and the fine-tuned candidate on the same test rows, and each on the retention prompts.

    adapter_id: the candidate's lineage hash. champion: `{"version", "adapter_dir", "method", "lineage_hash"}`
    of the currently promoted model. cache_dir/cache_key: where and under what identity (base model
    hashes, code version) scores are cached, per model (the base, or an adapter by its lineage hash):
    a nightly run scores only what is new, and a champion's scores are the ones it had as a candidate.
    A candidate or champion of method `few_shot` (a prompt model, sft_dagster/prompt_model.py) is the
    base model scored on its prompted rows; its retention scores are the base model's (same weights).
    Below the whole-part cache, each model's generations are kept row by row (`RowStore`): new test rows
    are the only ones generated.

    `seconds_by_part`: per model, the wall seconds of loading it and of each part it is scored on
    (`zero_shot`: generation and loss on the test rows, `few_shot`, `retention`; a part read from the
    cache takes ~0), and `report`: the report from the scores (metrics' intervals, slices).
    `generated_rows`: per model and part, the rows generated rather than read from a cache.

    judge: the resolved `evaluation.judge.model` (generation tasks): the candidate's win rate against the
    base model and the champion (`judge_candidate`; its margins cached under `cache_dir/judge`), its
    seconds in `seconds_by_part["judge"]`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .retention import retention_set, retention_summary

    cfg = spec.evaluation
    device = pick_device(device)
    method = method or spec.training.adapter
    precision = pick_precision(spec.training.precision, device)
    rows = test_rows(test, spec)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    identity = {"rows": frame_hash(rows[["example_id", "prompt", "response"]]), "task": spec.task.model_dump(mode="json"),
                "evaluation": cfg.model_dump(mode="json"), "max_length": spec.model.max_length,
                "precision": precision, **(cache_key or {})}
    shots = few_shot_examples(train if train is not None else rows.head(0), spec.task, cfg.few_shot_k, cfg.few_shot_seed)
    items = retention_set(cfg.retention_examples) if cfg.retention_examples else None
    # retention scores depend on the model and the retention prompts, not on the test split or the task:
    # a nightly run with new test rows reuses the base model's
    kept_identity = {"items": frame_hash(items[["example_id", "prompt", "response"]]) if items is not None else None,
                     "batch_size": cfg.batch_size, "precision": precision, **(cache_key or {})}

    scores: dict[str, ModelScores] = {}
    retained: dict[str, dict] = {}
    seconds: dict = {}
    generated: dict[str, dict[str, int]] = {}
    candidates = [("base", None, "", "base"), ("tuned", adapter_dir, method, adapter_id)]
    if champion is not None:
        candidates.insert(1, ("champion", Path(champion["adapter_dir"]), champion["method"], champion["lineage_hash"]))
    prompts: dict[str, dict] = {}
    for name, directory, model_method, model_id in candidates:
        loaded, clock, generated[name] = [], seconds.setdefault(name, {}), {}
        model_spec, model_rows, context_turns = spec, rows, 0
        if artefacts.kind_of(model_method) == artefacts.PROMPT:  # the base model's weights, prompted with its examples
            prompts[name] = prompt_model.read(directory)
            model_spec, model_rows = prompt_model.prompted(spec, rows, prompts[name])
            directory, context_turns = None, 2 * prompts[name]["k"]
        # the weights' generations, row by row: a prompt model's are the base model's
        store = RowStore(cache_dir if model_id is not None else None,
                         {"model": "base" if directory is None else model_id, "precision": precision, **(cache_key or {})})

        def model():
            if not loaded:
                start = time.perf_counter()
                loaded.append(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
                              if directory is None else load_tuned_model(model_dir, directory, model_method, device))
                clock["load"] = round(time.perf_counter() - start, 2)
            return loaded[0]

        def cached(part: str, label: str, compute, key: dict = identity) -> dict:
            # a candidate without an id is scored afresh (nothing says it is the same model next time)
            start, load, before = time.perf_counter(), clock.get("load", 0.0), store.computed
            value = compute() if model_id is None else _cached(cache_dir, key | {"model": model_id, "part": part}, compute)
            clock[label] = round(time.perf_counter() - start - (clock.get("load", 0.0) - load), 2)  # loading apart
            generated[name][label] = store.computed - before
            return value

        scores[name] = ModelScores(**cached("test", "zero_shot", lambda r=model_rows, s=model_spec, c=context_turns: vars(
            score_model(model(), tokenizer, r, s, device, context_turns=c, store=store))))
        if name == "base" and len(shots):
            prompted = with_few_shot(rows, shots, spec.task)
            few = cached(f"few_shot:{','.join(shots['example_id'])}", "few_shot",
                         lambda: vars(score_model(model(), tokenizer, prompted, spec, device, with_loss=False, store=store)))
            scores["base_few_shot"] = ModelScores(**few)
        if items is not None and name in prompts:  # the base model's weights: general prompts are answered as by the base
            retained[name] = retained["base"]
        elif items is not None:
            retained[name] = cached(f"retention:{len(items)}", "retention",
                                    lambda: score_retention(model(), tokenizer, items, cfg.batch_size, device, precision,
                                                            store),
                                    kept_identity)
        loaded.clear()
    retention = None
    if items is not None:
        retention = retention_summary(items, {n: r["outputs"] for n, r in retained.items()},
                                      {n: r["nll"] for n, r in retained.items()})
    few_shot = {"k": len(shots), "seed": cfg.few_shot_seed, "example_ids": shots["example_id"].tolist()}
    judged = None
    if judge is not None and cfg.judge is not None and not spec.task.is_label_task:
        judged = judge_candidate(judging.Judge(judge.path, {"model": judge.model_hash, "tokenizer": judge.tokenizer_hash},
                                               device, cfg.batch_size, cache_dir / "judge" if cache_dir else None),
                                 rows, scores, spec, judge.source)
        seconds["judge"] = judged["seconds"]
    start = time.perf_counter()
    report = build_report(rows, scores["base"], scores["tuned"], spec, scores.get("champion"),
                          champion["version"] if champion else None, scores.get("base_few_shot"), few_shot, retention,
                          judged)
    seconds["report"] = round(time.perf_counter() - start, 2)
    report["seconds_by_part"], report["generated_rows"] = seconds, generated
    report["candidate_method"] = method
    if champion is not None:
        report["champion_method"] = champion["method"]
    # a prompt model says what it is: k, seed and the example ids of its prompt
    report["prompt_models"] = {name: {"k": p["k"], "seed": p["seed"], "example_ids": [e["example_id"] for e in p["examples"]],
                                      "base_model": p["base_model"]["source"]} for name, p in prompts.items()} or None
    return report


def evaluate_tasks(spec: PipelineSpec, model_dir: Path, adapter_dir: Path, splits: pd.DataFrame, **kwargs) -> dict:
    """`evaluate` on the test split of a single-task spec; for a multi-task spec, on each task's own test
    rows (with its own template, labels and few-shot examples from its own train rows).

    A multi-task report is the main task's report (the retention evaluation runs once, there) with
    `tasks`: every task's report by name, and `mix`: each task's primary metric for base and candidate
    and their mean weighted by the tasks' test rows.
    """
    from .multitask import TASK_COLUMN

    if not spec.tasks:
        return evaluate(spec, model_dir, adapter_dir, splits[splits["split"] == "test"].reset_index(drop=True),
                        train=splits[splits["split"] == "train"], **kwargs)
    reports = {}
    for name in spec.task_specs():
        task_spec = spec.task_pipeline(name)
        if name != MAIN_TASK:  # retention measures the adapter, not a task: once is enough
            task_spec = task_spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"retention_examples": 0})})
        rows = splits[splits[TASK_COLUMN] == name]
        train = rows[rows["split"] == "train"].drop_duplicates("example_id")
        reports[name] = evaluate(task_spec, model_dir, adapter_dir, rows[rows["split"] == "test"].reset_index(drop=True),
                                 train=train, **kwargs)
    mix = {name: {"metric": r["primary_metric"], "n_test": r["n_test"], "base": r["base"].get(r["primary_metric"]),
                  "tuned": r["tuned"].get(r["primary_metric"])} for name, r in reports.items()}
    n = sum(m["n_test"] for m in mix.values())
    mean = {which: sum(m[which] * m["n_test"] for m in mix.values()) / max(1, n) for which in ("base", "tuned")}
    return reports[MAIN_TASK] | {"tasks": reports, "mix": {"tasks": mix, "mean_primary_metric": mean}}


def write_report(directory: Path, report: dict) -> None:
    """`evaluation.json` and `evaluation.md` in `directory`, each written atomically."""
    from . import atomic

    atomic.write_json(directory / "evaluation.json", report)
    atomic.write_text(directory / "evaluation.md", render_markdown(report))


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# What a training run did against overfitting and forgetting (training/augment.py, training/distill.py).
TRAINING_TECHNIQUES = ("neftune_alpha", "prompt_template_counts", "replay_examples_mixed", "distillation")


def training_summary(metrics: dict) -> dict | None:
    """The techniques a run used, from its metrics (None when it used none): shown beside retention."""
    used = {k: metrics[k] for k in TRAINING_TECHNIQUES if metrics.get(k)}
    return used or None


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _columns(report: dict) -> list[tuple[str, str]]:
    """(key, heading) of each scored model, in report order."""
    champion, few = report.get("champion"), report.get("base_few_shot")
    prompts = report.get("prompt_models") or {}
    kind = lambda name: f" ({prompts[name]['k']}-shot prompt)" if name in prompts else ""
    return [("base", "base"), *([("base_few_shot", f"base {report['few_shot']['k']}-shot")] if few else []),
            *([("champion", f"champion {report.get('champion_version')}{kind('champion')}")] if champion else []),
            ("tuned", f"candidate{kind('tuned')}")]


def _prompt_model_lines(report: dict) -> list[str]:
    """What a prompt model in the report is: no weights of its own, the base model and its examples."""
    lines = []
    for name, label in (("tuned", "The candidate"), ("champion", f"Champion {report.get('champion_version')}")):
        if p := (report.get("prompt_models") or {}).get(name):
            lines += ["", (f"{label} is a few-shot prompt, not a fine-tune: the base model `{p['base_model']}` with "
                           f"{p['k']} examples from the train split as earlier turns (seed {p['seed']}; example ids "
                           f"{', '.join(p['example_ids'])}); it has no trained weights.")]
    return lines


def _interval_lines(report: dict, cols: list[tuple[str, str]]) -> list[str]:
    """The metrics with their 95% intervals and the candidate's difference, the metrics' signatures, and how
    references were scored (reports written before intervals existed have none of it)."""
    intervals = report.get("intervals")
    if not intervals or not intervals.get("models"):
        return []
    versus = "champion" if intervals.get("compared_with") == "tuned_minus_champion" else "base"
    table = metrics.markdown_table(intervals, {k: report.get(k) or {} for k, _ in cols}, cols,
                                   intervals.get("compared_with"), f"candidate - {versus}")
    lines = ["", f"## {intervals['confidence']:.0%} intervals", "", *table]
    signed = {name: info["signature"] for name, info in (report.get("metric_info") or {}).items() if info.get("signature")}
    if signed:
        lines += ["", "Signatures: " + "; ".join(f"{name} `{sig}`" for name, sig in signed.items()) + "."]
    if refs := report.get("references"):
        lines += ["", (f"References: {refs.get('words_mean', 0):.1f} words on average (median {refs.get('words_p50', 0):.0f}, "
                       f"90th percentile {refs.get('words_p90', 0):.0f}; output lengths in words too); "
                       f"{refs.get('rows_with_several_references', 0)} rows with several references; {refs['scoring']}.")]
    return lines


def metrics_with_intervals(report: dict) -> dict:
    """Per metric, per model: `{"value", "low", "high"}`, and the candidate's difference from the model it is
    compared with (`difference`): the report's numbers as a UI metadata table."""
    intervals = report.get("intervals") or {}
    diff = (intervals.get("differences") or {}).get(intervals.get("compared_with")) or {}

    def entry(value, interval) -> dict:
        low, high = interval or (None, None)
        return {"value": value, "low": low, "high": high}

    out: dict = {}
    for model, found in (intervals.get("models") or {}).items():
        for name, interval in found.items():
            out.setdefault(name, {})[model] = entry((report.get(model) or {}).get(name), interval)
    for name, d in diff.items():
        out.setdefault(name, {})["difference"] = entry(d["value"], d["interval"])
    return out


def render_markdown(report: dict) -> str:
    cols = _columns(report)
    heading = " | ".join(h for _, h in cols)
    rule = "|".join("---" for _ in range(len(cols) + 2))
    names = list(report["base"])
    lines = [
        f"# Evaluation report: {report['pipeline']}",
        "",
        f"Task: {report['task']}; test rows: {report['n_test']}; primary metric: **{report['primary_metric']}**.",
        *_prompt_model_lines(report),
        "",
        f"| metric | {heading} | change vs {'champion' if report.get('champion') else 'base'} |",
        f"|{rule}|",
    ]
    reference = report.get("improvement_over_champion") or report["improvement"]
    for m in names:
        values = " | ".join(_fmt((report[k] or {}).get(m, "")) for k, _ in cols)
        lines.append(f"| {m} | {values} | {_fmt(reference.get(m, ''))} |")
    lines += _interval_lines(report, cols)
    lines += judging.markdown_lines(report.get("win_rate"))
    if decision := report.get("promotion"):
        lines += ["", f"**Promotion: {'promote' if decision['promote'] else 'do not promote'}.** {decision['reason']}"]
    if retention := report.get("retention"):
        names = [(k, h) for k, h in cols if k in retention["models"]]
        lines += ["", "## Retention (general prompts, catastrophic forgetting)", "",
                  f"{retention['n']} general prompts with reference answers; the base model answers "
                  f"{retention['base_right']} right. Forgetting = share of those the model now gets wrong.", "",
                  "| | " + " | ".join(h for _, h in names) + " |", "|" + "|".join("---" for _ in range(len(names) + 1)) + "|"]
        for field in ("accuracy", "reference_nll", "forgetting", "nll_change"):
            lines.append(f"| {field} | " + " | ".join(_fmt(retention["models"][k].get(field, "")) for k, _ in names) + " |")
    if used := report.get("training"):
        lines += ["", "## Training against overfitting and forgetting", ""]
        if used.get("neftune_alpha"):
            lines.append(f"- NEFTune: noise alpha {used['neftune_alpha']} on the input embeddings (training only)")
        if counts := used.get("prompt_template_counts"):
            lines.append("- Prompt templates (training rows each): " + "; ".join(f"`{t}` {n}" for t, n in counts.items()))
        if used.get("replay_examples_mixed"):
            lines.append(f"- Replay: {used['replay_examples_mixed']} general examples mixed into the train split")
        if d := used.get("distillation"):
            lines.append(f"- Distillation: KL to {d['teacher']} on {d['replay_examples']} replay examples (teacher run for "
                         f"{d['computed']}, read from the cache for {d['hits']}); last step's KL {_fmt(d.get('final_kl'))}")
    if mix := report.get("mix"):
        lines += ["", "## Tasks (one adapter for all)", "", "| task | metric | test rows | base | candidate | promotion |",
                  "|---|---|---|---|---|---|"]
        decisions = (report.get("promotion") or {}).get("tasks", {})
        for name, m in mix["tasks"].items():
            verdict = decisions.get(name, {}).get("promote")
            lines.append(f"| {name} | {m['metric']} | {m['n_test']} | {_fmt(m['base'])} | {_fmt(m['tuned'])} | "
                         f"{'' if verdict is None else ('pass' if verdict else 'block')} |")
        lines.append(f"| mix (mean weighted by test rows) | | | {_fmt(mix['mean_primary_metric']['base'])} | "
                     f"{_fmt(mix['mean_primary_metric']['tuned'])} | |")
    if view := report.get("corrected_view"):
        scored = ", ".join(f"{h} {_fmt(view[k]['accuracy'])}" for k, h in cols if k in view)
        lines += ["", f"Corrected view ({view['relabelled_rows']} test rows flagged by cleanlab scored against the "
                      f"suggested label), accuracy: {scored}."]
    for name, table in report["slices"].items():
        lines += ["", f"## Error analysis {name.replace('_', ' ')}", "", f"| slice | n | {heading} |",
                  f"|{rule}|"]
        lines += [f"| {k} | {v['n']} | " + " | ".join(_fmt(v.get(c, '')) for c, _ in cols) + " |" for k, v in table.items()]
    if versions := report.get("history"):
        names = sorted({m for v in versions for m in v["metrics"]}, key=lambda m: (m != report["primary_metric"], m))
        lines += ["", f"## Promoted versions (last {len(versions)}, newest first)", "",
                  "| version | promoted at | test rows | " + " | ".join(names) + " |",
                  "|" + "|".join("---" for _ in range(len(names) + 3)) + "|"]
        lines += [f"| {v['version']}{' (champion)' if v['champion'] else ''} | {v['promoted_at']} | {v['n_test']} | "
                  + " | ".join(_fmt(v["metrics"].get(m, "")) for m in names) + " |" for v in versions]
    # PII masked: the rendered report is also the asset's metadata in Dagster's event log.
    cell = lambda s: mask_pii(str(s)).replace("|", "\\|").replace("\n", " ")[:160]  # noqa: E731
    lines += ["", "## Sample generations", "", f"| prompt | expected | {heading} |", f"|{rule}|"]
    lines += [f"| {cell(s['prompt'])} | {cell(s['expected'])} | " + " | ".join(cell(s.get(c, '')) for c, _ in cols) + " |"
              for s in report["samples"]]
    return "\n".join(lines + _seconds_lines(report, cols)) + "\n"


SECONDS_PARTS = (("load", "loading"), ("zero_shot", "test rows (generation and loss)"), ("few_shot", "k-shot test rows"),
                 ("retention", "retention prompts"))


def _seconds_lines(report: dict, cols: list[tuple[str, str]]) -> list[str]:
    """Where the evaluation's time went: seconds per model and part, and the rows generated (not read from
    a cache) in brackets; none in reports written before `seconds_by_part` existed."""
    seconds, generated = report.get("seconds_by_part"), report.get("generated_rows") or {}
    if not seconds:
        return []
    names = [("base", "base"), *((k, h) for k, h in cols if k in seconds and k != "base")]
    lines = ["", "## Evaluation cost (seconds; rows generated, not read from a cache)", "",
             "| part | " + " | ".join(h for _, h in names) + " |", "|" + "|".join("---" for _ in range(len(names) + 1)) + "|"]
    for part, heading in SECONDS_PARTS:
        if any(part in seconds.get(k, {}) for k, _ in names):
            cells = [f"{seconds[k][part]:.1f}" + (f" ({generated[k][part]})" if part in generated.get(k, {}) else "")
                     if part in seconds.get(k, {}) else "" for k, _ in names]
            lines.append(f"| {heading} | " + " | ".join(cells) + " |")
    return lines + ["", f"Report (metrics' intervals, slices): {seconds.get('report', 0.0):.1f} s."]
