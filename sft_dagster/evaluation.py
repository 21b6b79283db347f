"""Base model vs fine-tuned model on the test split: task metric, loss, error analysis, samples.

Label tasks score accuracy and macro-F1 on the first word of a greedy generation, mapped to the label
set (anything else counts as an invalid answer, and wrong). Generation tasks score exact match
(GSM8K-style `#### answer` compared on the final answer). Both get the mean response-token loss and
perplexity. The test split is scored as labelled; for label tasks with cleanlab flags, a corrected
view (suggested labels on flagged rows) is reported beside it, never instead of it.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import prompt_model
from .formatting import IGNORE_INDEX, EncodedExample, build_messages, encode_example, generation_prompt_ids, pad_id
from .quality.pii import mask_pii
from .schema import column_or_none, frame_hash
from .spec import MAIN_TASK, PipelineSpec, TaskSpec
from .training.trainer import (autocast, collate, mean_loss_over, pick_device, pick_precision,
                               summed_response_loss)

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


def _cache_argument(model) -> str:
    """The keyword a model's forward (and `generate`) takes a KV cache under: `cache` in transformers
    5.2x, `past_key_values` before (still accepted there, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SharedPrefix:
    """The tokens every sequence starts with (the chat template's system turn, the task's instruction,
    the few-shot turns), run through the model once; each batch continues from a copy of their KV cache.

    On the demo's test rows 48 of a zero-shot prompt's 75 tokens are shared, 348 of a 5-shot prompt's
    375 and 24 of a retention prompt's 44 (SmolLM2's tokenizer): without the prefix every batch ran
    them again. Each row keeps at least one token of its own (`generate` needs one to start from), and
    `limit` caps the prefix (the loss stops it before the first token that carries loss).
    The continuation sees the same positions and keys as the whole sequence: the rows' own tokens are
    padded between the prefix and them (masked), and position ids count unmasked tokens only.
    """

    def __init__(self, model, sequences: list[list[int]], device: str, precision: str, limit: int | None = None):
        n = 0
        for column in zip(*sequences):
            if any(token != column[0] for token in column):
                break
            n += 1
        n = min([n, *(len(s) - 1 for s in sequences), *([limit] if limit is not None else [])]) if sequences else 0
        self.ids, self.config, self.cache = (sequences[0][:n] if n > 0 else []), model.config, None
        if self.ids:
            self.cache = self._empty()
            with autocast(device, precision):
                model(input_ids=torch.tensor([self.ids], device=device), use_cache=True, logits_to_keep=1,
                      **{_cache_argument(model): self.cache})

    def __len__(self) -> int:
        return len(self.ids)

    def _empty(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def cache_for(self, rows: int):
        """A KV cache for a batch of `rows` rows: its own copy of the prefix's (empty without a prefix)."""
        if self.cache is None:
            return self._empty()
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


def _prompt_ids(tokenizer, df: pd.DataFrame, task: TaskSpec) -> list[list[int]]:
    return [generation_prompt_ids(tokenizer, p, s, task, h)
            for p, s, h in zip(df["prompt"], df["system"], column_or_none(df, "history"))]


def _encoded(tokenizer, df: pd.DataFrame, task: TaskSpec, max_length: int) -> list[EncodedExample]:
    return [encode_example(tokenizer, build_messages(p, r, s, task, h), max_length)
            for p, r, s, h in zip(df["prompt"], df["response"], df["system"], column_or_none(df, "history"))]


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device: str,
              precision: str, replies: list[list[int]] | None = None) -> tuple[list[str], float, int]:
    """Greedy generations in the prompts' order; with `replies`, also the summed cross-entropy of each
    row's reply given its prompt and the number of reply tokens (`_reply_loss`)."""
    pad = pad_id(tokenizer)
    prefix = SharedPrefix(model, prompts, device, precision)
    outputs: list[str] = [""] * len(prompts)
    total, count = 0.0, 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        tails = [prompts[i][len(prefix):] for i in rows]
        width = len(prefix) + max(len(t) for t in tails)
        ids = torch.tensor([prefix.ids + [pad] * (width - len(prefix) - len(t)) + t for t in tails], device=device)
        mask = torch.tensor([[1] * len(prefix) + [0] * (width - len(prefix) - len(t)) + [1] * len(t) for t in tails],
                            device=device)
        cache = prefix.cache_for(len(rows))
        with autocast(device, precision):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                return_dict_in_generate=True, output_logits=replies is not None, **{_cache_argument(model): cache},
            )
        for i, row in zip(rows, out.sequences):
            outputs[i] = tokenizer.decode(row[width:], skip_special_tokens=True)
        if replies is not None:
            loss, n = _reply_loss(model, out.logits[0], cache, mask, [replies[i] for i in rows], pad, device, precision)
            total, count = total + float(loss), count + n
    return outputs, total, count


