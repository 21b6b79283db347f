"""Greedy decoding for evaluation: a shared prefix run once, rows that leave the batch as soon as they
end, and the rows waiting in line taking their places.

`model.generate` runs every row of a batch until the last one ends (or `max_new_tokens`). On a
translation spec (160 test rows, `max_new_tokens` 64, batches of 16) the outputs were 27-35 tokens on
average but 14-17% of them looped to the 64-token cap, so nearly every batch ran 64 steps for all 16
rows: half the decoded positions belonged to rows that had already ended. `greedy` drops a row from
the batch the step it ends (the last rows move into its place in the KV cache, `_Buffer`); once
`refill` places are free the next rows in length order are run through their prompts and join the
batch (their cache padded after the shared prefix so that every row's tokens end at the last
position), so most steps decode a full batch, and a fuller batch is what makes a step cheap per token
(every step reads all the weights once: `EvaluationSpec.batch_size`). A row's tokens are greedy
decoding of its prompt alone: it attends to its own tokens only (masked padding between the prefix and
them, position ids that count unmasked tokens), as in a batch of `model.generate`. Floating-point sums
can depend on a batch's shape, so a row whose two best next tokens are closer than that noise could
take the other one: on the translation and demo benchmarks no generation changed (BENCHMARKS.md,
"Evaluation cost: generation tasks").
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections import deque

import torch

from .formatting import IGNORE_INDEX
from .torchkit import autocast, response_logits


def cache_argument(model) -> str:
    """The keyword a model's forward (and `generate`) takes a KV cache under: `cache` in transformers
    5.2x, `past_key_values` before (still accepted there, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Buffer:
    """One layer's keys or values, [rows, heads, positions, dim], in a tensor with room for more rows and
    positions: `view()` is the filled part. Rows leave by moving the last rows into their places, rows
    join by writing into the room, and a decoding step writes its position in place; `DynamicLayer`
    concatenates at every step and copies the whole cache at every row that leaves. On a 5-shot batch
    of 48 rows (390-token prompts, SmolLM2-135M) those copies took 14.5 (leaving) and 4.0 (steps) of
    82 CPU seconds."""

    ROOM = 64  # positions added whenever the positions are full

    def __init__(self, tensor=None):
        self.assign(tensor)

    def assign(self, tensor) -> None:
        self.data = tensor
        self.rows, self.n = (tensor.shape[0], tensor.shape[-2]) if tensor is not None and tensor.dim() == 4 else (0, 0)

    def view(self):
        return self.data[: self.rows, :, : self.n] if self.data is not None and self.data.dim() == 4 else self.data

    def _reserve(self, rows: int, positions: int, like: torch.Tensor) -> None:
        """Room for `rows` rows and `positions` positions (new zeros where it has to grow)."""
        if self.data is not None and self.data.dim() == 4 and rows <= self.data.shape[0] and positions <= self.data.shape[2]:
            return
        old = self.data
        self.data = like.new_zeros((max(rows, old.shape[0] if old is not None and old.dim() == 4 else 0),
                                    like.shape[1], positions + self.ROOM, like.shape[-1]))
        if self.rows and self.n:
            self.data[: self.rows, :, : self.n] = old[: self.rows, :, : self.n]

    def append(self, new: torch.Tensor) -> None:
        self._reserve(new.shape[0], self.n + new.shape[-2], new)
        self.rows = new.shape[0]
        self.data[: self.rows, :, self.n : self.n + new.shape[-2]] = new
        self.n += new.shape[-2]

    def select(self, order: torch.Tensor) -> None:
        """Row i becomes row `order[i]`; only the rows that move are copied."""
        moved = (order != torch.arange(len(order), device=order.device)).nonzero().squeeze(1)
        if len(moved):
            self.data[moved, :, : self.n] = self.data[order[moved], :, : self.n]
        self.rows = len(order)

    def join(self, other: "_Buffer", prefix: int, width: int) -> None:
        """Append `other`'s rows at `width` positions: each side's own positions (after the prefix's) move
        right to end at the last position, with zeros (masked) between."""
        self._reserve(self.rows + other.rows, width, other.data)
        if extra := width - self.n:
            mine = self.data[: self.rows]
            mine[:, :, prefix + extra : width] = mine[:, :, prefix : self.n].clone()
            mine[:, :, prefix : prefix + extra] = 0
        theirs, extra = self.data[self.rows : self.rows + other.rows], width - other.n
        theirs[:, :, :prefix] = other.data[: other.rows, :, :prefix]
        theirs[:, :, prefix : prefix + extra] = 0
        theirs[:, :, prefix + extra : width] = other.data[: other.rows, :, prefix : other.n]
        self.rows, self.n = self.rows + other.rows, width

    def drop(self, prefix: int, columns: int) -> None:
        """Without the `columns` positions right after the prefix (padding no row attends to any more)."""
        rows = self.data[: self.rows]
        rows[:, :, prefix : self.n - columns] = rows[:, :, prefix + columns : self.n].clone()
        self.n -= columns


@functools.cache
def _growing_layer() -> type:
    """`DynamicLayer` on `_Buffer`s (built on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are `_Buffer`s. Reading `keys`/`values` gives the filled
        part; assigning one (as `DynamicLayer`'s own methods do) makes it the buffer."""

        keys = property(lambda self: self._buffer("_k").view(), lambda self, value: self._buffer("_k").assign(value))
        values = property(lambda self: self._buffer("_v").view(), lambda self, value: self._buffer("_v").assign(value))

        def _buffer(self, slot: str) -> _Buffer:
            if slot not in self.__dict__:
                self.__dict__[slot] = _Buffer()
            return self.__dict__[slot]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._buffer("_k").append(key_states)
            self._buffer("_v").append(value_states)
            return self.keys, self.values

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative count: the number of positions to remove")
            for slot in ("_k", "_v"):
                self._buffer(slot).n = max(0, self._buffer(slot).n + tokens_to_remove)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            for slot in ("_k", "_v"):
                self._buffer(slot).select(indices)

    return GrowingLayer


def empty_cache(config):
    """A `DynamicCache` for `config` whose full-attention layers write in place (`_growing_layer`)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [_growing_layer()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class SharedPrefix:
    """The tokens every sequence starts with (the chat template's system turn, the task's instruction,
    the few-shot turns), run through the model once; each batch continues from a copy of their KV cache.

    On the demo's test rows 48 of a zero-shot prompt's 75 tokens are shared, 348 of a 5-shot prompt's
    375 and 24 of a retention prompt's 44 (SmolLM2's tokenizer): without the prefix every batch ran
    them again. Each row keeps at least one token of its own (generation needs one to start from), and
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
            self.cache = empty_cache(self.config)
            with autocast(device, precision):
                model(input_ids=torch.tensor([self.ids], device=device), use_cache=True, logits_to_keep=1,
                      **{cache_argument(model): self.cache})

    def __len__(self) -> int:
        return len(self.ids)

    def cache_for(self, rows: int):
        """A KV cache for a batch of `rows` rows: its own copy of the prefix's (empty without a prefix)."""
        if self.cache is None:
            return empty_cache(self.config)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


