import pandas as pd
import pytest

from sft_dagster.labels import (
    CorrectionsError,
    append_corrections,
    apply_corrections,
    label_issue_detection_scores,
    read_corrections,
)


def examples() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "example_id": ["a", "b", "c", "d"],
            "content_hash": ["a", "b", "c", "d"],
            "prompt": ["great", "awful", "meh", "spam"],
            "response": ["negative", "negative", "neutral", "positive"],
            "system": [None] * 4,
            "source_file": ["f.jsonl"] * 4,
            "source_line": [1, 2, 3, 4],
            "metadata": ["{}"] * 4,
        }
    )


def test_missing_file_means_no_corrections(tmp_path):
    assert read_corrections(tmp_path / "none.csv").empty


def test_apply_relabel_drop_keep_with_provenance(tmp_path):
    path = tmp_path / "corrections.csv"
    append_corrections(path, [
        {"example_id": "a", "action": "relabel", "new_value": "neutral", "note": "first try"},
        {"example_id": "a", "action": "relabel", "new_value": "positive", "note": "praise"},
        {"example_id": "d", "action": "drop", "note": "spam"},
        {"example_id": "c", "action": "keep", "note": "checked"},
        {"example_id": "zzz", "action": "drop"},
    ])
    labelled, quarantined, stats = apply_corrections(examples(), read_corrections(path), ["negative", "neutral", "positive"])
    assert len(labelled) + len(quarantined) == 4
    row = labelled.set_index("example_id").loc["a"]
    assert (row["response"], row["original_response"], row["label_source"], row["correction_note"]) == (
        "positive", "negative", "correction", "praise")  # the last decision wins
    assert labelled.set_index("example_id").loc["c", "reviewed"]
    assert not labelled.set_index("example_id").loc["b", "reviewed"]
    assert quarantined["example_id"].tolist() == ["d"]
    assert quarantined["reason"].iloc[0] == "dropped by corrections file: spam"
    assert quarantined["source_line"].iloc[0] == 4
    assert stats["unknown_example_ids"] == 1 and stats["relabelled"] == 1


def test_relabel_to_unknown_label_is_rejected(tmp_path):
    path = tmp_path / "c.csv"
    append_corrections(path, [{"example_id": "a", "action": "relabel", "new_value": "postive"}])
    with pytest.raises(CorrectionsError, match="not an allowed label"):
        apply_corrections(examples(), read_corrections(path), ["negative", "neutral", "positive"])


@pytest.mark.parametrize(
    "body, match",
    [
        ("example_id,action\na,explode\n", r"c\.csv:2: action: 'explode'"),
        ("example_id,action,new_value\na,relabel,\n", r"c\.csv:2: new_value"),
        ("id,action\na,drop\n", r"c\.csv:1: header"),
        ("example_id,action\n,drop\n", r"c\.csv:2: example_id"),
    ],
)
def test_bad_corrections_name_file_line_field(tmp_path, body, match):
    path = tmp_path / "c.csv"
    path.write_text(body)
    with pytest.raises(CorrectionsError, match=match):
        read_corrections(path)


def test_append_is_atomic_and_validated(tmp_path):
    path = tmp_path / "c.csv"
    append_corrections(path, [{"example_id": "a", "action": "keep"}])
    before = path.read_text()
    with pytest.raises(CorrectionsError):
        append_corrections(path, [{"example_id": "b", "action": "nonsense"}])
    assert path.read_text() == before
    assert not list(tmp_path.glob(".c.csv.*"))


def test_detection_scores():
    flags = pd.DataFrame({"example_id": ["a", "b", "c", "d"], "is_label_issue": [True, True, False, False]})
    audit = pd.DataFrame({"text": ["great", "meh"], "true_label": ["positive", "negative"]})
    scores = label_issue_detection_scores(examples(), flags, audit)
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["true_positives"] == 1
