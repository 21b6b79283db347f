"""Examples -> chat messages -> token ids with a loss mask, through the base model's chat template.

Only the assistant's replies carry loss: their content and end-of-turn token (so the tuned model
learns to stop), not the newline the template adds after them. A multi-turn chat keeps its earlier
turns in `history` (JSON); every assistant turn in it carries loss too, as in TRL's assistant-only
loss. Nothing is truncated silently: `encode_example` reports `truncated`, the quality gate flags
such rows and the trainer refuses them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from .schema import column_or_none
from .spec import PipelineSpec, TaskSpec

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The tokenizer's chat template does not render a prompt as a prefix of the full conversation."""


def history_turns(history) -> list[dict]:
    """The earlier turns of a multi-turn chat (JSON text or a list of {role, content}); [] for a null."""
    if isinstance(history, str):
        history = json.loads(history)
    if not isinstance(history, list):
        return []
    return [{"role": t["role"], "content": t["content"]} for t in history]


def build_messages(prompt: str, response: str | None, system: str | None, task: TaskSpec, history=None) -> list[dict]:
    """system?, earlier turns, the user turn (the task's prompt template applied), the reply if given."""
    messages = []
    system_text = system if isinstance(system, str) and system else task.system
    if system_text:
        messages.append({"role": "system", "content": system_text})
    messages += history_turns(history)
    messages.append({"role": "user", "content": task.prompt_template.format(prompt=prompt)})
    if response is not None:
        messages.append({"role": "assistant", "content": str(response)})
    return messages


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_example(tokenizer, messages: list[dict], max_length: int) -> EncodedExample:
    """Token ids of the whole conversation and labels that are IGNORE_INDEX outside the assistant turns."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's reply")
    full_ids = _ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full_ids)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    for turn in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
        before = _ids(tokenizer, messages[:turn], add_generation_prompt=True)
        through = full_ids if turn == len(messages) - 1 else _ids(tokenizer, messages[: turn + 1], add_generation_prompt=False)
        if through[: len(before)] != before or full_ids[: len(through)] != through:
            raise TemplateError("the chat template does not render each turn as a prefix of the conversation")
        reply = through[len(before) :]
        # The reply ends at the end-of-turn token; anything the template adds after it carries no loss.
        end = reply.index(eos) + 1 if eos is not None and eos in reply else len(reply)
        labels[len(before) : len(before) + end] = reply[:end]
    truncated = len(full_ids) > max_length
    return EncodedExample(input_ids=full_ids[:max_length], labels=labels[:max_length], truncated=truncated)


def generation_prompt_ids(tokenizer, prompt: str, system: str | None, task: TaskSpec, history=None) -> list[int]:
    return _ids(tokenizer, build_messages(prompt, None, system, task, history), add_generation_prompt=True)


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


_SLOTS = {"system": " \x00SYSTEM\x00 ", "prompt": " \x00PROMPT\x00 ", "response": " \x00RESPONSE\x00 "}


class ConversationRenderer:
    """Renders conversations as text, fast: the chat template runs once with placeholders.

    The placeholder render is used only when the template provably copies content verbatim (the
    placeholders, with their surrounding spaces, each appear exactly once); otherwise every row goes
    through the chat template itself. Either way the text equals `apply_chat_template(tokenize=False)`.
    """

    def __init__(self, tokenizer, task: TaskSpec):
        self.tokenizer, self.task = tokenizer, task
        self._shapes: dict[tuple[bool, bool], str | None] = {}

    def _template(self, with_system: bool, with_response: bool) -> str | None:
        key = (with_system, with_response)
        if key not in self._shapes:
            user_slot = self.task.prompt_template.replace("{prompt}", "\x01")
            messages = build_messages("\x01", _SLOTS["response"] if with_response else None,
                                      _SLOTS["system"] if with_system else None, self.task)
            for m in messages:  # the user turn keeps the template's own text around the prompt slot
                m["content"] = m["content"].replace("\x01", _SLOTS["prompt"]) if m["role"] == "user" else m["content"]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not with_response)
            used = [_SLOTS["prompt"]] + ([_SLOTS["system"]] if with_system else []) + ([_SLOTS["response"]] if with_response else [])
            verbatim = all(text.count(slot) == 1 for slot in used) and user_slot.count("\x01") == 1
            self._shapes[key] = text if verbatim else None
        return self._shapes[key]

    def render(self, prompt: str, response: str | None, system: str | None, history=None) -> str:
        system_text = system if isinstance(system, str) and system else self.task.system
        turns = history_turns(history)
        shape = None if turns else self._template(bool(system_text), response is not None)
        if shape is None:
            return self.tokenizer.apply_chat_template(
                build_messages(prompt, response, system, self.task, turns), tokenize=False,
                add_generation_prompt=response is None)
        text = shape.replace(_SLOTS["prompt"], str(prompt))
        if system_text:
            text = text.replace(_SLOTS["system"], system_text)
        if response is not None:
            text = text.replace(_SLOTS["response"], str(response))
        return text


def token_lengths(tokenizer, df: pd.DataFrame, task: TaskSpec) -> pd.DataFrame:
    """Tokens per whole conversation and per reply, in the base model's tokenizer (batched).

    `n_tokens` is exact (what training sees); `n_response_tokens` tokenizes the reply text on its own.
    """
    renderer = ConversationRenderer(tokenizer, task)
    systems = [s if isinstance(s, str) else None for s in df["system"]]
    histories = column_or_none(df, "history")
    full = [renderer.render(p, r, s, h) for p, r, s, h in zip(df["prompt"], df["response"], systems, histories)]
    prompts = [renderer.render(p, None, s, h) for p, s, h in zip(df["prompt"], systems, histories)]
    replies = [f[len(p):] if f.startswith(p) else f for f, p in zip(full, prompts)]
    n_tokens = [len(ids) for ids in tokenizer(full, add_special_tokens=False)["input_ids"]] if len(full) else []
    eos = tokenizer.eos_token or ""
    reply_ids = tokenizer([r.split(eos, 1)[0] + eos if eos in r else r for r in replies], add_special_tokens=False)["input_ids"] if len(replies) else []
    return pd.DataFrame({"example_id": df["example_id"].to_numpy(), "n_tokens": n_tokens,
                         "n_response_tokens": [len(ids) for ids in reply_ids]})