def _reply_loss(model, first_logits: torch.Tensor, cache, prompt_mask: torch.Tensor, replies: list[list[int]], pad: int,
                device: str, precision: str) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of each row's reply after its prompt, on generation's own work: the first
    reply token on the logits of generation's first step (the prompt's last position), the others on
    one forward of the replies after generation's KV cache cut back to the prompt."""
    targets = torch.tensor([r[0] for r in replies], device=device)
    loss = torch.nn.functional.cross_entropy(first_logits.float(), targets, reduction="sum")
    width = max(len(r) for r in replies)
    if width == 1:
        return loss, len(replies)
    generated = cache.get_seq_length() - prompt_mask.shape[1]
    if generated > 0:
        cache.crop(-generated)  # a negative count removes that many tokens, in every transformers 5 release
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in replies], device=device)
    batch = {"input_ids": ids,  # labels as in training: the token each position's predecessor predicts
             "labels": torch.tensor([[IGNORE_INDEX] + r[1:] + [IGNORE_INDEX] * (width - len(r)) for r in replies], device=device),
             "attention_mask": torch.cat([prompt_mask, torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies],
                                                                    device=device)], dim=1),
             "position_ids": prompt_mask.sum(dim=1, keepdim=True) + torch.arange(width, device=device),
             _cache_argument(model): cache}
    with autocast(device, precision):
        rest, n = summed_response_loss(model, batch)
    return loss + rest, len(replies) + n


def generate(model, tokenizer, df: pd.DataFrame, task: TaskSpec, max_new_tokens: int, batch_size: int, device: str,
             precision: str = "fp32") -> list[str]:
    """Greedy generations for each row's prompt, in the rows' order.

    Batched by prompt length (little padding), after the prompts' shared prefix, computed once
    (`SharedPrefix`); each row stops at the end-of-turn token.

    Greedy decoding is a function of the prompt's tokens, so rows with the same prompt are generated
    once and share the reply: a test split with several reference replies per prompt (the preference
    demo's has four) costs one generation per distinct prompt.
    """
    rows = [tuple(p) for p in _prompt_ids(tokenizer, df, task)]
    distinct = list(dict.fromkeys(rows))
    replies = dict(zip(distinct, _generate(model, tokenizer, [list(p) for p in distinct], max_new_tokens, batch_size,
                                           device, precision)[0]))
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
            out[_cache_argument(model)] = prefix.cache_for(len(rows))
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
                       batch_size: int, device: str, precision: str = "fp32",
                       context_turns: int = 0) -> tuple[list[str], float]:
    """`generate` and `response_loss` in one pass over the prompts: the loss reuses generation's prompt
    KV cache and first-step logits, so only the reply tokens run again (measured on the demo: the loss
    forward cost as much as generation). Rows with loss before their last reply (multi-turn history) or
    truncated ones, few-shot context turns (`context_turns`) and prompts repeated across rows (generated
    once by `generate`) take the two separate passes."""
    prompts = _prompt_ids(tokenizer, df, task)
    replies = [_reply_after(p, e) for p, e in zip(prompts, _encoded(tokenizer, df, task, max_length))]
    if (not prompts or context_turns or any(r is None for r in replies)
            or len({tuple(p) for p in prompts}) < len(prompts)):
        return (generate(model, tokenizer, df, task, max_new_tokens, batch_size, device, precision),
                response_loss(model, tokenizer, df, task, max_length, batch_size, device, precision, context_turns))
    outputs, total, count = _generate(model, tokenizer, prompts, max_new_tokens, batch_size, device, precision, replies)
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
                context_turns: int = 0) -> ModelScores:
    """Task metric on greedy generations, and (`with_loss`) the mean reply-token loss and perplexity
    (`context_turns`: see `response_loss`)."""
    cfg, task = spec.evaluation, spec.task
    precision = pick_precision(spec.training.precision, device)
    if with_loss:
        raw, loss = generate_with_loss(model, tokenizer, test, task, cfg.max_new_tokens, spec.model.max_length,
                                       cfg.batch_size, device, precision, context_turns)
    else:
        raw, loss = generate(model, tokenizer, test, task, cfg.max_new_tokens, cfg.batch_size, device, precision), float("nan")
    expected = test["response"].astype(str).tolist()
    if task.is_label_task:
        predictions = [normalise_label(r, task.labels) for r in raw]
        metrics = _label_metrics(expected, predictions, task.labels)
    else:
        predictions = [r.strip() for r in raw]
        metrics = _generation_metrics(expected, raw)
    if with_loss:
        metrics |= {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    return ModelScores(predictions=predictions, raw_outputs=raw, loss=loss, metrics=metrics)


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
            **{name: _label_metrics(corrected, scores.predictions, task.labels) for name, scores in models.items()}}


