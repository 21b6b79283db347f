"""The check registry, the suite's row findings as a column, and the Dagster layer's shared helpers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
from pydantic import BaseModel, ConfigDict

from sft_dagster.defs.common import rounded
from sft_dagster.defs.runs import cached_report, reuse_or_run
from sft_dagster.quality import FAILED_CHECKS, CheckOutcome, blocking_failures, with_failed_checks
from sft_dagster.quality.check_registry import CheckRegistry
from sft_dagster.quality.sft_checks import SFT_CHECKS
from sft_dagster.quality.suite import CheckEntry


class MinWords(BaseModel):
    model_config = ConfigDict(extra="forbid")
    words: int = 2


def test_a_registered_check_validates_its_arguments_and_runs():
    checks = CheckRegistry("toy_check")

    @checks.register("min_words", "every prompt has at least `words` words", MinWords)
    def min_words(entry, args, df, ctx):
        failing = df["prompt"].str.split().str.len() < args.words
        return CheckOutcome(entry.name, not failing.any(), entry.blocking, entry.describe(),
                            failing_ids=df.loc[failing, "example_id"].tolist())

    check = checks["min_words"]
    assert check.description == "every prompt has at least `words` words" and checks.names() == ["min_words"]
    assert check.parse({}).words == 2 and check.parse({"words": 3}).words == 3
    with pytest.raises(ValueError, match=r"bad arguments for min_words: unknown \['wrds'\]; accepted: \['words'\]"):
        check.parse({"wrds": 3})
    with pytest.raises(ValueError, match="bad arguments for min_words: words"):
        check.parse({"words": "many"})
    with pytest.raises(ValueError, match="registered twice"):
        checks.register("min_words", "again")(min_words)
    with pytest.raises(ValueError, match=r"unknown toy_check 'max_words'; known: \['min_words'\]"):
        checks["max_words"]
    df = pd.DataFrame({"example_id": ["a", "b"], "prompt": ["two words", "one"]})
    entry = SimpleNamespace(name="short", blocking=True, describe=lambda: check.description)
    outcome = check.run(entry, check.parse({}), df, None)
    assert not outcome.passed and outcome.failing_ids == ["b"]


def test_every_sft_check_has_a_description_and_an_argument_model():
    for name in SFT_CHECKS.names():
        check = SFT_CHECKS[name]
        assert check.description and check.args.model_config.get("extra") == "forbid", name
        CheckEntry(name="x", sft_check=name)  # its defaults are valid


def test_the_suite_findings_travel_with_the_rows_in_suite_order():
    df = pd.DataFrame({"example_id": ["a", "b", "c"]})
    outcomes = [CheckOutcome("warn", False, False, "", failing_ids=["a"]),
                CheckOutcome("second", False, True, "", failing_ids=["b", "a"]),
                CheckOutcome("first", False, True, "", failing_ids=["a"])]
    marked = with_failed_checks(df, outcomes)
    assert marked[FAILED_CHECKS].tolist() == ["second|first", "second", ""]  # warnings are not quarantined
    assert blocking_failures(marked, ["first", "second"]) == {"first": ["a"], "second": ["a", "b"]}
    assert blocking_failures(with_failed_checks(df, []), ["first"]) == {}


def test_floats_shown_in_the_ui_keep_four_significant_places():
    shown = rounded({"accuracy": 0.39574468085106385, "loss": [1.23456789, 2], "tokens": 12345678.9,
                     "small": -0.000123456, "zero": 0.0, "flag": True, "name": "x"})
    assert shown == {"accuracy": 0.3957, "loss": [1.235, 2], "tokens": 12345679.0, "small": -0.0001235,
                     "zero": 0.0, "flag": True, "name": "x"}


class Log:
    def __init__(self):
        self.lines = []

    def info(self, line):
        self.lines.append(line)


def test_a_report_is_computed_once_per_inputs_and_a_finished_run_is_kept(tmp_path):
    context = SimpleNamespace(log=Log())
    calls = []

    def compute(inputs_hash):
        calls.append(inputs_hash)
        return {"score": len(calls), "inputs_hash": inputs_hash}

    def write(folder, report):
        folder.mkdir(parents=True)
        (folder / "r.json").write_text(json.dumps(report))

    kwargs = dict(read=lambda path: json.loads(path.read_text()), write=write, unchanged="same inputs")
    first, first_hash, skipped = cached_report(context, tmp_path, "r.json", {"a": 1}, compute, **kwargs)
    assert not skipped and first == {"score": 1, "inputs_hash": first_hash}
    again, again_hash, skipped = cached_report(context, tmp_path, "r.json", {"a": 1}, compute, **kwargs)
    assert skipped and again == first and again_hash == first_hash and context.log.lines == ["same inputs: keeping it"]
    other, other_hash, skipped = cached_report(context, tmp_path, "r.json", {"a": 2}, compute, **kwargs)
    assert not skipped and other_hash != first_hash and len(calls) == 2

    run_dir = tmp_path / "run"
    finished = lambda d: json.loads((d / "done.json").read_text()) if (d / "done.json").exists() else None  # noqa: E731

    def run():
        run_dir.mkdir()
        (run_dir / "done.json").write_text('{"model": "trained"}')
        return {"model": "trained", "fresh": True}

    assert reuse_or_run(context, run_dir, finished, run) == ({"model": "trained", "fresh": True}, False)
    assert reuse_or_run(context, run_dir, finished, run, "adapter") == ({"model": "trained"}, True)
    assert context.log.lines[-1] == "inputs unchanged since training run run: keeping its adapter"
