"""The base LLM's own k-shot label probabilities: one view of `quality.cleanlab.features: llm | ensemble`.

Each row's label distribution is the log-likelihood of every label's reply tokens (the label and the
end-of-turn token, exactly as training would render them) after a k-shot chat built with the task's
prompt template, renormalised over the task's labels. The k demonstrations come from the data
itself, in two disjoint sets A and B: rows of A are scored with B's prompt and every other row with
A's, so no row is ever scored with itself in its prompt (out-of-sample by construction, as cleanlab
requires).

Cost, on CPU: the shared k-shot prefix runs once; per row, one pass over the row's own turn, then one
pass over all labels' reply tokens (minus the last) on the row's cached keys and values. Work is
rows x (row tokens + sum of label reply tokens), so a task with many or long labels costs more:
`estimate_tokens` states it before anything runs, and the pre-flight times a sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formatting import TemplateError, _ids, build_messages
from ..spec import TaskSpec

# Key/value cache held at once, in tokens x sequences (the prefix is repeated per sequence).
CACHE_TOKEN_BUDGET = 24_000


@dataclass
class LlmScorer:
    """A k-shot label scorer over one model; `score` returns log-likelihoods of each label per row."""

    model: object
    tokenizer: object
    task: TaskSpec
    classes: list[str]
    batch_size: int = 16

    @classmethod
    def load(cls, model_dir: Path, task: TaskSpec, classes: list[str], batch_size: int = 16) -> "LlmScorer":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return cls(model, tokenizer, task, classes, batch_size)

    def _turns(self, demos: list[tuple[str, str]]) -> list[dict]:
        turns = []
        for prompt, label in demos:
            turns += build_messages(prompt, label, None, self.task)[-2:]  # the user turn and the reply
        return turns

    def label_reply_ids(self, demos: list[tuple[str, str]], probe: str) -> list[list[int]]:
        """Tokens of each label's reply (through the end-of-turn token) after the generation prompt."""
        history = self._turns(demos)
        before = _ids(self.tokenizer, build_messages(probe, None, None, self.task, history), add_generation_prompt=True)
        eos = self.tokenizer.convert_tokens_to_ids(self.tokenizer.eos_token) if self.tokenizer.eos_token else None
        out = []
        for label in self.classes:
            full = _ids(self.tokenizer, build_messages(probe, label, None, self.task, history), add_generation_prompt=False)
            if full[: len(before)] != before:
                raise TemplateError("the chat template does not render the generation prompt as a prefix of the reply")
            reply = full[len(before):]
            end = reply.index(eos) + 1 if eos is not None and eos in reply else len(reply)
            out.append(reply[:end])
        if len(set(map(tuple, out))) != len(out):
            raise ValueError("two labels render to the same reply tokens; the LLM view cannot tell them apart")
        return out

    def prefix_and_rows(self, demos: list[tuple[str, str]], prompts: list[str], systems: list[str | None]):
        """The shared prefix (system + demos) and each row's own tokens (its user turn + generation prompt).

        The row tokens are the exact continuation of the prefix in the full rendering: checked here on
        every row, so a template that rewrites earlier turns fails loudly instead of scoring garbage.
        """
        history = self._turns(demos)
        system = systems[0] if systems else None
        head = build_messages("x", None, system, self.task, history)[:-1]
        prefix = _ids(self.tokenizer, head, add_generation_prompt=False) if head else []
        rows = []
        for prompt, sys_text in zip(prompts, systems):
            if sys_text != system:
                raise ValueError("the LLM view needs one system prompt for all rows (task.system or none)")
            full = _ids(self.tokenizer, build_messages(prompt, None, system, self.task, history), add_generation_prompt=True)
            if full[: len(prefix)] != prefix:
                raise TemplateError("the chat template does not render the k-shot turns as a prefix of each row")
            rows.append(full[len(prefix):])
        return prefix, rows

    def score(self, prefix: list[int], rows: list[list[int]], replies: list[list[int]]) -> np.ndarray:
        """rows x labels summed log-probabilities of each label's reply tokens."""
        import torch
        from transformers import DynamicCache

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        k = len(replies)
        out = np.zeros((len(rows), k), dtype=np.float64)
        with torch.inference_mode():
            pre = self.model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values if prefix else None
            pre_kv = [(layer.keys, layer.values) for layer in pre.layers] if pre is not None else None
            p = len(prefix)
            longest_reply = max(len(r) for r in replies)
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                b, width = len(chunk), max(len(r) for r in chunk)
                ids = torch.full((b, width), pad, dtype=torch.long)
                mask = torch.zeros((b, width), dtype=torch.long)
                for i, r in enumerate(chunk):
                    ids[i, :len(r)] = torch.tensor(r)
                    mask[i, :len(r)] = 1
                lengths = mask.sum(1)
                cache = DynamicCache(ddp_cache_data=[(kk.expand(b, -1, -1, -1).contiguous(), vv.expand(b, -1, -1, -1).contiguous())
                                                     for kk, vv in pre_kv]) if pre_kv else None
                full_mask = torch.cat([torch.ones((b, p), dtype=torch.long), mask], 1)
                # The decoder alone, then the output layer on each row's last position only: the
                # vocabulary projection of every row token would cost more than the rest of the pass.
                res = self.model.get_decoder()(input_ids=ids, attention_mask=full_mask,
                                               position_ids=p + torch.arange(width).expand(b, -1),
                                               past_key_values=cache, use_cache=True)
                hidden = res.last_hidden_state[torch.arange(b), lengths - 1]
                last = torch.log_softmax(self.model.get_output_embeddings()(hidden).float(), -1)
                first = torch.tensor([r[0] for r in replies])
                out[start:start + b] += last[:, first].numpy()
                if longest_reply == 1:
                    continue
                row_kv = [(layer.keys, layer.values) for layer in res.past_key_values.layers]
                # The label replies (all but their last token) run on each row's cached turn; labels in
                # chunks so that the repeated cache stays within CACHE_TOKEN_BUDGET.
                per_chunk = max(1, CACHE_TOKEN_BUDGET // max(1, b * (p + width + longest_reply)))
                for lo in range(0, k, per_chunk):
                    labels = list(range(lo, min(k, lo + per_chunk)))
                    n = b * len(labels)
                    row_index = torch.arange(b).repeat_interleave(len(labels))
                    cache = DynamicCache(ddp_cache_data=[(kk.index_select(0, row_index), vv.index_select(0, row_index))
                                                         for kk, vv in row_kv])
                    lw = longest_reply - 1
                    lids = torch.full((n, lw), pad, dtype=torch.long)
                    lmask = torch.zeros((n, lw), dtype=torch.long)
                    for j, lab in enumerate(labels):
                        rep = replies[lab][:-1]
                        if rep:
                            lids[j::len(labels), :len(rep)] = torch.tensor(rep)
                            lmask[j::len(labels), :len(rep)] = 1
                    attn = torch.cat([torch.ones((n, p), dtype=torch.long), mask.index_select(0, row_index), lmask], 1)
                    pos = (p + lengths.index_select(0, row_index))[:, None] + torch.arange(lw)[None, :]
                    logits = self.model(input_ids=lids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                                        use_cache=True).logits.float()
                    logp = torch.log_softmax(logits, -1)
                    for j, lab in enumerate(labels):
                        rest = replies[lab][1:]
                        if not rest:
                            continue
                        tok = torch.tensor(rest)
                        gathered = logp[j::len(labels), torch.arange(len(rest)), :].gather(-1, tok.expand(b, -1)[..., None])
                        out[start:start + b, lab] += gathered.squeeze(-1).sum(1).numpy()
        return out


def pick_demos(given: np.ndarray, classes: list[str], shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sets of `shots` row indices, spread over the labels (most frequent labels first)."""
    rng = np.random.default_rng(seed)
    by_class = {c: list(rng.permutation(np.flatnonzero(given == c))) for c in classes}
    order = sorted(classes, key=lambda c: (-len(by_class[c]), c))
    sets: list[list[int]] = [[], []]
    for which in (0, 1):
        while len(sets[which]) < shots and any(by_class[c] for c in order):
            for c in order:
                if by_class[c] and len(sets[which]) < shots:
                    sets[which].append(int(by_class[c].pop()))
    a, b = (np.array(s, dtype=int) for s in sets)
    rng.shuffle(a)
    rng.shuffle(b)
    return a, b


def llm_label_probabilities(model_dir: Path, prompts: list[str], given: np.ndarray, task: TaskSpec, classes: list[str],
                            shots: int = 8, batch_size: int = 16, seed: int = 0,
                            scorer: LlmScorer | None = None) -> tuple[np.ndarray, dict]:
    """rows x classes probabilities (columns in `classes` order) and cost figures.

    `model_dir` is the base model's directory (`sft_dagster.models.resolve_base_model(...).path`).
    """
    start = time.perf_counter()
    scorer = scorer or LlmScorer.load(model_dir, task, classes, batch_size)
    load_seconds = time.perf_counter() - start
    given = np.asarray(given).astype(str)
    set_a, set_b = pick_demos(given, classes, shots, seed)
    systems = [task.system] * len(prompts)
    logp = np.zeros((len(prompts), len(classes)))
    in_a = np.zeros(len(prompts), dtype=bool)
    in_a[set_a] = True
    tokens = 0
    for demos_idx, rows in ((set_a, np.flatnonzero(~in_a)), (set_b, set_a)):
        if len(rows) == 0:
            continue
        demos = [(prompts[i], given[i]) for i in demos_idx]
        replies = scorer.label_reply_ids(demos, prompts[rows[0]])
        prefix, row_ids = scorer.prefix_and_rows(demos, [prompts[i] for i in rows], [systems[i] for i in rows])
        logp[rows] = scorer.score(prefix, row_ids, replies)
        tokens += len(prefix) + sum(len(r) for r in row_ids) + len(rows) * sum(max(0, len(r) - 1) for r in replies)
    z = logp - logp.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    seconds = time.perf_counter() - start
    return probs, {"shots": int(len(set_a)), "tokens_scored": int(tokens), "load_seconds": round(load_seconds, 2),
                   "seconds": round(seconds, 2), "tokens_per_second": round(tokens / max(seconds - load_seconds, 1e-9), 1)}
