"""The shared training loop (`run_training`) and SFT's building blocks: LoRA, QLoRA or full fine-tuning
of a causal LM with a response-only loss. What each method does differently lives in `methods/`
(SFT, reward model, DPO); `train` is SFT.

What makes it fast on a small CPU: batches grouped by length (little padding), and vocabulary logits
computed only where a token carries loss (the prompt never goes through the 49k-wide output layer).
What makes it safe: examples that would be truncated are refused, the loss is normalised by the loss
tokens of the whole accumulation window (so batch 8 x 1 equals batch 1 x 8), validation loss drives
early stopping and the best weights are kept, and checkpoints every N steps let a killed run resume.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .. import atomic
from ..formatting import IGNORE_INDEX, EncodedExample, build_messages, encode_example
from ..formatting import pad_id as pad_id_of
from ..schema import column_or_none
from ..spec import PipelineSpec, TaskSpec
from . import augment
from .fast_lora import use_fast_lora
from .precision import PrecisionChoice, cached_choice, machine_key, measure_precision, probe_cache_dir
from .progress import Progress

CHECKPOINTS_KEPT = 2


@dataclass
class TrainingResult:
    adapter_dir: Path
    method: str
    metrics: dict = field(default_factory=dict)


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Sum gradients over ranks: each rank's loss is already divided by the global token count."""
    import torch.distributed as dist

    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


@functools.cache
def _libc():
    import ctypes

    try:  # the symbols already loaded into this process (libc among them); no subprocess, no search
        return ctypes.CDLL(None)
    except OSError:
        return None


def release_freed_memory_to_os() -> None:
    """Hand the pages glibc keeps for freed blocks back to the OS (`malloc_trim`): before loading a model,
    after training, and when `HeapReleaser` sees the heap reach a new high between steps."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def resident_bytes() -> int | None:
    """This process's resident set now (Linux: /proc/self/statm), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapReleaser:
    """Between CPU training steps, trims glibc's heap only when its resident set reaches a new high.

    Freed activations stay in glibc's heap and the next step reuses them. Trimming after every step
    (as this trainer did) hands those pages back, so the next step page-faults them in again: on
    SmolLM2-135M, 400 Banking77 rows, 30 steps, that was 135k page faults and 0.45 s of kernel time
    per step, and throughput rose from 218.8 to 249.4 tokens/s without it (100 steps: 231.9 -> 258.2)
    while the peak RSS rose 1-3% (2,468 -> 2,541 MiB over 100 steps); without trimming, the resident
    set between steps stayed within the largest batch's footprint (no creep over 100 steps). A trim
    when the resident set exceeds the highest seen by `growth` still hands back what a fragmenting
    heap would accumulate; it fires a few times while the first batches grow the heap, then rarely.
    """

    def __init__(self, growth: float = 0.1, rss: Callable[[], int | None] = resident_bytes,
                 release: Callable[[], None] = release_freed_memory_to_os):
        self.growth, self._rss, self._release = growth, rss, release
        self.high: int | None = None
        self.trims = 0

    def after_step(self) -> bool:
        """Trim if the resident set is above the previous high by more than `growth`; True if it did."""
        rss = self._rss()
        if rss is None:
            return False
        if self.high is not None and rss <= self.high * (1 + self.growth):
            return False
        self._release()
        self.high, self.trims = rss, self.trims + 1
        return True


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def pick_precision(requested: str, device: str) -> str:
    """A precision without measuring: bf16 on CUDA with bf16 support, else fp32 (evaluation uses it).

    Training resolves `auto` by measurement instead (`resolve_precision`).
    """
    if requested != "auto":
        return requested
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return nullcontext()


def uses_autocast(method: str, precision: str) -> bool:
    """Whether bf16 runs under autocast: for `full` (the trained weights stay fp32 masters) and `qlora`
    (4-bit base). `lora` in bf16 stores its frozen base in bf16 instead (`store_frozen_weights`)."""
    return precision == "bf16" and method != "lora"


def store_frozen_weights(model, dtype: torch.dtype) -> int:
    """Keep every frozen floating-point parameter in `dtype`; trainable ones (the adapters, hence the
    optimizer state) stay fp32. Returns the number of parameters cast.

    For LoRA in bf16: the forward and backward run on bf16 weights directly, where autocast would copy
    every fp32 weight to bf16 again at each step, and the resident base weights take half the memory.
    The adapters are created on the fp32 model before the cast, so they start from the same values as
    in an fp32 run.
    """
    cast = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += 1
    return cast


