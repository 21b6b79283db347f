"""The data engineer's loop: review queue -> accept / drop / keep -> corrections file with audit."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from sft_dagster.cli import main
from sft_dagster.labels import read_corrections


@pytest.fixture()
def pipeline(tmp_path, monkeypatch):
    specs = tmp_path / "assets"
    specs.mkdir()
    (specs / "shop.yaml").write_text(yaml.safe_dump({
        "name": "shop", "task": {"type": "sentiment", "labels": ["negative", "positive"]},
        "sources": [{"path": "x.jsonl"}],
    }))
    storage = tmp_path / "store"
    labels = storage / "shop" / "labels"
    labels.mkdir(parents=True)
    pd.DataFrame({
        "example_id": ["a1", "b2", "c3"], "prompt": ["great!", "awful", "ok"],
        "given_label": ["negative", "positive", "positive"], "suggested_label": ["positive", "negative", None],
        "label_score": [0.01, 0.2, 0.5], "is_label_issue": [True, True, False], "is_outlier": [False, False, True],
        "is_near_duplicate": [False, False, False], "issue_types": ["label", "label", "outlier"],
        "severity": [0.99, 0.8, 0.25], "source_file": ["x.jsonl"] * 3, "source_line": [1, 2, 3],
    }).to_csv(labels / "review_queue.csv", index=False)
    monkeypatch.setenv("SFT_DAGSTER_USER", "ana")
    return {"specs": str(specs), "storage": str(storage), "corrections": labels / "corrections.csv"}


def cli(pipeline, *args) -> int:
    return main([*args, "--specs-dir", pipeline["specs"], "--storage", pipeline["storage"]])


def test_review_prints_the_queue(pipeline, capsys):
    assert cli(pipeline, "review", "shop") == 0
    out = capsys.readouterr().out
    assert "3 rows in the review queue" in out and out.index("a1") < out.index("b2")


def test_accept_drop_keep_write_audited_decisions(pipeline):
    assert cli(pipeline, "accept", "shop", "a1", "--note", "praise, not a complaint") == 0
    assert cli(pipeline, "drop", "shop", "b2") == 0
    assert cli(pipeline, "keep", "shop", "c3", "--note", "checked") == 0
    rows = read_corrections(pipeline["corrections"]).set_index("example_id")
    assert rows.loc["a1", ["action", "new_value", "old_value", "author", "note"]].tolist() == [
        "relabel", "positive", "negative", "ana", "praise, not a complaint"]
    assert rows.loc["b2", "action"] == "drop" and rows.loc["c3", "action"] == "keep"
    assert rows["timestamp"].str.endswith("+00:00").all()


def test_accept_all_above_takes_only_severe_label_issues(pipeline):
    assert cli(pipeline, "accept", "shop", "--all-above", "0.9") == 0
    rows = read_corrections(pipeline["corrections"])
    assert rows["example_id"].tolist() == ["a1"]


def test_unknown_id_and_missing_suggestion_are_clear_errors(pipeline, capsys):
    assert cli(pipeline, "drop", "shop", "zz9") == 2
    assert "not in the review queue: ['zz9']" in capsys.readouterr().err
    assert cli(pipeline, "accept", "shop", "c3") == 2
    assert "no suggested label" in capsys.readouterr().err
    assert not pipeline["corrections"].exists()


def test_audit_lines_are_printed(pipeline, capsys):
    assert cli(pipeline, "keep", "shop", "c3", "--note", "fine as is") == 0
    out = capsys.readouterr().out
    assert "who=ana" in out and "id=c3 action=keep old='positive'" in out and "note='fine as is'" in out


def test_queue_sits_beside_a_spec_level_corrections_file_and_storage_from_env(tmp_path, monkeypatch, capsys):
    specs = tmp_path / "assets"
    specs.mkdir()
    (specs / "shop.yaml").write_text(yaml.safe_dump({
        "name": "shop", "task": {"type": "sentiment", "labels": ["negative", "positive"]},
        "sources": [{"path": "x.jsonl"}], "labels": {"corrections_file": "../labels/fixes.csv"},
    }))
    (tmp_path / "labels").mkdir()
    pd.DataFrame({"example_id": ["a1"], "prompt": ["great"], "given_label": ["negative"], "suggested_label": ["positive"],
                  "label_score": [0.02], "is_label_issue": [True], "is_outlier": [False], "is_near_duplicate": [False],
                  "issue_types": ["label"], "severity": [0.98], "source_file": ["x"], "source_line": [1]}
                 ).to_csv(tmp_path / "labels" / "review_queue.csv", index=False)
    monkeypatch.setenv("SFT_DAGSTER_STORAGE", str(tmp_path / "unused"))
    monkeypatch.setenv("SFT_DAGSTER_USER", "bo")
    assert main(["accept", "shop", "--all-above", "0.5", "--specs-dir", str(specs)]) == 0
    rows = read_corrections(tmp_path / "labels" / "fixes.csv")
    assert rows[["example_id", "action", "new_value", "old_value", "author"]].values.tolist() == [
        ["a1", "relabel", "positive", "negative", "bo"]]
    assert not (tmp_path / "unused").exists()


def test_missing_queue_says_what_to_run(pipeline, capsys):
    (pipeline["corrections"].parent / "review_queue.csv").unlink()
    assert cli(pipeline, "review", "shop") == 2
    assert "materialize shop/label_issues first" in capsys.readouterr().err


def test_review_shows_label_conflicts_with_every_label(pipeline, capsys):
    path = pipeline["corrections"].parent / "review_queue.csv"
    queue = pd.read_csv(path)
    queue["conflict_detail"] = ["negative (a1) vs positive (b2)", "negative (a1) vs positive (b2)", None]
    queue.to_csv(path, index=False)
    assert cli(pipeline, "review", "shop") == 0
    assert "negative (a1) vs positive (b2)" in capsys.readouterr().out
    assert cli(pipeline, "keep", "shop", "b2", "--note", "positive is right") == 0
    assert read_corrections(pipeline["corrections"])["action"].tolist() == ["keep"]


def test_relabel_writes_a_rewritten_response_that_the_labels_stage_applies(tmp_path, monkeypatch, capsys):
    from sft_dagster.labels import apply_corrections

    specs = tmp_path / "assets"
    specs.mkdir()
    (specs / "fr.yaml").write_text(yaml.safe_dump({"name": "fr", "task": {"type": "translation"},
                                                   "sources": [{"path": "x.jsonl"}]}))
    labels = tmp_path / "store" / "fr" / "labels"
    labels.mkdir(parents=True)
    pd.DataFrame({"example_id": ["t1"], "prompt": ["A dog runs."], "given_label": ["Ein Hund rennt."],
                  "suggested_label": [None], "severity": [0.97], "issue_types": ["wrong_language"],
                  "is_label_issue": [False], "response_issue_reason": ["German, not French"]}
                 ).to_csv(labels / "review_queue.csv", index=False)
    monkeypatch.setenv("SFT_DAGSTER_USER", "lea")
    args = ["--specs-dir", str(specs), "--storage", str(tmp_path / "store")]
    assert main(["accept", "fr", "t1", *args]) == 2  # no suggestion to accept on a generation row
    assert "sft-dagster relabel PIPELINE ID --to TEXT" in capsys.readouterr().err
    rewrite = tmp_path / "rewrite.txt"
    rewrite.write_text("Un chien, qui court\nsur la plage.\n", encoding="utf-8")  # a comma and a newline survive
    assert main(["relabel", "fr", "t1", "--to-file", str(rewrite), "--note", "translated", *args]) == 0
    rows = read_corrections(labels / "corrections.csv")
    assert rows[["example_id", "action", "new_value", "old_value", "author", "note"]].values.tolist() == [
        ["t1", "relabel", "Un chien, qui court\nsur la plage.", "Ein Hund rennt.", "lea", "translated"]]
    examples = pd.DataFrame({"example_id": ["t1", "t2"], "prompt": ["A dog runs.", "A cat."],
                             "response": ["Ein Hund rennt.", "Un chat."]})
    labelled, quarantined, stats = apply_corrections(examples, rows)
    assert labelled.set_index("example_id").loc["t1", "response"] == "Un chien, qui court\nsur la plage."
    assert labelled.set_index("example_id").loc["t2", "response"] == "Un chat." and stats["relabelled"] == 1
    assert main(["relabel", "fr", "t1", "--to", "  ", *args]) == 2
    assert "needs the new value" in capsys.readouterr().err


def test_relabel_on_a_label_task_takes_only_the_tasks_labels(pipeline, capsys):
    assert cli(pipeline, "relabel", "shop", "c3", "--to", "neutral") == 2
    assert "'neutral' is not a label of shop" in capsys.readouterr().err and not pipeline["corrections"].exists()
    assert cli(pipeline, "relabel", "shop", "c3", "--to", "negative") == 0
    assert read_corrections(pipeline["corrections"])[["action", "new_value", "old_value"]].values.tolist() == [
        ["relabel", "negative", "positive"]]
