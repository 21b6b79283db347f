"""`sft-dagster run` as a new user meets it: why a run stopped, quiet console, exit status, runs linked to
the code location's job, the `pipeline` tag from every entry point, and no PII in the event log."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import dagster as dg
import pytest
from test_pipeline_dagster import write_spec

from sft_dagster.cli import QUIET_LIBRARIES, main, quiet_libraries
from sft_dagster.console import StageConsole, progress_bar
from sft_dagster.instance import ensure_dagster_home
from sft_dagster.progress import format_line, parse_line

PII = ["ana.lopez+shop@example.co.uk", "(415) 555-2671", "+44 20 7946 0958", "4111 1111 1111 1111"]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    ensure_dagster_home(tmp_path / "home")  # the shipped dagster.yaml (run coordinator, queue limits)
    return tmp_path / "home"


def cli(spec, tmp_path, *args) -> int:
    return main(["run", str(spec), "--storage", str(tmp_path / "store"), "--device", "cpu", *args])


def event_metadata_text(instance, run_id: str) -> str:
    """Every metadata value and description of every event of a run, as text."""
    parts = []
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        data = event.event_specific_data
        for holder in (getattr(data, "materialization", None), data):
            metadata = getattr(holder, "metadata", None) or {}
            parts += [json.dumps(v.value, default=str) if not isinstance(v.value, str) else v.value
                      for v in metadata.values()]
        parts.append(str(getattr(data, "description", "") or ""))
    return "\n".join(parts)


def test_generation_task_warnings_exit_0_with_only_applicable_gates_and_no_pii_in_the_event_log(
        tmp_path, tiny_model_dir, home, capsys):
    """The GSM8K report: a generation task got label-only gates that failed "(blocking)"; arithmetic was a
    phone number; PII reached the event log. Now: no label-only gates, no_pii a warning with masked
    values, exit 0, and no planted value anywhere in the run's event metadata."""
    data = tmp_path / "maths"
    data.mkdir()
    rows = [{"q": f"Natalia sold {n} clips, then 16 - 3 - 4 = 9 more. How many?", "a": f"{n} + 9 = {n + 9} #### {n + 9}"}
            for n in range(40)]
    rows += [{"q": f"Call me on {PII[1]} or at {PII[0]}", "a": "ok"}, {"q": f"My card is {PII[3]}, ring {PII[2]}", "a": "ok"}]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = write_spec(tmp_path, tiny_model_dir, name="tiny_maths", **{
        "task": {"type": "qa"}, "sources": [{"path": "maths/*.jsonl", "columns": {"prompt": "q", "response": "a"}}],
        "quality": {"suite": "default", "cleanlab": {"folds": 3}}})
    assert cli(spec, tmp_path, "--select", "label_issues") == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "DEBUG" not in out + captured.err and "Traceback" not in out + captured.err
    assert "raw_examples" in out and " 42 rows" in out  # one line per stage, with its rows
    assert "label issues: 42 rows, about" in out  # the label views' pre-flight, in words (it was parsed as training's)
    assert "no_pii (warning)" in out and "(blocking)" not in out
    instance = dg.DagsterInstance.get()
    run = instance.get_runs(limit=1)[0]
    checks = {e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data
              for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert {"class_imbalance", "non_iid", "label_issue_rate"}.isdisjoint(checks)
    assert checks["issue_types_evaluated"].passed
    pii = checks["no_pii"]
    assert not pii.passed and pii.severity == dg.AssetCheckSeverity.WARN
    assert pii.metadata["failing_rows_count"].value == 2  # the arithmetic rows are not phone numbers
    logged = event_metadata_text(instance, run.run_id)
    assert "[phone]" in logged and "[email]" in logged  # previews and failing rows are there, masked
    for value in PII:
        assert value not in logged
    # Linked to the code location's job like a UI run: the job's page lists runs by name + repository tag.
    assert run.remote_job_origin.repository_origin.get_label() == "__repository__@sft_dagster"
    assert run.tags["pipeline"] == "tiny_maths"
    listed = instance.get_runs(dg.RunsFilter(job_name="tiny_maths_job",
                                             tags={".dagster/repository": "__repository__@sft_dagster"}))
    assert [r.run_id for r in listed] == [run.run_id]


def test_a_failed_run_says_which_stage_stopped_it_and_why(tmp_path, tiny_model_dir, home, capsys):
    spec = write_spec(tmp_path, tiny_model_dir)
    (tmp_path / "data" / "zz_excel_export.csv").write_bytes(b"review_text,sentiment\nna\xefve caf\xe9,positive\n")
    assert cli(spec, tmp_path, "--select", "raw_examples") == 1
    captured = capsys.readouterr()
    out = captured.out
    assert "STEP_FAILURE" not in captured.err and "Traceback" not in captured.err
    lines = out.strip().splitlines()
    summary = lines[lines.index(next(line for line in lines if line.startswith("== tiny_sentiment"))):]
    assert summary[1].startswith("stopped at raw_examples: ") and "zz_excel_export.csv:2: not UTF-8 text" in summary[1]
    assert "sources[].encoding" in summary[1]
    assert "rows in None" not in out and "Traceback" not in out and "DEBUG" not in out
    assert cli(spec, tmp_path, "--select", "raw_examples", "--json") == 1
    result = json.loads(capsys.readouterr().out)
    assert result["error"]["stage"] == "raw_examples" and result["error"]["type"] == "IngestError"
    assert "zz_excel_export.csv:2: not UTF-8 text" in result["error"]["message"]


def test_failed_blocking_checks_are_the_reason_with_counts_and_where_the_ids_are(tmp_path, tiny_model_dir, home, capsys):
    spec = write_spec(tmp_path, tiny_model_dir, **{"quality.cleanlab.max_label_issue_rate": 0.0,
                                                   "quality.previews": False})
    assert cli(spec, tmp_path, "--select", "label_issues", "--json") == 1
    result = json.loads(capsys.readouterr().out)
    error = result["error"]
    assert error["stage"] == "label_issues" and error["type"] == "BlockingCheckFailed"
    failed = {c["check"]: c for c in error["failed_checks"]}
    assert set(failed) == {"label_issues:label_issue_rate"}
    assert failed["label_issues:label_issue_rate"]["failing_rows"] > 0
    assert failed["label_issues:label_issue_rate"]["failing_ids"].endswith("review_queue.csv")
    # quality.previews: false keeps row content out of the event log altogether.
    instance = dg.DagsterInstance.get()
    logged = event_metadata_text(instance, result["run_id"])
    assert "row previews are off" in logged and "| prompt" not in logged


def test_ui_launched_asset_selection_runs_get_the_pipeline_tag(tmp_path, tiny_model_dir, home):
    from sft_dagster.defs import build_definitions
    from sft_dagster.defs.cli_runs import remote_origin
    from sft_dagster.spec import load_spec

    spec = load_spec(write_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], storage_root=tmp_path / "store")
    keys = {dg.AssetKey([spec.name, "raw_examples"]), dg.AssetKey([spec.name, "ingest_quarantine"])}
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=keys)
    instance = dg.DagsterInstance.get()
    code = dg.build_reconstructable_job("sft_dagster.defs.cli_runs", "cli_job",
                                        reconstructable_args=(str(spec.spec_path), str(tmp_path / "store"), "cpu"))
    run = instance.create_run_for_job(job_def=job, asset_selection=frozenset(keys), job_code_origin=code.get_python_origin(),
                                      remote_job_origin=remote_origin(job.name))
    assert "pipeline" not in run.tags  # what the UI creates for "Materialize selected"
    instance.submit_run(run.run_id, workspace=None)
    queued = instance.get_run_by_id(run.run_id)
    assert queued.tags["pipeline"] == spec.name and queued.status == dg.DagsterRunStatus.QUEUED
    limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert {"key": "pipeline", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits


def test_progress_lines_become_a_progress_bar():
    metrics = {"step": 52, "total_steps": 103, "train_loss": 0.41271, "trained_tokens": 26000, "seconds": 107.0,
               "validation_seconds": 0.0}
    line = format_line(metrics)
    bar = progress_bar(parse_line(line))
    assert bar.startswith("training [############------------] step 52/103 | loss 0.4127 | 243 tokens/s | ")
    assert bar.endswith("1m 45s left")

    class Entry:
        dagster_event, level, step_key = None, 20, "s"
        user_message = f"fine_tuned_adapter: {line}"

    out = io.StringIO()
    StageConsole({}, out, tty=True).handle(Entry())
    assert out.getvalue() == "\r" + bar
    out = io.StringIO()
    StageConsole({}, out, tty=False).handle(Entry())
    assert out.getvalue() == bar + "\n"
    Entry.user_message = 'pre-flight: {"n_examples": 800, "n_tokens": 63665, "optimizer_steps": 103, "device": "cpu", ' \
                         '"estimated_seconds": 262.4, "measured_tokens_per_second": 243.2}'
    out = io.StringIO()
    StageConsole({}, out, tty=True).handle(Entry())
    assert out.getvalue() == "training: 103 steps, 63,665 tokens, about 4m 22s (pre-flight: 243 tokens/s on cpu)\n"
    Entry.user_message = ('label_issues: label-issue pre-flight: {"enabled": true, "rows": 1230, "views": '
                          '{"tfidf": {"estimated_seconds": 1.5}, "embeddings": {"estimated_seconds": 42.0}}}')
    out = io.StringIO()
    StageConsole({}, out, tty=False).handle(Entry())
    assert out.getvalue() == "label issues: 1,230 rows, about 44s (tfidf 2s, embeddings 42s)\n"


def test_spec_rejects_a_suite_path(tmp_path, tiny_model_dir, capsys):
    spec = write_spec(tmp_path, tiny_model_dir, **{"quality.suite": "../../etc/evil"})
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "quality.suite" in err and "is not a suite name" in err


def test_a_console_run_silences_library_progress_bars(tmp_path, tiny_model_dir, home):
    """The GGUF conversion's tqdm bar and transformers' "Loading weights" broke into the stage console of
    `sft-dagster run`. tqdm and huggingface_hub read their switches when first imported, and building
    the definitions imports tqdm: the run must set them before that. Checked in the process of a real
    console run, on the tqdm class and hub setting the stages use afterwards."""
    spec = write_spec(tmp_path, tiny_model_dir)
    code = ("import sys\nfrom sft_dagster.cli import main\n"
            f"code = main(['run', {str(spec)!r}, '--storage', {str(tmp_path / 'store')!r}, '--select', 'raw_examples'])\n"
            "from tqdm.auto import tqdm\nfrom huggingface_hub.utils import are_progress_bars_disabled\n"
            "print('RESULT', code, tqdm(range(1)).disable, are_progress_bars_disabled())")
    env = {k: v for k, v in os.environ.items() if k not in QUIET_LIBRARIES} | {"DAGSTER_HOME": str(home)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "RESULT 0 True True" in run.stdout, run.stdout[-1500:] + run.stderr[-1500:]


def test_quiet_libraries_keeps_a_users_own_setting(monkeypatch):
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    quiet_libraries()
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG" and os.environ["TQDM_DISABLE"] == "1"


def test_run_summary_shows_a_label_tasks_evaluation_as_before():
    from sft_dagster.cli import evaluation_lines, evaluation_summary

    report = {"task": "sentiment", "primary_metric": "accuracy", "base": {"accuracy": 0.4}, "tuned": {"accuracy": 0.8},
              "champion": None, "champion_version": None,
              "intervals": {"models": {"base": {"accuracy": [0.2, 0.6]}, "tuned": {"accuracy": [0.6, 1.0]}}},
              "promotion": {"promote": True, "reason": "candidate accuracy 0.8000 beats base model 0.4000"}}
    assert evaluation_lines(evaluation_summary(report)) == [
        "accuracy: base 0.400  |  no champion yet  |  candidate 0.800",
        "promotion: promote: candidate accuracy 0.8000 beats base model 0.4000"]


def test_run_summary_shows_a_generation_tasks_intervals_difference_win_rate_and_decision():
    from test_promotion import translation_report

    from sft_dagster.cli import evaluation_lines, evaluation_summary
    from sft_dagster.registry import promotion_decision

    report = translation_report(range(32), champion=True)
    report["promotion"] = promotion_decision(report, "chrf", 0.0)
    report["win_rate"] = {"judge": "embedded:smollm2-135m-instruct", "n": 40, "versus": {
        "base": {"label": "base", "value": 0.6, "interval": [0.5, 0.7], "wins": 10, "ties": 28, "losses": 2},
        "champion": {"label": "champion v1", "value": 0.55, "interval": [0.45, 0.65], "wins": 6, "ties": 32, "losses": 2}}}
    lines = evaluation_lines(evaluation_summary(report))
    iv, d = report["intervals"]["models"], report["intervals"]["differences"]["tuned_minus_champion"]["chrf"]
    cell = lambda model: f"{report[model]['chrf']:.3f} [{iv[model]['chrf'][0]:.3f}, {iv[model]['chrf'][1]:.3f}]"  # noqa: E731
    assert lines[0] == f"chrf (95% intervals): base {cell('base')}  |  champion v1 {cell('champion')}  |  candidate {cell('tuned')}"
    assert d["value"] > 0 and lines[1] == (f"  candidate - champion v1: {d['value']:+.3f} "
                                           f"[{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]")
    assert lines[2] == ("win rate over 40 test rows (judge embedded:smollm2-135m-instruct): vs base 0.600 [0.500, 0.700], "
                        "vs champion v1 0.550 [0.450, 0.650]")
    assert lines[3] == f"promotion: promote: {report['promotion']['reason']}"
    first = translation_report(range(32))  # before the first promotion: compared with the base model
    assert evaluation_lines(evaluation_summary(first))[1].startswith("  candidate - base: +")