def encode_frame(tokenizer, df: pd.DataFrame, spec: PipelineSpec, tasks: list[TaskSpec] | None = None) -> list[EncodedExample]:
    """Encode every row (row i with `tasks[i]`, default the spec's task); refuse (never silently
    truncate) rows that do not fit or carry no loss."""
    encoded, refused = [], []
    tasks = tasks or [spec.task] * len(df)
    rows = zip(df["example_id"], df["prompt"], df["response"], df["system"], column_or_none(df, "history"), tasks)
    for example_id, prompt, response, system, history, task in rows:
        messages = build_messages(prompt, response, system if isinstance(system, str) else None, task, history)
        example = encode_example(tokenizer, messages, spec.model.max_length)
        if example.truncated or example.n_loss_tokens == 0:
            refused.append(str(example_id))
        encoded.append(example)
    if refused:
        raise ValueError(
            f"{len(refused)} training examples would be truncated at model.max_length={spec.model.max_length} or "
            f"carry no loss token; the quality gate should have quarantined them: {refused[:10]}"
        )
    return encoded


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches: similar lengths share a batch."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def split_by_token_budget(micro: list[int], lengths: list[int], budget: int, size) -> list[list[int]]:
    """Halve a micro-batch (sorted by length) until each piece's `size` (the token slots its collated
    batch holds: `TrainingMethod.batch_tokens`) fits the budget."""
    if len(micro) <= 1 or size(micro) <= budget:
        return [micro]
    ordered = sorted(micro, key=lambda i: lengths[i])
    half = len(ordered) // 2
    return split_by_token_budget(ordered[:half], lengths, budget, size) + split_by_token_budget(ordered[half:], lengths,
                                                                                                budget, size)


