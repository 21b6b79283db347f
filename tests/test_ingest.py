import json
from pathlib import Path

import pandas as pd
import pytest

from sft_dagster.ingest import IngestError, ingest
from sft_dagster.spec import parse_spec


def make_spec(tmp_path: Path, sources: list[dict]):
    spec = parse_spec({"name": "t", "task": {"type": "qa"}, "sources": sources}, tmp_path / "spec.yaml")
    return spec


def test_jsonl_rows_kept_and_malformed_quarantined(tmp_path):
    lines = [
        json.dumps({"question": "2+2?", "answer": "4", "topic": "maths"}),
        '{"question": "broken"',
        json.dumps({"question": "capital of France?"}),
        "",
        json.dumps({"question": "nested", "answer": {"a": 1}}),
        json.dumps({"question": "2+2?", "answer": "4", "topic": "maths"}),
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    spec = make_spec(tmp_path, [{"path": "*.jsonl", "columns": {"prompt": "question", "response": "answer"}}])
    examples, quarantine, stats = ingest(spec)
    assert stats["rows_read"] == 5 == len(examples) + len(quarantine)
    assert list(examples["source_line"]) == [1, 6]
    assert set(quarantine["source_line"]) == {2, 3, 5}
    reasons = dict(zip(quarantine["source_line"], quarantine["reason"]))
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "answer is missing"
    assert "dict, not text" in reasons[5]
    # identical content: same content hash, distinct example ids
    assert examples["content_hash"].nunique() == 1
    assert examples["example_id"].nunique() == 2
    assert json.loads(examples["metadata"].iloc[0]) == {"topic": "maths"}


def test_csv_and_parquet_sources(tmp_path):
    (tmp_path / "a.csv").write_text('prompt,response\n"multi\nline",yes\nshort,no,extra\nok,fine\n')
    pd.DataFrame({"prompt": ["p1", None], "response": ["r1", "r2"]}).to_parquet(tmp_path / "b.parquet")
    spec = make_spec(tmp_path, [{"path": "a.csv"}, {"path": "b.parquet"}])
    examples, quarantine, stats = ingest(spec)
    assert stats["rows_read"] == len(examples) + len(quarantine) == 5
    assert list(examples["prompt"]) == ["multi\nline", "ok", "p1"]
    csv_rows = examples[examples["source_file"].str.endswith("a.csv")]
    assert list(csv_rows["source_line"]) == [2, 5]  # the multi-line record starts on line 2
    assert sorted(quarantine["reason"]) == ["expected 2 fields, found 3", "prompt is missing"]


def test_missing_column_is_a_file_error_naming_file_line_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x", "label": "y"}) + "\n")
    spec = make_spec(tmp_path, [{"path": "a.jsonl"}])
    with pytest.raises(IngestError, match=r"a\.jsonl:1: prompt: column not found"):
        ingest(spec)


def test_undecodable_file_names_line(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    spec = make_spec(tmp_path, [{"path": "a.jsonl"}])
    with pytest.raises(IngestError, match=r"a\.jsonl:2: not UTF-8"):
        ingest(spec)


def test_no_matching_file(tmp_path):
    spec = make_spec(tmp_path, [{"path": "nothing/*.jsonl"}])
    with pytest.raises(IngestError, match="no file matches"):
        ingest(spec)


def test_messages_column(tmp_path):
    def turn(role, content):
        return {"role": role, "content": content}

    chats = [
        {"messages": [turn("system", "be brief"), turn("user", "hi"), turn("assistant", "hello")]},
        {"messages": [turn("user", "a"), turn("assistant", "b"), turn("user", "c")]},
        {"messages": [turn("user", "2+2?"), turn("assistant", "4"), turn("user", "times 3?"), turn("assistant", "12")]},
        {"messages": [turn("user", "x?"), turn("assistant", "4"), turn("user", "times 3?"), turn("assistant", "12")]},
        {"messages": [turn("user", "q"), turn("assistant", ""), turn("user", "again"), turn("assistant", "ok")]},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    spec = make_spec(tmp_path, [{"path": "c.jsonl", "columns": {"messages": "messages"}}])
    examples, quarantine, stats = ingest(spec)
    assert stats["rows_read"] == 5 == len(examples) + len(quarantine)
    assert examples.iloc[0][["system", "prompt", "response"]].tolist() == ["be brief", "hi", "hello"]
    assert pd.isna(examples.iloc[0]["history"])
    # Multi-turn: the last exchange is prompt/response, the earlier turns are kept as history.
    chat = examples.iloc[1]
    assert chat[["prompt", "response"]].tolist() == ["times 3?", "12"]
    assert json.loads(chat["history"]) == [turn("user", "2+2?"), turn("assistant", "4")]
    # Same last exchange, other history: a different example, not a duplicate.
    assert examples.iloc[2]["content_hash"] != chat["content_hash"]
    reasons = quarantine.sort_values("source_line")["reason"].tolist()
    assert "got roles ['user', 'assistant', 'user']" in reasons[0]
    assert reasons[1] == "messages[1].content is empty or not text"
