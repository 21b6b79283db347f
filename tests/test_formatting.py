"""Exactly which tokens carry loss, and that nothing is truncated silently."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from transformers import AutoTokenizer

from sft_dagster.formatting import (
    IGNORE_INDEX,
    TemplateError,
    build_messages,
    encode_example,
    generation_prompt_ids,
    token_lengths,
)
from sft_dagster.spec import TaskSpec

TASK = TaskSpec(type="sentiment", labels=["negative", "positive"], prompt_template="Review: {prompt}", system="Be brief.")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_messages_use_template_and_system():
    messages = build_messages("great kettle", "positive", None, TASK)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Review: great kettle"},
        {"role": "assistant", "content": "positive"},
    ]
    assert build_messages("x", None, "row system", TASK)[0]["content"] == "row system"
    assert build_messages("x", None, None, TASK)[-1]["role"] == "user"


def test_loss_is_on_the_reply_and_its_end_of_turn_only(tokenizer):
    encoded = encode_example(tokenizer, build_messages("great kettle", "positive", None, TASK), max_length=512)
    loss_ids = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(loss_ids) == "positive<|im_end|>"
    assert loss_ids == [label for label in encoded.labels if label != IGNORE_INDEX]  # labels equal inputs there
    # The loss-bearing span is contiguous and sits right after the generation prompt.
    prompt_ids = generation_prompt_ids(tokenizer, "great kettle", None, TASK)
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in encoded.labels[: len(prompt_ids)])
    assert encoded.labels[len(prompt_ids) : len(prompt_ids) + len(loss_ids)] == loss_ids
    # The newline the template adds after <|im_end|> carries no loss.
    assert encoded.labels[-1] == IGNORE_INDEX and tokenizer.decode(encoded.input_ids[-1:]) == "\n"
    assert not encoded.truncated and encoded.n_loss_tokens == len(loss_ids)


def test_every_assistant_turn_of_a_chat_carries_loss(tokenizer):
    history = json.dumps([{"role": "user", "content": "Review: okay kettle"}, {"role": "assistant", "content": "negative"}])
    messages = build_messages("great kettle", "positive", None, TASK, history)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    encoded = encode_example(tokenizer, messages, max_length=512)
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    assert spans == ["negative<|im_end|>", "positive<|im_end|>"]
    # Generation continues the whole chat, and token lengths count the whole chat.
    prompt_ids = generation_prompt_ids(tokenizer, "great kettle", None, TASK, history)
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
    df = pd.DataFrame({"example_id": ["c"], "prompt": ["great kettle"], "response": ["positive"], "system": [None],
                       "history": [history]})
    assert token_lengths(tokenizer, df, TASK)["n_tokens"].tolist() == [len(encoded.input_ids)]


def test_truncation_is_reported_not_hidden(tokenizer):
    long = build_messages("word " * 200, "positive", None, TASK)
    encoded = encode_example(tokenizer, long, max_length=64)
    assert encoded.truncated and len(encoded.input_ids) == 64
    assert encoded.n_loss_tokens == 0  # the reply was cut off entirely: the trainer refuses such rows


def test_token_lengths_match_encoding(tokenizer):
    df = pd.DataFrame({"example_id": ["a", "b"], "prompt": ["short", "a much longer review text here"],
                       "response": ["positive", "negative"], "system": [None, None]})
    lengths = token_lengths(tokenizer, df, TASK).set_index("example_id")
    for row in df.itertuples():
        encoded = encode_example(tokenizer, build_messages(row.prompt, row.response, None, TASK), 10**6)
        assert lengths.loc[row.example_id, "n_tokens"] == len(encoded.input_ids)
        assert lengths.loc[row.example_id, "n_response_tokens"] == encoded.n_loss_tokens


def test_template_without_prefix_property_fails_loudly(tokenizer):
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}"
    with pytest.raises(TemplateError):
        encode_example(tok, build_messages("x", "positive", None, TASK), 512)


@pytest.mark.parametrize("template_trims", [False, True])
def test_fast_renderer_matches_the_chat_template(tokenizer, template_trims):
    from sft_dagster.formatting import ConversationRenderer

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    if template_trims:  # a template that edits content must fall back to rendering each row
        tok.chat_template = tok.chat_template.replace("message['content']", "message['content'] | trim")
    renderer = ConversationRenderer(tok, TASK)
    cases = [("  spaced  ", "positive", None), ("{braces} and \\n", "negative", "Custom system"), ("x", None, None)]
    for prompt, response, system in cases:
        expected = tok.apply_chat_template(build_messages(prompt, response, system, TASK), tokenize=False,
                                           add_generation_prompt=response is None)
        assert renderer.render(prompt, response, system) == expected
    assert (None in renderer._shapes.values()) is template_trims