def collate(examples: list[EncodedExample], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def collate_packed(examples: list[EncodedExample], device: str) -> dict[str, torch.Tensor]:
    """One row, no padding: position ids restart at 0 for each example and no attention mask is given,
    so transformers builds a block-diagonal causal mask from the position ids (each token sees only its
    own example; it does so only when no KV cache is passed, hence `use_cache=False` in the loss). An
    example's first token is a prompt token (no loss), so the previous example's last
    position never predicts across the boundary."""
    if any(e.labels[0] != IGNORE_INDEX for e in examples):
        raise ValueError("packing needs every example to start with a prompt token that carries no loss")
    ids = torch.tensor([t for e in examples for t in e.input_ids])
    labels = torch.tensor([t for e in examples for t in e.labels])
    positions = torch.cat([torch.arange(len(e.input_ids)) for e in examples])
    return {"input_ids": ids[None].to(device), "labels": labels[None].to(device), "position_ids": positions[None].to(device)}


def common_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all the sequences share."""
    first, n = sequences[0], min(len(s) for s in sequences)
    for other in sequences[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n


def shared_row_length(sequences: list[list[int]]) -> int:
    """The tokens of one shared-prefix row (`collate_shared_prefix`): the common prefix once, then each
    sequence's remaining tokens."""
    shared = common_prefix_length(sequences)
    return shared + sum(len(s) - shared for s in sequences)


def _row_position(t: int, shared: int, start: int) -> int:
    """Where token t of an example sits in its shared-prefix row: in the shared part, or after it."""
    return t if t < shared else start + t


def collate_shared_prefix(rows_of: list[list[EncodedExample]], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """One row per list of examples: the tokens they all share (their longest common prefix: the chat
    template's system turn, an instruction, a prompt) once, then each example's remaining tokens;
    rows right-padded.

    A 4-D attention mask lets each example's own tokens see the shared tokens and, causally, each
    other, never another example's tokens, and position ids continue from the shared part, so every
    token is computed as in a row of its own: the same products up to float summation order (tested
    against one-row-per-example forwards, losses and gradients). Padding tokens see only themselves and
    the shared part (no empty softmax row).

    Beside `input_ids`, `attention_mask` [rows, 1, width, width] (bool: True = may attend) and
    `position_ids`, the batch indexes the examples (numbered row by row): `sequence_last` (row, position
    of each example's last token), and each loss token (`labels` != -100) as `token_index` (row,
    position of the token before it, whose logits predict it), `token_targets` and `token_sequence`."""
    rows, owners, positions = [], [], []
    last, token_index, token_targets, token_sequence = [], [], [], []
    for row, sequences in enumerate(rows_of):
        shared = common_prefix_length([e.input_ids for e in sequences])
        ids, owner, position = list(sequences[0].input_ids[:shared]), [-1] * shared, list(range(shared))
        for j, e in enumerate(sequences):
            start = len(ids) - shared  # token t >= shared of this example sits at start + t in the row
            ids += e.input_ids[shared:]
            owner += [j] * (len(e.input_ids) - shared)
            position += range(shared, len(e.input_ids))
            last.append((row, _row_position(len(e.input_ids) - 1, shared, start)))
            for t in range(1, len(e.labels)):
                if e.labels[t] != IGNORE_INDEX:
                    token_index.append((row, _row_position(t - 1, shared, start)))
                    token_targets.append(e.input_ids[t])
                    token_sequence.append(len(last) - 1)
        rows.append(ids), owners.append(owner), positions.append(position)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    owner = torch.full((len(rows), width), -2, dtype=torch.long)  # -1: shared, -2: padding
    position = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, o, p) in enumerate(zip(rows, owners, positions)):
        ids[i, : len(r)], owner[i, : len(o)], position[i, : len(p)] = torch.tensor(r), torch.tensor(o), torch.tensor(p)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    mask = causal & ((owner[:, None, :] == -1) | (owner[:, None, :] == owner[:, :, None]))
    long = lambda values: torch.tensor(values, dtype=torch.long, device=device)
    return {"input_ids": ids.to(device), "attention_mask": mask[:, None].to(device), "position_ids": position.to(device),
            "sequence_last": long(last), "token_index": long(token_index).view(-1, 2),
            "token_targets": long(token_targets), "token_sequence": long(token_sequence)}


SHARED_ROW_TOKENS = 512


def shared_prefix_rows(examples: list[EncodedExample], max_row: int = SHARED_ROW_TOKENS) -> list[list[EncodedExample]]:
    """A micro-batch's examples as the rows of `collate_shared_prefix`: as few rows as keep each under
    `max_row` tokens (or the longest example), the examples spread so the rows are about equally long
    (longest first, each to the shortest row). A longer row shares its prefix with more examples but
    costs attention quadratic in its length."""
    shared = common_prefix_length([e.input_ids for e in examples])
    own = [len(e.input_ids) - shared for e in examples]
    room = max(max_row, max(len(e.input_ids) for e in examples)) - shared
    n = min(len(examples), max(1, math.ceil(sum(own) / max(1, room))))
    rows, lengths = [[] for _ in range(n)], [0] * n
    for i in sorted(range(len(examples)), key=lambda i: -own[i]):
        j = lengths.index(min(lengths))
        rows[j].append(examples[i])
        lengths[j] += own[i]
    return [r for r in rows if r]


# the attention implementations that take the 4-D masks of `collate_shared_prefix`
SHARED_PREFIX_ATTENTION = ("sdpa", "eager")


def shares_prefixes(model) -> bool:
    """Whether `model`'s attention takes the 4-D masks of `collate_shared_prefix`."""
    return getattr(_causal_lm(model).config, "_attn_implementation", "sdpa") in SHARED_PREFIX_ATTENTION


def collate_micro_batch(examples: list[EncodedExample], pad_id: int, device: str, packing: bool,
                        share_prefix: bool) -> dict[str, torch.Tensor]:
    """An SFT micro-batch as training runs it: one packed row, shared-prefix rows, or padded rows."""
    if packing:
        return collate_packed(examples, device)
    if share_prefix:  # the tokens the examples share (system turn, instruction) computed once
        return collate_shared_prefix(shared_prefix_rows(examples), pad_id, device)
    return collate(examples, pad_id, device)


def decoder_hidden(decoder, batch: dict[str, torch.Tensor], **extra) -> torch.Tensor:
    """The decoder's last hidden states for a batch of plain rows (2-D mask) or of shared-prefix rows
    (`collate_shared_prefix`: a boolean 4-D mask, passed on as the attention implementation takes it)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        implementation = getattr(decoder.config, "_attn_implementation", "sdpa")
        if implementation == "eager":  # eager adds the mask to the scores
            dtype = decoder.get_input_embeddings().weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        elif implementation not in SHARED_PREFIX_ATTENTION:
            raise ValueError(f"shared-prefix batches need an attention that takes a 4-D mask, not "
                             f"'{implementation}'; load the model with attn_implementation='sdpa' or 'eager'")
    return decoder(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch.get("position_ids"),
                   use_cache=False, **extra).last_hidden_state


def _causal_lm(model):
    """The transformers model under any peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 vocabulary logits, target ids) at the loss positions only, row by row in order."""
    lm = _causal_lm(model)
    # a KV cache of tokens before these (evaluation's shared prompt prefix), under either transformers name
    past = {name: batch[name] for name in ("cache", "past_key_values") if name in batch}
    hidden = decoder_hidden(lm.model, batch, **past)
    if "token_index" in batch:  # shared-prefix rows (collate_shared_prefix)
        rows, positions = batch["token_index"].unbind(-1)
        return lm.lm_head(hidden[rows, positions]).float(), batch["token_targets"]
    targets = batch["labels"][:, 1:]
    positions = targets != IGNORE_INDEX
    return lm.lm_head(hidden[:, :-1][positions]).float(), targets[positions]


def summed_response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of token losses over loss positions, computing vocabulary logits only there."""
    logits, targets = response_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), len(targets)


