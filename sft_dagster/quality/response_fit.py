"""The base model's loss on each response with its prompt and without it: the `misaligned` finding's input.

Per row, two conversations are rendered through the tokenizer's chat template exactly as training
renders them (`formatting.build_messages` / `encode_example`: the assistant reply carries loss, nothing
else; its end-of-turn token is left out, see below):

- *with the prompt*: system, earlier turns, the user turn (the task's template around the row's prompt),
  the response;
- *without it*: the same system and the task's template around an empty prompt (no earlier turns),
  then the same response. The template's own instruction ("Translate to French: ...") is in both, so
  the ratio measures what the row's own prompt content adds, not the instruction.

`loss_with` / `loss_without` are the mean negative log-likelihoods (nats per reply token, the reply's
end-of-turn token left out: `_without_end`) and their ratio
is the instruction-following-difficulty score (IFD, Li et al. 2023): near 1 when the prompt does not
help predict the response. Rows are scored in batches sorted by length (fp32), and only the reply
positions go through the output layer. Scores are cached per row content (system, prompt, response,
history, task template, model weights and tokenizer) in `<cache_dir>/response_fit.json`, so a re-run
scores only new or changed rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import atomic
from ..formatting import IGNORE_INDEX, encode_example, build_messages, pad_id
from ..schema import column_or_none
from ..spec import TaskSpec

CACHE_FILE = "response_fit.json"
CACHE_VERSION = 2  # 2: the end-of-turn token is not scored
HEAD_CHUNK = 1024  # reply positions per pass through the output layer (bounded logits memory)


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def row_keys(frame: pd.DataFrame, task: TaskSpec, model_id: str) -> list[str]:
    """One cache key per row: everything the two losses depend on."""
    systems = column_or_none(frame, "system")
    histories = column_or_none(frame, "history")
    head = [CACHE_VERSION, model_id, task.prompt_template, task.system]
    keys = []
    for prompt, response, system, history in zip(frame["prompt"], frame["response"], systems, histories):
        blob = json.dumps(head + [str(prompt), str(response), _text(system), _text(history)])
        keys.append(hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24])
    return keys


def model_identity(model_dir: Path) -> str:
    """Content hashes of the model's weights and tokenizer (cached beside the model by `models`)."""
    from ..models import directory_hashes

    return ":".join(directory_hashes(model_dir))


def _sequences(tokenizer, frame: pd.DataFrame, task: TaskSpec, max_tokens: int,
               without_prompt: bool = True) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) with and without the prompt, alternating, for every row (with it only, when not
    `without_prompt`); the reply's tokens are labelled as training labels them, except its end-of-turn
    token (`_without_end`)."""
    systems = column_or_none(frame, "system")
    histories = column_or_none(frame, "history")
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    out = []
    for prompt, response, system, history in zip(frame["prompt"], frame["response"], systems, histories):
        response = str(response)
        variants = [build_messages(str(prompt), response, _text(system), task, history)]
        if without_prompt:
            variants.append(build_messages("", response, _text(system), task))
        for messages in variants:
            enc = encode_example(tokenizer, messages, max_length=10**9)
            out.append(_fit(enc.input_ids, _without_end(enc.input_ids, enc.labels, end), max_tokens))
    return out


def _without_end(ids: list[int], labels: list[int], end: int | None) -> list[int]:
    """The labels with the reply's end-of-turn token unlabelled. Whether a response ends on a full stop
    moves that one token's loss by up to 27 nats under SmolLM2-135M (multi30k captions without a final
    stop: 2.5-27 nats, with one: 0.4) and says nothing about whether it answers its prompt."""
    last = max((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), default=None)
    if last is None or ids[last] != end:
        return labels
    return labels[:last] + [IGNORE_INDEX] + labels[last + 1:]


def _fit(ids: list[int], labels: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """At most `max_tokens` tokens: the start of the prompt goes first, then the end of a very long reply
    (the reply is scored on its first `max_tokens // 2` tokens at least)."""
    if len(ids) <= max_tokens:
        return ids, labels
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    keep_reply = max(max_tokens // 2, max_tokens - first)
    end = min(len(ids), first + keep_reply)
    start = max(0, end - max_tokens)
    return ids[start:end], labels[start:end]


def shared_prefix(sequences: list[tuple[list[int], list[int]]]) -> int:
    """Tokens every sequence starts with (the system turn, the template's head), stopping before any
    sequence's first scored position: run once, its keys and values reused by every batch."""
    if not sequences:
        return 0
    first = sequences[0][0]
    length = min(next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels)) - 1
                 for _, labels in sequences)
    for ids, _ in sequences[1:]:
        same = 0
        while same < min(length, len(ids)) and ids[same] == first[same]:
            same += 1
        length = same
    return max(0, length)


