"""Suites load strictly, every check can fail, and cleanlab findings are trustworthy."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from sft_dagster.quality import SuiteError, find_label_issues, load_suite, run_suite
from sft_dagster.quality.pii import contains_pii
from sft_dagster.spec import CleanlabSpec, TaskSpec

from test_quality_checks import ROOT, TASK, frame  # noqa: E402  (one row-frame builder for both files)


def outcomes_by_name(df, suite="sentiment", **kw):
    return {o.name: o for o in run_suite(df, load_suite(suite, ROOT / "data_checks"), task=TASK, **kw)}


def test_shipped_suites_load_with_includes():
    names = [n for n, _, _ in load_suite("sentiment", ROOT / "data_checks").check_names()]
    assert {"label_in_set", "prompt_not_null", "fits_max_length", "no_pii"} <= set(names)


@pytest.mark.parametrize("body, match", [
    ("checks:\n  - name: a\n    expectation: expect_column_values_to_be_purple\n    kwargs: {column: x}\n",
     r"bad\.yaml:2: checks\.0: unknown great-expectations expectation"),
    ("checks:\n  - name: a\n    expectation: expect_column_values_to_not_be_null\n    kwargs: {colum: x}\n",
     r"bad\.yaml:2: checks\.0: bad arguments"),
    ("checks:\n  - name: a\n    sft_check: vibes\n", r"bad\.yaml:2: checks\.0: unknown sft_check"),
    ("checks:\n  - name: bad name\n    sft_check: pii\n", r"bad\.yaml:\d: checks\.0\.name"),
    ("checks:\n  - name: a\n    sft_check: pii\n    blockin: true\n", r"checks\.0\.blockin"),
])
def test_bad_suites_fail_at_load_with_file_line_key(tmp_path, body, match):
    (tmp_path / "bad.yaml").write_text(body)
    with pytest.raises(SuiteError, match=match):
        load_suite("bad", tmp_path)


def test_missing_suite_lists_available(tmp_path):
    (tmp_path / "one.yaml").write_text("checks: []\n")
    with pytest.raises(SuiteError, match=r"available: \['one'\]"):
        load_suite("two", tmp_path)


def test_clean_data_passes_every_blocking_check():
    df = frame([(f"review {i} is fine", TASK.labels[i % 3]) for i in range(30)])
    lengths = pd.DataFrame({"example_id": df["example_id"], "n_tokens": 20, "n_response_tokens": 2})
    outcomes = outcomes_by_name(df, token_lengths=lengths, max_length=64)
    failed = [name for name, o in outcomes.items() if o.blocking and not o.passed]
    assert failed == []


def test_each_row_check_catches_its_rows():
    rows = [(f"review {i} is fine", TASK.labels[i % 3]) for i in range(20)]
    rows += [("   ", "neutral"), ("bad<|im_end|>injection", "positive"), ("typo label", "postive"),
             ("mail me at ana@example.com", "neutral"), ("review 0 is fine", "negative")]
    df = frame(rows)
    lengths = pd.DataFrame({"example_id": df["example_id"], "n_tokens": [20] * 24 + [999], "n_response_tokens": 2})
    out = outcomes_by_name(df, token_lengths=lengths, max_length=64)
    assert out["no_empty_text"].failing_ids == ["id20"]
    assert out["no_chat_control_tokens"].failing_ids == ["id21"]
    assert out["label_in_set"].failing_ids == ["id22"] and not out["label_in_set"].passed  # 1/25 > 1%
    assert out["no_pii"].failing_ids == ["id23"] and not out["no_pii"].blocking
    assert out["fits_max_length"].failing_ids == ["id24"]
    assert out["few_exact_duplicates"].failing_ids == ["id24"]  # the repeat, not the first occurrence
    assert out["few_exact_duplicates"].passed  # 1 repeat in 25 rows = 4%, within max_rate 5%
    assert out["prompt_not_null"].passed


def test_content_scans_read_the_earlier_turns_of_a_chat():
    df = frame([(f"review {i} is fine", TASK.labels[i % 3]) for i in range(30)])
    df["history"] = None
    df.loc[3, "history"] = '[{"role": "user", "content": "hi <|im_start|>system"}, {"role": "assistant", "content": "ok"}]'
    df.loc[5, "history"] = '[{"role": "user", "content": "write to ana@example.com"}, {"role": "assistant", "content": "ok"}]'
    out = outcomes_by_name(df)
    assert out["no_chat_control_tokens"].failing_ids == ["id3"]
    assert out["no_pii"].failing_ids == ["id5"]
    assert out["no_empty_text"].passed  # a missing history is not empty text


def test_gx_reports_failing_example_ids():
    df = frame([("a", "positive"), ("b", "negative")])
    df.loc[1, "prompt"] = None
    out = outcomes_by_name(df, "default")
    assert not out["prompt_not_null"].passed and out["prompt_not_null"].failing_ids == ["id1"]


def test_pii_patterns():
    assert contains_pii("write to bob.smith+x@mail.co.uk") == "email"
    assert contains_pii("card 4111 1111 1111 1111 thanks") == "card_number"
    assert contains_pii("call +44 20 7946 0958 today") == "phone"
    assert contains_pii("tel. (020) 7946-0958") == "phone"
    assert contains_pii("bought 2 for 15.99 in 2024") is None
    assert contains_pii("the kettle is lovely") is None


def labelled_reviews(n: int = 300, errors: int = 15, seed: int = 0):
    rng = random.Random(seed)
    words = {"positive": ["great", "love", "excellent", "superb"], "negative": ["awful", "broken", "hate", "refund"],
             "neutral": ["okay", "average", "fine", "ordinary"]}
    rows, truth = [], []
    for i in range(n):
        label = TASK.labels[i % 3]
        text = f"the item number {i} is {rng.choice(words[label])} and {rng.choice(words[label])}"
        rows.append((text, label))
    flipped = rng.sample(range(n), errors)
    for i in flipped:
        rows[i] = (rows[i][0], next(lab for lab in TASK.labels if lab != rows[i][1]))
    df = frame(rows)
    df["reviewed"] = False
    return df, {f"id{i}" for i in flipped}


def test_cleanlab_finds_planted_label_errors(monkeypatch):
    import multiprocessing

    def no_fork(*args, **kwargs):  # a fork()ed pool inside a threaded Dagster process can deadlock
        raise AssertionError("cleanlab started a multiprocessing pool")

    monkeypatch.setattr(multiprocessing, "Pool", no_fork)
    df, planted = labelled_reviews()
    report = find_label_issues(df, TASK, CleanlabSpec(folds=5))
    flagged = set(report.flags.loc[report.flags["is_label_issue"], "example_id"])
    precision = len(flagged & planted) / max(1, len(flagged))
    recall = len(flagged & planted) / len(planted)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    assert report.summary["missing_issue_types"] == []
    queue = report.review_queue
    assert queue["severity"].is_monotonic_decreasing
    planted_rows = queue[queue["example_id"].isin(planted)]
    assert (planted_rows["suggested_label"] != planted_rows["given_label"]).all()
    gates = {o.name: o for o in report.gate_outcomes(CleanlabSpec(max_label_issue_rate=0.01))}
    assert not gates["label_issue_rate"].passed and gates["issue_types_evaluated"].passed


def test_pred_probs_columns_follow_datalab_label_order():
    from sft_dagster.quality.label_issues import out_of_fold_probabilities, text_features

    df, _ = labelled_reviews(errors=0)
    sparse, _ = text_features(df["prompt"])
    probs, classes = out_of_fold_probabilities(sparse, df["response"].to_numpy(), folds=3)
    assert classes == sorted(TASK.labels)
    # each row's most probable column is its own label for this easy data
    assert (np.array(classes)[probs.argmax(1)] == df["response"].to_numpy()).mean() > 0.95


def test_reviewed_rows_are_never_flagged():
    df, planted = labelled_reviews()
    df.loc[df["example_id"].isin(planted), "reviewed"] = True
    report = find_label_issues(df, TASK, CleanlabSpec(folds=5))
    assert not report.flags.loc[report.flags["example_id"].isin(planted), "is_label_issue"].any()
    assert report.summary["reviewed_rows_not_flagged"] == len(planted)


def test_a_missing_issue_type_fails_the_gate():
    df, _ = labelled_reviews()
    report = find_label_issues(df, TASK, CleanlabSpec(folds=3))
    report.summary["missing_issue_types"] = ["non_iid"]
    gate = {o.name: o for o in report.gate_outcomes(CleanlabSpec())}["issue_types_evaluated"]
    assert not gate.passed and "non_iid" in gate.description


def test_generation_tasks_get_outliers_and_near_duplicates():
    df = frame([(f"question {i} about the weather today", f"answer {i}") for i in range(60)])
    report = find_label_issues(df, TaskSpec(type="qa"), CleanlabSpec())
    assert set(report.summary["issue_types_checked"]) == {"outlier", "near_duplicate"}
    assert not report.flags["is_label_issue"].any()


def test_suite_names_are_identifiers_never_paths(tmp_path):
    (tmp_path / "evil.yaml").write_text("checks: []\n")
    checks = tmp_path / "checks"
    checks.mkdir()
    (checks / "mine.yaml").write_text("include: [../evil]\nchecks: []\n")
    with pytest.raises(SuiteError, match=r"mine\.yaml: include: '\.\./evil' is not a suite name"):
        load_suite("mine", checks)
    with pytest.raises(SuiteError, match=r"quality\.suite: '\.\./evil' is not a suite name"):
        load_suite("../evil", checks)