@torch.no_grad()
def mean_loss_over(model, items: list, batch_size: int, length, collate_fn, loss_fn, device: str,
                   precision: str) -> float:
    """Summed loss / summed count of `loss_fn` over `items` in length order, in eval mode (dropout off);
    the model is left in the mode it came in."""
    if not items:
        return float("nan")
    training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: length(items[i]))
    for start in range(0, len(order), batch_size):
        batch = collate_fn([items[i] for i in order[start : start + batch_size]])
        with autocast(device, precision):
            loss, n = loss_fn(model, batch)
        total, count = total + float(loss), count + n
    model.train(training)
    return total / max(1, count)


def validation_loss(model, examples: list[EncodedExample], batch_size: int, pad_id: int, device: str, precision: str) -> float:
    return mean_loss_over(model, examples, batch_size, lambda e: len(e.input_ids),
                          lambda rows: collate(rows, pad_id, device), summed_response_loss, device, precision)


def load_model(spec: PipelineSpec, model_dir: Path, device: str, precision: str | None = None):
    """The base model prepared for the spec's method (lora, qlora or full) and precision.

    `precision` is the run's resolved precision (default: `pick_precision` of the spec's). LoRA in bf16
    keeps the frozen base in bf16 and the adapters in fp32. QLoRA quantises the frozen base to 4-bit
    NF4 with bitsandbytes (on CUDA and, with its CPU backend, on CPU); the LoRA adapters stay in full
    precision and compute in bf16 or fp32.
    """
    from transformers import AutoModelForCausalLM

    method = spec.training.method
    precision = precision or pick_precision(spec.training.precision, device)
    kwargs: dict = {"dtype": torch.float32}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method != "qlora":
        model.to(device)
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora" and not device.startswith("cuda"):
        import bitsandbytes as bnb

        odd = [(n, m.in_features) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and m.in_features % 64]
        if odd:  # bitsandbytes' CPU kernels work on blocks of 64 input features
            raise ValueError(f"training.method qlora on CPU needs layer widths that are multiples of 64; "
                             f"{odd[0][0]} has {odd[0][1]} inputs: use method lora")
    if method == "qlora":
        keep_4bit_layers_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.training.gradient_checkpointing)
    lora = spec.training.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.use_dora,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if method == "lora" and precision == "bf16":
        store_frozen_weights(model, torch.bfloat16)
        if not device.startswith("cuda"):
            release_freed_memory_to_os()  # the fp32 copies of the base weights
    use_fast_lora(model)  # same maths, cheaper dropout on CPU (see fast_lora.py)
    return model


def collates_shared_prefixes(spec: PipelineSpec) -> bool:
    """Whether SFT micro-batches are shared-prefix rows (`collate_shared_prefix`) for this spec: not when
    packing, nor under NEFTune (its noise is drawn per example; a prefix computed once would get one draw)."""
    return not spec.training.packing and spec.training.neftune_alpha == 0