def primary_metric(task: TaskSpec) -> str:
    return "accuracy" if task.is_label_task else "exact_match"


def _difference(a: dict, b: dict) -> dict:
    return {k: a[k] - b[k] for k in b if isinstance(b[k], float) and isinstance(a.get(k), float)}


def build_report(test: pd.DataFrame, base: ModelScores, tuned: ModelScores, spec: PipelineSpec,
                 champion: ModelScores | None = None, champion_version: str | None = None,
                 base_few_shot: ModelScores | None = None, few_shot: dict | None = None,
                 retention: dict | None = None) -> dict:
    """Base model (zero-shot and, when given, k-shot), the current champion (the promoted version, when
    there is one) and the candidate (`tuned`), scored on the same test rows; retention beside them."""
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
        "base": base.metrics,
        "base_few_shot": base_few_shot.metrics if base_few_shot is not None else None,
        "few_shot": few_shot if base_few_shot is not None else None,
        "champion": champion.metrics if champion is not None else None,
        "champion_version": champion_version if champion is not None else None,
        "tuned": tuned.metrics,
        "improvement": _difference(tuned.metrics, base.metrics),
        "improvement_over_champion": _difference(tuned.metrics, champion.metrics) if champion is not None else None,
        "retention": retention,
        "slices": _slices(test, models, task),
        "samples": samples,
    }
    if (view := _corrected_view(test, models, task)) is not None:
        report["corrected_view"] = view
    return report


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
    from .formatting import history_turns

    turns = []
    for ex in examples.itertuples():
        turns += [{"role": "user", "content": task.prompt_template.format(prompt=ex.prompt)},
                  {"role": "assistant", "content": str(ex.response)}]
    histories = [json.dumps(turns + history_turns(h), ensure_ascii=False) for h in column_or_none(rows, "history")]
    return rows.assign(history=histories)


def test_rows(test: pd.DataFrame, spec: PipelineSpec) -> pd.DataFrame:
    """The rows scored: the whole test split, or a deterministic subset of `max_examples`."""
    rows = test.sort_values("example_id").reset_index(drop=True)
    if spec.evaluation.max_examples:
        rows = rows.head(spec.evaluation.max_examples)
    return rows


def load_tuned_model(model_dir: Path, adapter_dir: Path, method: str, device: str, base=None):
    """A fine-tuned model as it is served: a full model directory, or a LoRA/QLoRA adapter merged into the
    full-precision base (merged weights score exactly like the adapter and generate faster)."""
    from transformers import AutoModelForCausalLM

    if method == prompt_model.METHOD:
        raise prompt_model.PromptModelError(f"{adapter_dir} is a few-shot prompt model: it has no weights of its own; "
                                            "load the base model and prompt it with the examples in its prompt.json")
    if method == "full":
        return AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32).to(device).eval()
    from peft import PeftModel

    base = base if base is not None else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(device).eval()


def _cached(cache_dir: Path | None, key: dict, compute) -> dict:
    """Scores of a model that did not change (the base model, an adapter by its lineage hash) are computed
    once per test split and evaluation settings, then read back: a nightly run scores only what is new."""
    if cache_dir is None:
        return compute()
    from . import atomic

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir / f"{digest}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic.write_json(path, value)
    return value


RETENTION_MAX_NEW_TOKENS = 12