def reply_loss(model, first_logits: torch.Tensor, cache, prompt_mask: torch.Tensor, replies: list[list[int]], pad: int,
               device: str, precision: str) -> list[tuple[float, int]]:
    """Each row's summed cross-entropy of its reply after its prompt and its reply token count, on
    generation's own work: the first reply token on the logits of generation's first step (the prompt's
    last position), the others on one forward of the replies after the prompts' KV cache, which is cut
    back to the prompts afterwards (generation goes on from there)."""
    targets = torch.tensor([r[0] for r in replies], device=device)
    sums = torch.nn.functional.cross_entropy(first_logits.float(), targets, reduction="none")
    width = max(len(r) for r in replies)
    if width > 1:
        labels = torch.tensor([[IGNORE_INDEX] + r[1:] + [IGNORE_INDEX] * (width - len(r)) for r in replies], device=device)
        batch = {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in replies], device=device),
                 "labels": labels,  # as in training: the token each position's predecessor predicts
                 "attention_mask": torch.cat([prompt_mask, torch.tensor([[1] * len(r) + [0] * (width - len(r))
                                                                         for r in replies], device=device)], dim=1),
                 "position_ids": prompt_mask.sum(dim=1, keepdim=True) + torch.arange(width, device=device),
                 cache_argument(model): cache}
        with autocast(device, precision):
            logits, rest = response_logits(model, batch)
        row_of = (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]  # loss positions come row by row
        sums = sums.index_add(0, row_of, torch.nn.functional.cross_entropy(logits, rest, reduction="none"))
        cache.crop(-width)
    return [(float(s), len(r)) for s, r in zip(sums.tolist(), replies)]


def _reshapable(cache) -> bool:
    """Whether every layer is a `GrowingLayer` (`_Buffer`s over all positions): rows can then join a
    batch. A sliding-window layer keeps a window only: there rows join an empty batch only, and leave it
    as anywhere."""
    return all(type(layer) is _growing_layer() for layer in cache.layers)