def probe_batch(encoded: list[EncodedExample], spec: PipelineSpec, pad_id: int, device: str
                ) -> tuple[dict[str, torch.Tensor], int]:
    """A typical micro-batch, collated as the trainer will (shared prefixes, packed or padded rows):
    `batch_size` rows from the middle of the length distribution; and the tokens it trains on."""
    sample = sorted(encoded, key=lambda e: len(e.input_ids))[len(encoded) // 2 :][: spec.training.batch_size]
    batch = collate_micro_batch(sample, pad_id, device, spec.training.packing, collates_shared_prefixes(spec))
    return batch, sum(len(e.input_ids) for e in sample)


def time_training_step(spec: PipelineSpec, model_dir: Path, device: str, precision: str,
                       batch: dict[str, torch.Tensor], tokens: int, repeats: int = 2) -> dict:
    """Best time of one forward + backward of a freshly loaded model after a warm-up step, and its loss.

    The global RNG is left as it was (the run's seed decides the adapters' initial values, whether or
    not a probe ran before).
    """
    import gc

    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.training.seed)
        model = load_model(spec, model_dir, device, precision)
        model.train()
        amp = precision if uses_autocast(spec.training.method, precision) else "fp32"
        times, first_loss = [], None
        for _ in range(1 + repeats):
            torch.manual_seed(spec.training.seed)  # the same dropout masks in every repeat and precision
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with autocast(device, amp):
                loss, n = summed_response_loss(model, batch)
            (loss / n).backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            first_loss = float(loss.detach()) / n if first_loss is None else first_loss
    del model
    gc.collect()
    if not device.startswith("cuda"):
        release_freed_memory_to_os()
    return {"seconds": round(min(times[1:]), 4), "tokens": tokens, "loss": round(first_loss, 6)}


