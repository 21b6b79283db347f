"""Pairwise judging: which of two answers to the same request a judge language model prefers (the
pairwise comparison of MT-Bench and AlpacaEval), for the candidate's win rate against the base model and
the champion on the test prompts (`evaluation.judge` in the spec; generation tasks only).

The judge is scored, never sampled: it reads a fixed judging prompt (`JUDGE_PROMPT`: the user's request,
Response A, Response B, "answer A or B") through its chat template, and its next-token log-probabilities
of "A" and "B" (each letter's token with and without a leading space, summed) give the margin
log P(A) - log P(B). Every pair is judged in both orders, the candidate as A and then as B, to cancel
position bias; as in MT-Bench's pairwise judge with swapped positions, a row is a win (1) when the judge
prefers the candidate in both orders, a loss (0) when it prefers the other answer in both, and a tie (0.5)
when the orders disagree (`pairwise_wins`). Identical answers are a tie without asking: the two orders are
then the same prompt, so their margins are equal and the orders disagree.

Position bias is why both orders are needed, and it is large in a small judge: on benchmarks/judge_cost.py
(40 multi30k captions, the reference translation against the caption untranslated or against another
row's translation) the embedded SmolLM2-135M-Instruct answered "A" in both orders on 37 and 39 of the 40
pairs: one order alone would have scored them all as wins (or all as losses). Both orders make them ties:
0 wins, 38 ties and 2 losses, and 40 ties. Nor does it lean: its probability of the reference averaged over
both orders was 0.49 and 0.50. A judge that small cannot tell a translation from the untranslated caption;
name a larger instruct model in `evaluation.judge.model`, and read the ties column.

Cost: one forward pass per pair and order, no generation. Same benchmark, 2 CPU cores shared with other
work, two runs: judging the candidate against base and champion took 5.1-7.0 s per row against 4.1-7.2 s
per row of one model's greedy generation (max_new_tokens 48), 24-31% of an evaluation that generates
for four models (base, 5-shot base, champion, candidate); `evaluation.judge.max_examples`
bounds it, and a nightly run pays only for pairs it has not judged: margins are cached per (judge weights
and tokenizer hashes, judging prompt, request, answer A, answer B) in one JSON file per judge
(`MarginStore`). fp32, batched in length order, left-padded, after the prompts' shared prefix (the chat
template's start and the instructions: 82 of 174 tokens of those pairs), the last position's logits only.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

from . import atomic, models
from .formatting import generation_prompt_ids, pad_id
from .spec import JudgeSpec, ModelSpec, TaskSpec

JUDGE_PROMPT = (
    "You are comparing two responses to the same request. Which response better answers the user's request? "
    "Judge how helpful, correct and faithful to the request each response is; the order of the responses and "
    "their length do not matter.\n\n"
    "[User's request]\n{request}\n\n"
    "[Response A]\n{a}\n\n"
    "[Response B]\n{b}\n\n"
    "Answer with one letter: A if Response A is better, B if Response B is better."
)
# A judge without a chat template reads the prompt as plain text followed by this.
PLAIN_SUFFIX = "\n\nBetter response:"
# Each part is cut to this many judge tokens (a cut part ends with " [...]"), so that one pair fits a small
# judge's context (SmolLM2-135M: 2,048 positions) with room for the prompt's own words.
MAX_REQUEST_TOKENS = 768
MAX_ANSWER_TOKENS = 384
LETTERS = ("A", "B")

METHOD = ("pairwise judge: the judge model's next-token log-probabilities of A vs B on a fixed judging prompt, "
          "each pair in both orders (candidate as A, then as B); a win when the candidate is preferred in both "
          "orders, a loss when the other answer is, a tie (0.5) when the orders disagree or the answers are identical")


def resolve(judge: JudgeSpec, cache_root: Path, base_dir: Path | None = None) -> models.ResolvedModel:
    """The judge model as a local directory with its hashes, resolved like `model.base` (offline)."""
    try:
        return models.resolve_base_model(ModelSpec(base=judge.model), cache_root, base_dir)
    except models.ModelResolutionError as exc:
        raise models.ModelResolutionError(f"evaluation.judge.model {judge.model!r}: {exc}") from None


def pairwise_wins(candidate_first: Sequence[float], candidate_second: Sequence[float]) -> list[float]:
    """Per row, the candidate's win value from the judge's margins log P(A) - log P(B) with the candidate as
    A (`candidate_first`: positive prefers the candidate) and as B (`candidate_second`: negative prefers it):
    1 when both orders prefer the candidate, 0 when both prefer the other answer, else 0.5 (the orders
    disagree, or an order has no preference)."""
    out = []
    for first, second in zip(candidate_first, candidate_second, strict=True):
        votes = (math.copysign(1, first) if first else 0, -math.copysign(1, second) if second else 0)
        out.append(1.0 if votes == (1, 1) else 0.0 if votes == (-1, -1) else 0.5)
    return out


def _digest(value, n: int) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:n]


class MarginStore:
    """The judge's margins by (request, answer A, answer B), in one JSON file per judge identity (weights and
    tokenizer hashes, judging prompt, truncation); no file without a directory."""

    def __init__(self, directory: Path | None, identity: dict):
        self.path = directory / f"{_digest(identity, 16)}.json" if directory is not None else None
        self.margins: dict[str, float] = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}
        self._unsaved = False

    @staticmethod
    def key(request: str, a: str, b: str) -> str:
        return _digest([request, a, b], 24)

    def put(self, key: str, margin: float) -> None:
        self.margins[key], self._unsaved = margin, True

    def save(self) -> None:
        if self.path is not None and self._unsaved:
            atomic.write_json(self.path, self.margins)
            self._unsaved = False


class Judge:
    """A judge model (`model_dir`, loaded on the first pair not in the cache) and its margin cache.

    `identity`: what the judge's margins depend on besides the pair (its weights' and tokenizer's hashes);
    `cache_dir`: where the margins are kept (None: not kept). `computed`: pairs (one order each) run
    through the model since it was opened."""

    def __init__(self, model_dir: Path, identity: dict, device: str = "cpu", batch_size: int = 8,
                 cache_dir: Path | None = None):
        from transformers import AutoTokenizer

        self.model_dir, self.device, self.batch_size = Path(model_dir), device, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.store = MarginStore(cache_dir, {**identity, "prompt": JUDGE_PROMPT, "plain_suffix": PLAIN_SUFFIX,
                                             "max_tokens": [MAX_REQUEST_TOKENS, MAX_ANSWER_TOKENS]})
        self.computed, self._model = 0, None

    def _cut(self, text: str, limit: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= limit else self.tokenizer.decode(ids[:limit]) + " [...]"

    def prompt_ids(self, request: str, a: str, b: str) -> list[int]:
        """The judging prompt of one ordered pair, as the judge's token ids up to its answer."""
        text = JUDGE_PROMPT.format(request=self._cut(request, MAX_REQUEST_TOKENS), a=self._cut(a, MAX_ANSWER_TOKENS),
                                   b=self._cut(b, MAX_ANSWER_TOKENS))
        if getattr(self.tokenizer, "chat_template", None):
            return generation_prompt_ids(self.tokenizer, text, None, TaskSpec(type="instruction"))
        return self.tokenizer(text + PLAIN_SUFFIX)["input_ids"]

    def _letter_ids(self) -> list[list[int]]:
        """Per letter, the single tokens that are the letter with or without a leading space."""
        out = []
        for letter in LETTERS:
            ids = {ids[0] for v in (letter, f" {letter}")
                   if len(ids := self.tokenizer(v, add_special_tokens=False)["input_ids"]) == 1}
            if not ids:
                raise ValueError(f"{self.model_dir}: the judge's tokenizer has no single token for {letter!r}")
            out.append(sorted(ids))
        return out

    def margins(self, requests: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[float]:
        """log P("A") - log P("B") of the judge for each (request, answer A = first, answer B = second); pairs in
        the cache are read from it, the others computed in batches and added to it."""
        keys = [MarginStore.key(r, a, b) for r, a, b in zip(requests, first, second, strict=True)]
        pending: dict[str, int] = {}  # one row per distinct pair not in the cache
        for i, k in enumerate(keys):
            if k not in self.store.margins:
                pending.setdefault(k, i)
        todo = list(pending.values())
        if todo:
            found = self._forward([self.prompt_ids(requests[i], first[i], second[i]) for i in todo])
            for i, margin in zip(todo, found):
                self.store.put(keys[i], margin)
            self.store.save()
            self.computed += len(todo)
        return [self.store.margins[k] for k in keys]

    def wins(self, requests: Sequence[str], candidate: Sequence[str], other: Sequence[str]) -> list[float]:
        """Per row, the candidate's win value against the other answer (`pairwise_wins`), judged in both orders;
        identical answers (after stripping whitespace) are a tie without running the judge."""
        rows = [i for i, (c, o) in enumerate(zip(candidate, other, strict=True)) if c.strip() != o.strip()]
        mine, theirs = [candidate[i].strip() for i in rows], [other[i].strip() for i in rows]
        both = self.margins([requests[i] for i in rows] * 2, mine + theirs, theirs + mine)  # one pass, both orders
        out = [0.5] * len(candidate)
        for i, value in zip(rows, pairwise_wins(both[:len(rows)], both[len(rows):])):
            out[i] = value
        return out

    def model(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).to(self.device).eval()
        return self._model

    def _forward(self, prompts: list[list[int]]) -> list[float]:
        """The margins of token-id prompts: after their shared prefix (`decoding.SharedPrefix`, computed
        once; a batch of 8 of the benchmark's pairs ran in 5.7-7.1 s after it against 10.5-11.5 s whole), the
        rest longest first in left-padded batches, the last position's logits only."""
        import torch

        from .decoding import SharedPrefix, cache_argument

        model, (a_ids, b_ids), pad = self.model(), self._letter_ids(), pad_id(self.tokenizer)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out = [0.0] * len(prompts)
        with torch.no_grad():
            prefix = SharedPrefix(model, prompts, self.device, "fp32")
            n = len(prefix)
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                tails = [prompts[i][n:] for i in rows]
                width = max(len(t) for t in tails)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), n + width), dtype=torch.long)
                mask[:, :n] = 1
                for j, tail in enumerate(tails):
                    ids[j, width - len(tail):] = torch.tensor(tail)
                    mask[j, n + width - len(tail):] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                cache = {cache_argument(model): prefix.cache_for(len(rows))} if n else {}
                logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, n:],
                               use_cache=bool(n), logits_to_keep=1, **cache).logits[:, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                margin = torch.logsumexp(logp[:, a_ids], dim=-1) - torch.logsumexp(logp[:, b_ids], dim=-1)
                for j, i in enumerate(rows):
                    out[i] = float(margin[j])
        return out


def markdown_lines(win_rate: dict | None) -> list[str]:
    """The report's (and model card's) win-rate section: per reference model, the candidate's win rate with
    its interval and the wins, ties and losses; none without a judge."""
    if not win_rate or not win_rate.get("versus"):
        return []
    level = f"{win_rate.get('confidence', 0.95):.0%}"
    lines = ["", f"## Win rate (judge `{win_rate['judge']}`)", "",
             f"{win_rate['n']} test rows; {win_rate['method']}. {level} intervals: {win_rate['interval_method']}.", "",
             f"| candidate vs | win rate [{level} interval] | wins | ties | losses |", "|---|---|---|---|---|"]
    for name, found in win_rate["versus"].items():
        low, high = found.get("interval") or (None, None)
        value = "" if found["value"] is None else f"{found['value']:.4f}"
        interval = f" [{low:.4f}, {high:.4f}]" if low is not None else ""
        lines.append(f"| {found.get('label', name)} | {value}{interval} | {found['wins']} | {found['ties']} | "
                     f"{found['losses']} |")
    if "seconds" in win_rate:
        lines += ["", f"Judged in {win_rate['seconds']:.1f} s ({win_rate.get('computed', 0)} ordered pairs run through "
                      "the judge, the others read from its cache or identical answers)."]
    return lines