class _Batch:
    """The rows decoding: their KV cache, attention mask ([rows, cache positions]) and next tokens. Each
    row's own positions (after the prefix's) end at the last position, masked padding before them."""

    # Padding no row attends to any more (rows that joined late, after the longer ones left) is dropped once
    # there are this many positions of it: kept, the batch would grow a position per step for as long as
    # rows keep joining; dropped at every one, each step that a row leaves would copy every row's cache.
    DROP = 16

    def __init__(self, rows: list[int], cache, mask: torch.Tensor, tokens: torch.Tensor):
        self.rows, self.cache, self.mask, self.tokens = rows, cache, mask, tokens

    def join(self, other: "_Batch", prefix: int) -> None:
        """Append `other`'s rows (the shorter side padded after the prefix)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine._buffer("_k").join(theirs._buffer("_k"), prefix, width)
            mine._buffer("_v").join(theirs._buffer("_v"), prefix, width)
        masks = [m if m.shape[1] == width else torch.cat([m[:, :prefix], m.new_zeros(len(m), width - m.shape[1]),
                                                           m[:, prefix:]], dim=1) for m in (self.mask, other.mask)]
        self.rows, self.mask, self.tokens = self.rows + other.rows, torch.cat(masks), torch.cat([self.tokens, other.tokens])

    def keep(self, positions: list[int], prefix: int, reshape: bool) -> None:
        """Only the rows at `positions` (ascending): the last ones move into the places of the rows that
        leave. With `reshape`, padding no row attends to any more is dropped."""
        size, kept = len(positions), set(positions)
        order = list(range(size))
        for hole, filler in zip([p for p in range(size) if p not in kept], [p for p in positions if p >= size]):
            order[hole] = filler
        index = torch.tensor(order, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows, self.mask, self.tokens = [self.rows[i] for i in order], self.mask[index], self.tokens[index]
        unused = int(self.mask[:, prefix:].any(dim=0).int().argmax()) if reshape else 0
        if unused >= self.DROP:
            for layer in self.cache.layers:
                layer._buffer("_k").drop(prefix, unused)
                layer._buffer("_v").drop(prefix, unused)
            self.mask = torch.cat([self.mask[:, :prefix], self.mask[:, prefix + unused:]], dim=1)


PROMPT_ROWS = 16  # rows whose prompts (and replies) run through the model in one forward


@torch.no_grad()
def greedy(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device: str, precision: str,
           pad: int, eos: int | None, replies: list[list[int]] | None = None,
           refill: int | None = None) -> tuple[list[list[int]], list[tuple[float, int]] | None]:
    """Greedy continuations of `prompts` (token ids; returned in the prompts' order), each ending with
    the `eos` token or at `max_new_tokens` tokens; with `replies`, also each row's summed cross-entropy
    of its reply given its prompt and the reply's token count (`reply_loss`, on the prompt's KV cache
    before the row decodes).

    At most `batch_size` rows decode at once. Rows start in prompt-length order; whenever `refill`
    places are free (default: a quarter of the batch) the next rows join. Refilling each free place at
    once would pay a prompt forward per row; waiting for half the batch left the batch 3/4 full on
    average: base model, 160 translation rows, batch 16, 66.5 CPU s with a quarter, 74.1 s with half.
    Joining rows run through their prompts `PROMPT_ROWS` at a time: the reply loss's vocabulary logits
    (rows x reply tokens x vocabulary) stay what a batch of 16 needed, whatever the batch size.
    """
    prefix = SharedPrefix(model, prompts, device, precision)
    n_prefix, key = len(prefix), cache_argument(model)
    refill = max(1, min(batch_size, refill or batch_size // 4))
    reshape = _reshapable(empty_cache(model.config))
    waiting = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
    out: list[list[int]] = [[] for _ in prompts]
    losses: list[tuple[float, int]] | None = [(0.0, 0)] * len(prompts) if replies is not None else None

    def start(rows: list[int]) -> _Batch:
        """`rows` run through their prompts (after the prefix's cache), with their first tokens."""
        tails = [prompts[i][n_prefix:] for i in rows]
        width = max(len(t) for t in tails)
        ids = torch.tensor([[pad] * (width - len(t)) + t for t in tails], device=device)
        mask = torch.tensor([[1] * n_prefix + [0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)
        cache = prefix.cache_for(len(rows))
        with autocast(device, precision):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, n_prefix:],
                           use_cache=True, logits_to_keep=1, **{key: cache}).logits[:, -1].float()
        if replies is not None:
            for i, loss in zip(rows, reply_loss(model, logits, cache, mask, [replies[i] for i in rows], pad, device,
                                                precision)):
                losses[i] = loss
        return _Batch(rows, cache, mask, logits.argmax(dim=-1))

    batch: _Batch | None = None
    while waiting or batch is not None:
        free = batch_size - (len(batch.rows) if batch else 0)
        if waiting and (batch is None or (reshape and free >= refill)):
            rows = [waiting.popleft() for _ in range(min(free, len(waiting)))]
            for group in ([rows[i : i + PROMPT_ROWS] for i in range(0, len(rows), PROMPT_ROWS)] if reshape else [rows]):
                if batch is None:
                    batch = start(group)
                else:
                    batch.join(start(group), n_prefix)
        running = []
        for position, (row, token) in enumerate(zip(batch.rows, batch.tokens.tolist())):
            out[row].append(token)
            if token != eos and len(out[row]) < max_new_tokens:
                running.append(position)
        if not running:
            batch = None
            continue
        if len(running) < len(batch.rows):
            batch.keep(running, n_prefix, reshape)
        positions = batch.mask.sum(dim=1, keepdim=True)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(running), 1)], dim=1)
        with autocast(device, precision):
            logits = model(input_ids=batch.tokens[:, None], attention_mask=batch.mask, position_ids=positions,
                           use_cache=True, **{key: batch.cache}).logits[:, -1]
        batch.tokens = logits.float().argmax(dim=-1)
    return out, losses