def resolve_precision(spec: PipelineSpec, model_dir: Path, device: str, encoded: list[EncodedExample], pad_id: int,
                      cache_dir: Path | str | None = None) -> PrecisionChoice:
    """The run's precision: the spec's, or for `auto` the measured choice (cached; see precision.py)."""
    requested = spec.training.precision
    if requested != "auto":
        return PrecisionChoice(requested, "set in the spec (training.precision)")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    widths = (config.hidden_size, getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
    key = machine_key(device) | {
        "method": spec.training.method, "lora_r": spec.training.lora.r, "model_type": config.model_type,
        "hidden_size": config.hidden_size, "intermediate_size": widths[1],
        "layers": getattr(config, "num_hidden_layers", None), "vocab_size": getattr(config, "vocab_size", None),
    }
    bf16_supported = torch.cuda.is_bf16_supported() if device.startswith("cuda") else True
    batch, tokens = probe_batch(encoded, spec, pad_id, device)

    def measure():
        return measure_precision(device, widths, bf16_supported,
                                 lambda precision: time_training_step(spec, model_dir, device, precision, batch, tokens))

    return cached_choice(probe_cache_dir(cache_dir), key, measure)


def keep_4bit_layers_trainable(model) -> int:
    """Keep every bitsandbytes `Linear4bit` of `model` in its trainable layout for the whole run.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer for its CPU inference kernel
    (`gemv_4bit`) the first time the layer runs in eval mode without gradients, i.e. during the first
    validation pass, and keeps that layout: later training forwards go through `gemv_4bit`, which has
    no backward, so the gradient through the frozen weights was silently dropped (issue #8, measured
    on a tiny Llama on an AVX512-BF16 CPU: LoRA gradients 67% off the dequantised-fp32 reference after
    one validation pass, exact before; 80% with the condition forced on an AVX2 CPU, where the default
    `gemv_4bit` kernel also misreads the repacked weights). Each layer copies the CPU check into `support_avx512bf16_for_cpu` when built; clearing it
    keeps validation on the same dequantise-and-multiply path as training. Returns the layers switched.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("a 4-bit layer is already in bitsandbytes' CPU inference layout; "
                               "call keep_4bit_layers_trainable before its first forward")
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def _resolve_precision_on_rank0(method, model_dir, device, train_set, pad_id, probe_cache, rank: int,
                                world: int) -> PrecisionChoice:
    """Rank 0 resolves (and if need be measures) the precision alone; the other ranks take its choice."""
    if world == 1:
        return method.resolve_precision(model_dir, device, train_set, pad_id, probe_cache)
    import torch.distributed as dist

    box = [method.resolve_precision(model_dir, device, train_set, pad_id, probe_cache) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_fingerprint(spec: PipelineSpec, method, train: list, model_dir: Path, precision: str) -> str:
    h = hashlib.sha256(json.dumps(spec.training.model_dump(mode="json"), sort_keys=True).encode())
    if identity := method.identity():  # SFT adds nothing: its fingerprints are the ones it always had
        h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    h.update(str(model_dir).encode())
    h.update(precision.encode())  # `auto` may resolve differently on another machine: not the same run
    for e in train:
        h.update(bytes(method.item_key(e), "ascii"))
    return h.hexdigest()[:16]


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def _save_checkpoint(ckpt_root: Path, step: int, model, optimizer, scheduler, state: dict) -> None:
    # Replaces a stale checkpoint of another run (other fingerprint) with the same step number.
    with atomic.atomic_dir(ckpt_root / f"step-{step}") as tmp:
        torch.save({"trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state))
    for old in sorted(ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path, fingerprint: str) -> Path | None:
    candidates = sorted(ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for path in candidates:
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("fingerprint") == fingerprint:
            return path
    return None


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: str) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per parameter on CPU and CUDA.

    torch's default on CPU is a Python loop of ~10 operations per parameter: for SmolLM2's 420 LoRA
    matrices (4.9M values) the clipped step took 120-510 ms against 18-59 ms fused, three runs each
    on the loaded 2-core development machine (BENCHMARKS.md); the updates differ by float rounding
    only (max 3e-8 after one step).
    """
    fused = torch.device(device).type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def optimizer_steps(n_examples: int, spec: PipelineSpec) -> int:
    t = spec.training
    per_epoch = math.ceil(math.ceil(n_examples / t.batch_size) / t.gradient_accumulation_steps)
    total = math.ceil(per_epoch * t.epochs)
    return min(total, t.max_steps) if t.max_steps else total


def train(spec: PipelineSpec, model_dir: Path, train_df: pd.DataFrame, val_df: pd.DataFrame, output_dir: Path,
          device: str = "auto", log: Callable[[str], None] = print, on_metrics: Callable[[dict], None] | None = None,
          stop_after_steps: int | None = None, probe_cache: Path | str | None = None,
          teacher_cache: Path | None = None, tasks: dict[str, TaskSpec] | None = None) -> TrainingResult:
    """SFT (`training.method` lora / qlora / full): train and save the adapter (or full model) under
    `output_dir`; resumes from its checkpoints. See `run_training`.

    `teacher_cache`: where distillation caches the teacher's top-k logits (default: next to `output_dir`).
    `tasks`: for a multi-task mix (a `task` column in the frames, sft_dagster/multitask.py), each task by name.
    """
    from .methods.sft import SFTMethod

    method = SFTMethod(spec, tasks=tasks, teacher_cache=teacher_cache or output_dir.parent / "teacher_cache")
    return run_training(method, spec, model_dir, train_df, val_df, output_dir, device=device, log=log,
                        on_metrics=on_metrics, stop_after_steps=stop_after_steps, probe_cache=probe_cache)


def run_training(method, spec: PipelineSpec, model_dir: Path, train_data, val_data, output_dir: Path,
                 device: str = "auto", log: Callable[[str], None] = print,
                 on_metrics: Callable[[dict], None] | None = None, stop_after_steps: int | None = None,
                 probe_cache: Path | str | None = None) -> TrainingResult:
    """The shared loop: train `method` (a `methods.base.TrainingMethod`) on `train_data`, keep the weights
    with the best validation loss, save `output_dir / method.output_name`; resumes from its checkpoints.

    `teacher_cache`: where distillation caches the teacher's top-k logits (default: next to `output_dir`).
    `tasks`: for a multi-task mix (a `task` column in the frames, sft_dagster/multitask.py), each task by name.

    `stop_after_steps` ends the run early without saving the final model (used to test resuming).
    `probe_cache`: where `precision: auto` caches its measurement (default: see `precision.probe_cache_dir`).
    """
    from transformers import AutoTokenizer, get_scheduler

    cfg = spec.training
    on_metrics = on_metrics or Progress(log)
    rank, world = distributed()
    device = pick_device(device)
    if device == "cuda" and world > 1:
        device = f"cuda:{rank % torch.cuda.device_count()}"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = pad_id_of(tokenizer)
    train_set = method.encode_train(tokenizer, train_data)
    val_set = method.encode(tokenizer, val_data)
    if not train_set:
        raise ValueError("the train split is empty")
    choice = _resolve_precision_on_rank0(method, model_dir, device, train_set, pad_id, probe_cache, rank, world)
    precision = choice.precision
    amp = precision if method.uses_autocast(precision) else "fp32"  # what autocast() is given
    log(f"precision {precision}: {choice.reason}{' (cached measurement)' if choice.cached else ''}")
    if not device.startswith("cuda"):
        release_freed_memory_to_os()
    model = method.load_model(model_dir, device, precision)
    model.train()
    method.prepare(model, train_set, val_set, pad_id, device, amp, log)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay, device)
    total_steps = optimizer_steps(len(train_set), spec)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    lengths = [method.length(e) for e in train_set]
    piece_size = lambda piece: method.batch_tokens([train_set[i] for i in piece])
    weights = [method.weight(e) for e in train_set]
    tokens = [method.tokens(e) for e in train_set]
    micro_per_epoch = length_grouped_batches(lengths, cfg.batch_size, cfg.seed)
    steps_per_epoch = math.ceil(len(micro_per_epoch) / cfg.gradient_accumulation_steps)
    eval_every = cfg.eval_every_steps or steps_per_epoch

    ckpt_root = output_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    fingerprint = _run_fingerprint(spec, method, train_set, model_dir, precision)
    state = {"fingerprint": fingerprint, "step": 0, "trained_tokens": 0, "best_val": None, "bad_evals": 0,
             "val_history": [], "train_loss": None, "seconds": 0.0, "validation_seconds": 0.0}
    resumed_from = None
    if (ckpt := latest_checkpoint(ckpt_root, fingerprint)) is not None:
        saved = torch.load(ckpt / "state.pt", weights_only=True)  # tensors and plain containers only
        with torch.no_grad():
            named = dict(model.named_parameters())
            for k, v in saved["trainable"].items():
                named[k].copy_(v.to(named[k].device))
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        state = json.loads((ckpt / "trainer_state.json").read_text())
        resumed_from = state["step"]
        log(f"resuming from checkpoint {ckpt.name}")
    best_path = output_dir / "best_trainable.pt"
    if resumed_from is None:
        best_path.unlink(missing_ok=True)

    start_time, early_stopped = time.perf_counter() - state["seconds"], False
    step = state["step"]
    heap = HeapReleaser() if not device.startswith("cuda") else None
    while step < total_steps and not early_stopped:
        epoch, offset = divmod(step, steps_per_epoch)
        batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch)
        groups = [batches[i : i + cfg.gradient_accumulation_steps] for i in range(0, len(batches), cfg.gradient_accumulation_steps)]
        for group in groups[offset:]:
            window_weight = sum(weights[i] for micro in group for i in micro)
            loss_sum = 0.0
            pieces = [piece for micro in group[rank::world]  # each rank takes its share of the window
                      for piece in split_by_token_budget(micro, lengths, cfg.max_tokens_per_micro_batch, piece_size)]
            for piece in pieces:
                batch = method.collate([train_set[i] for i in piece], pad_id, device)
                with autocast(device, amp):
                    loss, n = method.loss(model, batch)
                (loss / window_weight).backward()
                loss_sum += float(loss.detach())
                state["trained_tokens"] += sum(tokens[i] for i in piece)
            with autocast(device, amp):  # a term computed once per optimizer step (SFT's distillation)
                auxiliary = method.auxiliary_loss(model, step)
            if auxiliary is not None:
                (auxiliary / world).backward()
            _all_reduce_gradients(params, world)
            if world > 1:
                import torch.distributed as dist

                summed = torch.tensor([loss_sum], dtype=torch.float64)
                dist.all_reduce(summed)
                loss_sum = float(summed)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if heap is not None:
                heap.after_step()
            step += 1
            state["step"], state["train_loss"] = step, loss_sum / window_weight
            state["seconds"] = time.perf_counter() - start_time
            step_stats = method.pop_stats()
            val, val_stats = None, {}
            if step % eval_every == 0 or step == total_steps:
                eval_start = time.perf_counter()
                val_stats = method.validate(model, val_set, cfg.batch_size, pad_id, device, amp)
                val = val_stats["val_loss"]
                state["validation_seconds"] += time.perf_counter() - eval_start
                state["val_history"].append({"step": step, **val_stats})
                if state["best_val"] is None or val < state["best_val"]:
                    state["best_val"], state["bad_evals"] = val, 0
                    state["best_val_stats"] = val_stats
                    if rank == 0:
                        atomic.torch_save(best_path, _trainable_state(model))
                else:
                    state["bad_evals"] += 1
                    if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                        log(f"early stopping: validation loss has not improved for {state['bad_evals']} evaluations")
                        early_stopped = True
            if on_metrics:  # by default a progress line every few steps (training/progress.py)
                on_metrics({**step_stats, **val_stats, "step": step, "total_steps": total_steps,
                            "train_loss": state["train_loss"], "lr": scheduler.get_last_lr()[0], "val_loss": val,
                            "trained_tokens": state["trained_tokens"], "seconds": time.perf_counter() - start_time,
                            "validation_seconds": state["validation_seconds"]})
            if rank == 0 and (step % cfg.checkpoint_every_steps == 0 or early_stopped or step == total_steps):
                _save_checkpoint(ckpt_root, step, model, optimizer, scheduler, state)
            if stop_after_steps is not None and step >= stop_after_steps:
                return TrainingResult(adapter_dir=output_dir, method=method.name, metrics=dict(state))
            if early_stopped or step >= total_steps:
                break

    if world > 1:  # every rank waits for rank 0's files before reading them
        import torch.distributed as dist

        dist.barrier()
        trained = torch.tensor([state["trained_tokens"]], dtype=torch.int64)
        dist.all_reduce(trained)
        state["trained_tokens"] = int(trained)
    if best_path.exists():  # keep the weights with the best validation loss
        with torch.no_grad():
            named = dict(model.named_parameters())
            for k, v in torch.load(best_path, weights_only=True).items():
                named[k].copy_(v.to(named[k].device))
    method.finish(model)
    if heap is not None:  # the last steps' activations, before saving and evaluation
        release_freed_memory_to_os()
    seconds = time.perf_counter() - start_time
    out = output_dir / method.output_name
    if rank == 0:
        with atomic.atomic_dir(out) as tmp:  # readers see the previous complete adapter or the new one
            method.save(model, tokenizer, tmp, model_dir)
    metrics = {
        "method": method.name, "device": device, "precision": precision, "precision_choice": choice.to_metadata(),
        "steps": step, "optimizer_steps_planned": total_steps,
        "epochs_completed": round(step / steps_per_epoch, 3), "train_loss": state["train_loss"],
        "val_loss": state["best_val"], "val_loss_history": state["val_history"], "trained_tokens": state["trained_tokens"],
        # Throughput of the training steps; validation passes are timed separately.
        "tokens_per_second": round(state["trained_tokens"] / max(seconds - state["validation_seconds"], 1e-9), 1),
        "seconds": round(seconds, 2), "validation_seconds": round(state["validation_seconds"], 2),
        "early_stopped": early_stopped, "resumed_from_step": resumed_from,
        "trainable_parameters": sum(p.numel() for p in params), "processes": world,
        **{k: v for k, v in state.get("best_val_stats", {}).items() if k != "val_loss"},
        **method.extra_metrics(),
    }
    if rank == 0:
        atomic.write_json(output_dir / "metrics.json", metrics)
    return TrainingResult(adapter_dir=out, method=method.name, metrics=metrics)


