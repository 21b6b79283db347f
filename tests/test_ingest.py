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


def test_a_utf8_byte_order_mark_is_not_part_of_line_one(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"prompt": "caf\xc3\xa9?", "response": "yes"}\r\n{"prompt": "b", "response": "c"}\r\n')
    (tmp_path / "b.csv").write_bytes(bom + b"prompt,response\r\nfirst,row\r\n")
    spec = make_spec(tmp_path, [{"path": "a.jsonl"}, {"path": "b.csv"}])
    examples, quarantine, stats = ingest(spec)
    assert len(quarantine) == 0
    assert list(examples["prompt"]) == ["café?", "b", "first"]


def test_encoding_key_reads_latin1_and_the_error_names_file_line_byte_and_key(tmp_path):
    (tmp_path / "a.csv").write_bytes("prompt,response\nok,fine\nna\xefve caf\xe9,oui\n".encode("latin-1"))
    spec = make_spec(tmp_path, [{"path": "a.csv"}])
    with pytest.raises(IngestError, match=r"a\.csv:3: not UTF-8 text: byte 0xef at byte 3 of the line .*"
                                          r"set sources\[\]\.encoding \(e\.g\. cp1252 or latin-1\)"):
        ingest(spec)
    examples = ingest(make_spec(tmp_path, [{"path": "a.csv", "encoding": "latin-1"}]))[0]
    assert list(examples["prompt"]) == ["ok", "naïve café"]
    (tmp_path / "u.jsonl").write_bytes('{"prompt": "é", "response": "x"}\n'.encode("utf-16"))
    with pytest.raises(IngestError, match=r"u\.jsonl:1: .*UTF-16 byte-order mark: set sources\[\]\.encoding: utf-16"):
        ingest(make_spec(tmp_path, [{"path": "u.jsonl"}]))
    assert ingest(make_spec(tmp_path, [{"path": "u.jsonl", "encoding": "utf-16"}]))[0]["prompt"].tolist() == ["é"]


def test_unknown_encoding_is_a_spec_error(tmp_path):
    from sft_dagster.spec import SpecError

    with pytest.raises(SpecError, match=r"sources\.0\.encoding: .*unknown encoding 'utf-9'"):
        make_spec(tmp_path, [{"path": "a.csv", "encoding": "utf-9"}])


def test_an_empty_file_is_skipped_with_a_warning_and_all_empty_fails(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "header_only.csv").write_text("prompt,response\n")
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    spec = make_spec(tmp_path, [{"path": "*.jsonl"}, {"path": "*.csv"}])
    examples, quarantine, stats = ingest(spec)
    assert len(examples) == 1 and stats["rows_read"] == 1
    assert sorted(w.split("/")[-1] for w in stats["warnings"]) == [
        "blank.jsonl: the file has no rows (skipped)", "empty.jsonl: the file has no rows (skipped)",
        "header_only.csv: the file has no rows (skipped)"]
    (tmp_path / "data.jsonl").write_text("")
    with pytest.raises(IngestError, match="no rows in any source file; every file is empty"):
        ingest(spec)


def test_a_file_of_broken_lines_quarantines_each_line_instead_of_a_column_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "a"\n{"prompt": \n')
    examples, quarantine, stats = ingest(make_spec(tmp_path, [{"path": "a.jsonl"}]))
    assert len(examples) == 0 and list(quarantine["source_line"]) == [1, 2]
    assert quarantine["reason"].str.startswith("invalid JSON").all()


def test_parallel_text_pair_is_read_line_by_line(tmp_path):
    """A line-aligned corpus (Moses/OPUS layout): line N of each file is one example; a line blank on one
    side is quarantined naming the file and line; rows read = kept + quarantined."""
    (tmp_path / "val.en").write_text("A dog runs.\r\nTwo cats sleep.\n\nA man reads.\nA red car.\n", encoding="utf-8")
    (tmp_path / "val.fr").write_text("Un chien court.\nDeux chats dorment.\n\n\nUne voiture rouge.\n", encoding="utf-8")
    spec = make_spec(tmp_path, [{"path": "val.en", "format": "parallel", "target": "val.fr"}])
    examples, quarantine, stats = ingest(spec)
    assert list(zip(examples["prompt"], examples["response"], examples["source_line"])) == [
        ("A dog runs.", "Un chien court.", 1), ("Two cats sleep.", "Deux chats dorment.", 2),
        ("A red car.", "Une voiture rouge.", 5)]
    assert list(quarantine["source_line"]) == [4]
    assert quarantine["reason"].iloc[0] == "line 4 of val.fr is blank"
    assert stats["rows_read"] == 4 == len(examples) + len(quarantine)  # line 3, blank on both sides, is no row


def test_parallel_pair_of_unequal_length_fails_naming_both_files(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    spec = make_spec(tmp_path, [{"path": "a.en", "format": "parallel", "target": "a.de"}])
    with pytest.raises(IngestError, match=r"a\.de has 2 lines, a\.en has 3"):
        ingest(spec)
    missing = make_spec(tmp_path, [{"path": "a.en", "format": "parallel", "target": "nope.de"}])
    with pytest.raises(IngestError, match="target: no such file"):
        ingest(missing)


def test_parallel_source_spec_errors_name_the_key(tmp_path):
    from sft_dagster.spec import SpecError, load_spec

    path = tmp_path / "spec.yaml"
    path.write_text("name: t\ntask: {type: translation}\nsources:\n  - path: a.en\n    format: parallel\n")
    with pytest.raises(SpecError, match=r"spec\.yaml:4: sources\.0\.target: .*needs `target`"):
        load_spec(path)
    path.write_text("name: t\ntask: {type: translation}\nsources:\n  - path: a.jsonl\n    target: a.fr\n")
    with pytest.raises(SpecError, match=r"sources\.0\.target: .*is for format: parallel"):
        load_spec(path)
