"""Examples -> chat messages -> token ids with a loss mask, through the base model's chat template.

Only the assistant's reply carries loss: its content and its end-of-turn token (so the tuned model
learns to stop), not the newline the template adds after it. Nothing is truncated silently:
`encode_example` reports `truncated`, the quality gate flags such rows and the trainer refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .spec import TaskSpec

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The tokenizer's chat template does not render a prompt as a prefix of the full conversation."""


def build_messages(prompt: str, response: str | None, system: str | None, task: TaskSpec) -> list[dict]:
    messages = []
    system_text = system if isinstance(system, str) and system else task.system
    if system_text:
        messages.append({"role": "system", "content": system_text})
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


def encode_example(tokenizer, messages: list[dict], max_length: int) -> EncodedExample:
    """Token ids of the whole conversation and labels that are IGNORE_INDEX outside the reply."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's reply")
    prompt_ids = _ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full_ids = _ids(tokenizer, messages, add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise TemplateError("the chat template does not render the prompt as a prefix of the conversation")
    reply = full_ids[len(prompt_ids) :]
    # The reply ends at the end-of-turn token; anything the template adds after it carries no loss.
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    end = reply.index(eos) + 1 if eos is not None and eos in reply else len(reply)
    labels = [IGNORE_INDEX] * len(prompt_ids) + reply[:end] + [IGNORE_INDEX] * (len(reply) - end)
    truncated = len(full_ids) > max_length
    return EncodedExample(input_ids=full_ids[:max_length], labels=labels[:max_length], truncated=truncated)


def generation_prompt_ids(tokenizer, prompt: str, system: str | None, task: TaskSpec) -> list[int]:
    return _ids(tokenizer, build_messages(prompt, None, system, task), add_generation_prompt=True)


def token_lengths(tokenizer, df: pd.DataFrame, task: TaskSpec) -> pd.DataFrame:
    """Tokens per example (whole conversation) and per reply, in the base model's tokenizer."""
    rows = []
    for example_id, prompt, response, system in zip(df["example_id"], df["prompt"], df["response"], df["system"]):
        messages = build_messages(prompt, response, system if isinstance(system, str) else None, task)
        encoded = encode_example(tokenizer, messages, max_length=10**9)
        rows.append((example_id, len(encoded.input_ids), encoded.n_loss_tokens))
    return pd.DataFrame(rows, columns=["example_id", "n_tokens", "n_response_tokens"])