def _batches(lengths: list[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Indices longest first, in batches of at most `batch_size` rows and `batch_tokens` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def score_sequences(model, sequences: list[tuple[list[int], list[int]]], pad: int,
                    batch_tokens: int, batch_size: int) -> np.ndarray:
    """Mean NLL (nats) of each sequence's labelled tokens; NaN where none is labelled.

    The prefix all sequences share runs once; the rest runs in length-sorted batches on its cached keys
    and values (at most `batch_size` rows and `batch_tokens` padded tokens each), and only the labelled
    positions go through the output layer.
    """
    import torch
    from transformers import DynamicCache

    out = np.full(len(sequences), np.nan)
    p = shared_prefix(sequences)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    rest = [(ids[p:], labels[p:]) for ids, labels in sequences]
    with torch.inference_mode():
        pre = decoder(input_ids=torch.tensor([sequences[0][0][:p]]), use_cache=True).cache if p else None
        pre_kv = [(layer.keys, layer.values) for layer in pre.layers] if pre is not None else None
        for batch in _batches([len(r[0]) for r in rest], batch_size, batch_tokens):
            b, width = len(batch), max(len(rest[i][0]) for i in batch)
            ids = torch.full((b, width), pad, dtype=torch.long)
            mask = torch.zeros((b, width), dtype=torch.long)
            targets = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
            for r, i in enumerate(batch):
                seq, lab = rest[i]
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
                targets[r, :len(lab) - 1] = torch.tensor(lab[1:])  # position t predicts token t + 1
            cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1).contiguous(), v.expand(b, -1, -1, -1).contiguous())
                                                 for k, v in pre_kv]) if pre_kv else None
            hidden = decoder(input_ids=ids, attention_mask=torch.cat([torch.ones((b, p), dtype=torch.long), mask], 1),
                             position_ids=p + torch.arange(width).expand(b, -1), cache=cache,
                             use_cache=cache is not None).last_hidden_state
            rows, cols = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
            nll = torch.empty(len(rows))
            for lo in range(0, len(rows), HEAD_CHUNK):
                r, c = rows[lo:lo + HEAD_CHUNK], cols[lo:lo + HEAD_CHUNK]
                logp = torch.log_softmax(head(hidden[r, c]).float(), -1)
                nll[lo:lo + HEAD_CHUNK] = -logp.gather(-1, targets[r, c][:, None]).squeeze(-1)
            sums = torch.zeros(b).index_add_(0, rows, nll)
            counts = torch.zeros(b).index_add_(0, rows, torch.ones(len(rows)))
            for r, i in enumerate(batch):
                if counts[r] > 0:
                    out[i] = float(sums[r] / counts[r])
    return out


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged cache is rebuilt, never trusted
    return data.get("rows", {}) if data.get("version") == CACHE_VERSION else {}


def response_losses(frame: pd.DataFrame, task: TaskSpec, model_dir: Path, cache_dir: Path | None = None,
                    batch_size: int = 16, batch_tokens: int = 8192, max_tokens: int = 1024) -> tuple[pd.DataFrame, dict]:
    """Per row (in `frame`'s order): `loss_with_prompt`, `loss_without_prompt` (nats per reply token), and
    cost figures: rows scored, rows from the cache, tokens, seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model_dir = Path(model_dir)
    keys = row_keys(frame, task, model_identity(model_dir))
    cache_path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    cache = _read_cache(cache_path)
    todo = [i for i, k in enumerate(keys) if k not in cache]
    info = {"rows": len(frame), "rows_scored": len(todo), "rows_from_cache": len(frame) - len(todo), "tokens_scored": 0}
    if todo:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        info["load_seconds"] = round(time.perf_counter() - start, 2)
        sequences = _sequences(tokenizer, frame.iloc[todo], task, max_tokens)
        shared = shared_prefix(sequences)  # run once
        info["tokens_scored"] = int(shared + sum(len(s[0]) - shared for s in sequences))
        losses = score_sequences(model, sequences, pad_id(tokenizer), batch_tokens, batch_size)
        for j, i in enumerate(todo):
            cache[keys[i]] = [_round(losses[2 * j]), _round(losses[2 * j + 1])]
        if cache_path is not None:  # the rows of this frame only: the cache never outgrows the data
            atomic.write_json(cache_path, {"version": CACHE_VERSION, "rows": {k: cache[k] for k in keys}}, indent=None)
    pairs = np.array([[np.nan if v is None else v for v in cache[k]] for k in keys], dtype=float).reshape(len(keys), 2)
    info["seconds"] = round(time.perf_counter() - start, 2)
    return pd.DataFrame({"loss_with_prompt": pairs[:, 0], "loss_without_prompt": pairs[:, 1]}, index=frame.index), info


DECOY_FILE = "response_fit_decoys.json"


def decoy_pairs(keys: list[str], eligible: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Up to `n` (row, decoy row) index pairs among the `eligible` rows: the rows in the order of a hash of
    their cache keys, each paired with the next one's prompt, the first `n` of that order taken. The
    order is the rows' own (a new row moves only its neighbours' pairs), so the cache serves re-runs."""
    rows = [i for i in np.flatnonzero(eligible)]
    if len(rows) < 2:
        return []
    rows.sort(key=lambda i: hashlib.sha256(("decoy:" + keys[i]).encode()).hexdigest())
    return [(rows[j], rows[(j + 1) % len(rows)]) for j in range(min(n, len(rows)))]