def preflight(spec: PipelineSpec, model_dir: Path, train_df: pd.DataFrame, device: str = "auto",
              probe_cache: Path | str | None = None, tasks: dict[str, TaskSpec] | None = None) -> dict:
    """Token counts, optimizer steps, the precision (and why) and an estimated duration (one timed
    training step), before training. `precision: auto` is measured here, or read from the probe cache."""
    from transformers import AutoTokenizer

    device = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode_frame(tokenizer, train_df, spec, augment.row_tasks(train_df, spec, tasks))
    pad_id = pad_id_of(tokenizer)
    choice = resolve_precision(spec, model_dir, device, encoded, pad_id, probe_cache)
    n_tokens = sum(len(e.input_ids) for e in encoded)
    steps = optimizer_steps(len(encoded), spec)
    plan = {"n_examples": len(encoded), "n_tokens": n_tokens, "n_loss_tokens": sum(e.n_loss_tokens for e in encoded),
            "optimizer_steps": steps, "method": spec.training.method, "device": device, "precision": choice.precision,
            "precision_reason": choice.reason, "precision_choice": choice.to_metadata()}
    batch, tokens = probe_batch(encoded, spec, pad_id, device)
    step = time_training_step(spec, model_dir, device, choice.precision, batch, tokens, repeats=1)
    tokens_per_second = step["tokens"] / step["seconds"]
    epochs = steps * spec.training.gradient_accumulation_steps * spec.training.batch_size / max(1, len(encoded))
    plan["estimated_seconds"] = round(n_tokens * epochs / tokens_per_second, 1)
    plan["measured_tokens_per_second"] = round(tokens_per_second, 1)
    return plan


def merge_adapter(model_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Fold a LoRA adapter into the base weights: one safetensors model for serving, no peft needed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).merge_and_unload()
    with atomic.atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    return out_dir