def score_retention(model, tokenizer, items: pd.DataFrame, batch_size: int, device: str, precision: str) -> dict:
    """Greedy answers to the retention prompts and the mean NLL of their reference answers."""
    outputs, nll = generate_with_loss(model, tokenizer, items, TaskSpec(type="instruction"), RETENTION_MAX_NEW_TOKENS,
                                      10**6, batch_size, device, precision)
    return {"outputs": outputs, "nll": nll}


def evaluate(spec: PipelineSpec, model_dir: Path, adapter_dir: Path, test: pd.DataFrame, device: str = "auto",
             method: str | None = None, adapter_id: str | None = None, champion: dict | None = None,
             cache_dir: Path | None = None, cache_key: dict | None = None, train: pd.DataFrame | None = None) -> dict:
    """Score the base model (zero-shot, and k-shot with examples from `train`), the champion (when given)
    and the fine-tuned candidate on the same test rows, and each on the retention prompts.

    adapter_id: the candidate's lineage hash. champion: `{"version", "adapter_dir", "method", "lineage_hash"}`
    of the currently promoted model. cache_dir/cache_key: where and under what identity (base model
    hashes, code version) scores are cached, per model (the base, or an adapter by its lineage hash):
    a nightly run scores only what is new, and a champion's scores are the ones it had as a candidate.
    A candidate or champion of method `few_shot` (a prompt model, sft_dagster/prompt_model.py) is the
    base model scored on its prompted rows; its retention scores are the base model's (same weights).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .retention import retention_set, retention_summary

    cfg = spec.evaluation
    device = pick_device(device)
    method = method or spec.training.method
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
    candidates = [("base", None, "", "base"), ("tuned", adapter_dir, method, adapter_id)]
    if champion is not None:
        candidates.insert(1, ("champion", Path(champion["adapter_dir"]), champion["method"], champion["lineage_hash"]))
    prompts: dict[str, dict] = {}
    for name, directory, model_method, model_id in candidates:
        loaded = []
        model_spec, model_rows, context_turns = spec, rows, 0
        if model_method == prompt_model.METHOD:  # the base model's weights, prompted with the model's examples
            prompts[name] = prompt_model.read(directory)
            model_spec, model_rows = prompt_model.prompted(spec, rows, prompts[name])
            directory, context_turns = None, 2 * prompts[name]["k"]

        def model():
            if not loaded:
                loaded.append(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
                              if directory is None else load_tuned_model(model_dir, directory, model_method, device))
            return loaded[0]

        def cached(part: str, compute, key: dict = identity) -> dict:
            # a candidate without an id is scored afresh (nothing says it is the same model next time)
            return compute() if model_id is None else _cached(cache_dir, key | {"model": model_id, "part": part}, compute)

        scores[name] = ModelScores(**cached("test", lambda r=model_rows, s=model_spec, c=context_turns: vars(
            score_model(model(), tokenizer, r, s, device, context_turns=c))))
        if name == "base" and len(shots):
            prompted = with_few_shot(rows, shots, spec.task)
            few = cached(f"few_shot:{','.join(shots['example_id'])}",
                         lambda: vars(score_model(model(), tokenizer, prompted, spec, device, with_loss=False)))
            scores["base_few_shot"] = ModelScores(**few)
        if items is not None and name in prompts:  # the base model's weights: general prompts are answered as by the base
            retained[name] = retained["base"]
        elif items is not None:
            retained[name] = cached(f"retention:{len(items)}",
                                    lambda: score_retention(model(), tokenizer, items, cfg.batch_size, device, precision),
                                    kept_identity)
        loaded.clear()
    retention = None
    if items is not None:
        retention = retention_summary(items, {n: r["outputs"] for n, r in retained.items()},
                                      {n: r["nll"] for n, r in retained.items()})
    few_shot = {"k": len(shots), "seed": cfg.few_shot_seed, "example_ids": shots["example_id"].tolist()}
    report = build_report(rows, scores["base"], scores["tuned"], spec, scores.get("champion"),
                          champion["version"] if champion else None, scores.get("base_few_shot"), few_shot, retention)
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


def render_markdown(report: dict) -> str:
    cols = _columns(report)
    heading = " | ".join(h for _, h in cols)
    rule = "|".join("---" for _ in range(len(cols) + 2))
    metrics = list(report["base"])
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
    for m in metrics:
        values = " | ".join(_fmt((report[k] or {}).get(m, "")) for k, _ in cols)
        lines.append(f"| {m} | {values} | {_fmt(reference.get(m, ''))} |")
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
    return "\n".join(lines) + "\n"