def decoy_losses(frame: pd.DataFrame, task: TaskSpec, model_dir: Path, pairs: list[tuple[int, int]],
                 cache_dir: Path | None = None, batch_size: int = 16, batch_tokens: int = 8192,
                 max_tokens: int = 1024) -> tuple[np.ndarray, dict]:
    """The base model's mean reply loss (nats per token) on row i's response after row j's prompt (its
    system, history and prompt: a pairing that is misaligned by construction) for each (i, j) of `pairs`;
    cached per pair content in `<cache_dir>/response_fit_decoys.json`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model_dir = Path(model_dir)
    keys = row_keys(frame, task, model_identity(model_dir))
    pair_keys = [f"{keys[i]}:{keys[j]}" for i, j in pairs]
    cache_path = Path(cache_dir) / DECOY_FILE if cache_dir is not None else None
    cache = _read_cache(cache_path)
    todo = [k for k, key in enumerate(pair_keys) if key not in cache]
    info = {"pairs": len(pairs), "pairs_scored": len(todo)}
    if todo:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        decoy = frame.iloc[[pairs[k][1] for k in todo]].reset_index(drop=True)
        decoy = decoy.assign(response=frame["response"].iloc[[pairs[k][0] for k in todo]].to_numpy())
        sequences = _sequences(tokenizer, decoy, task, max_tokens, without_prompt=False)  # the decoy's prompt
        losses = score_sequences(model, sequences, pad_id(tokenizer), batch_tokens, batch_size)
        for k, loss in zip(todo, losses):
            cache[pair_keys[k]] = _round(loss)
        if cache_path is not None:
            atomic.write_json(cache_path, {"version": CACHE_VERSION, "rows": {k: cache[k] for k in pair_keys}}, indent=None)
    info["seconds"] = round(time.perf_counter() - start, 2)
    return np.array([np.nan if cache[k] is None else cache[k] for k in pair_keys], dtype=float), info


def fit_preflight(frame: pd.DataFrame, task: TaskSpec, model_dir: Path, cache_dir: Path | None = None,
                  batch_size: int = 16, batch_tokens: int = 8192, max_tokens: int = 1024, timed_rows: int = 16) -> dict:
    """Before `response_losses`: the rows it will score (those not cached), their tokens (counted exactly)
    and its measured rate on `timed_rows` of them spread over the frame, so the estimate is the tokens at
    that rate plus the model load (both measured)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    keys = row_keys(frame, task, model_identity(Path(model_dir)))
    cache = _read_cache(Path(cache_dir) / CACHE_FILE if cache_dir is not None else None)
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if not todo:
        return {"rows": len(frame), "rows_to_score": 0, "estimated_seconds": 0.0}
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load = time.perf_counter() - start
    sequences = _sequences(tokenizer, frame.iloc[todo], task, max_tokens)
    shared = shared_prefix(sequences)
    tokens = shared + sum(len(ids) - shared for ids, _ in sequences)
    picked = sorted(set(np.linspace(0, len(todo) - 1, min(timed_rows, len(todo))).astype(int).tolist()))
    sample = [sequences[2 * j + k] for j in picked for k in (0, 1)]
    start = time.perf_counter()
    score_sequences(model, sample, pad_id(tokenizer), batch_tokens, batch_size)
    took = max(time.perf_counter() - start, 1e-3)
    sample_shared = shared_prefix(sample)
    rate = (sample_shared + sum(len(ids) - sample_shared for ids, _ in sample)) / took
    return {"rows": len(frame), "rows_to_score": len(todo), "tokens_to_score": int(tokens),
            "load_seconds": round(load, 2), "sample_rows": len(picked), "measured_tokens_per_second": round(rate, 1),
            "estimated_seconds": max(round(load + tokens / rate, 2), 0.01)}  # work to do is never 0 s


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)
