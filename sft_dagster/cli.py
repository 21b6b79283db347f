"""`sft-dagster`: run a spec without the UI, through the same Dagster definitions and instance.

    sft-dagster run assets/demo_sentiment.yaml               # the whole pipeline
    sft-dagster run assets/demo_sentiment.yaml --select label_issues --json
    sft-dagster run assets/demo_sentiment.yaml --verbose      # Dagster's per-event log lines too
    sft-dagster demo-data                                     # regenerate the demo data set
    sft-dagster review demo_sentiment                          # the data engineer's loop (see review_cli)
    sft-dagster rank demo_preference                           # rank candidate replies (see rank_cli)

Runs are recorded in the Dagster instance under $DAGSTER_HOME (default ./.dagster_home) as runs of the
code location's job (`defs/cli_runs.py`), so they show in `dagster dev -w workspace.yaml` on the job's
page and the Overview timeline, like runs launched there. The console shows one line per stage and a
training progress bar (`console.py`); a failed run's summary starts with the stage that stopped it and
why. Exit status: 0, or 1 when the run failed or a blocking check failed (warnings never), 2 for bad
arguments or a bad spec.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import rank_cli, review_cli
from .instance import ensure_dagster_home


def _latest_metadata(instance, key) -> dict:
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _user_error(error) -> tuple[str, str]:
    """(exception type, message) of the error the stage's code raised, without Dagster's wrapping.

    Dagster wraps it in `DagsterExecutionStepExecutionError`; the message our code wrote (file:line:key,
    the failed gates) is in the innermost cause that is not Dagster's own."""
    while error.cause is not None and error.cls_name and error.cls_name.startswith("Dagster"):
        error = error.cause
    message = error.message.strip()
    prefix = f"{error.cls_name}: "
    if prefix in message.split("\n", 1)[0]:
        message = message[message.index(prefix) + len(prefix):]
    return error.cls_name or "Error", message


def stage_names(job_def) -> dict[str, list[str]]:
    """step key -> the asset names that step materializes (the stage's main asset first)."""
    out: dict[str, list[str]] = {}
    for assets_def in job_def.asset_layer.asset_graph.assets_defs:
        if not assets_def.is_executable:
            continue
        names = sorted((k.path[-1] for k in assets_def.keys), key=lambda n: (n.endswith("quarantine"), n))
        if not names:  # a step of checks only (the leakage check on the splits)
            names = [f"checks on {k}" for k in sorted({c.asset_key.path[-1] for c in assets_def.check_keys})]
        out[assets_def.node_def.name] = names
    return out


def run_summary(instance, spec, run_id: str, graph, steps: dict[str, list[str]]) -> dict:
    """One JSON-able summary of a run: why it stopped (first), rows per stage, checks, metrics, artefact paths."""
    import dagster as dg

    from .prompt_model import METHOD as PROMPT_MODEL

    key = lambda n: dg.AssetKey([spec.name, n])
    meta = {n: _latest_metadata(instance, key(n)) for n in (
        "raw_examples", "labelled_examples", "label_issues", "curated_examples", "quarantine", "dataset_splits",
        "fine_tuned_adapter", "evaluation_report", "promoted_model")}
    run = instance.get_run_by_id(run_id)
    events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event is not None]
    checks = _check_evaluations(events, graph)
    materialized = sorted({e.asset_key.path[-1] for e in events if e.event_type_value == "ASSET_MATERIALIZATION" and e.asset_key})
    failed_blocking = [c for c in checks if not c["passed"] and c["blocking"]]
    meta = {name: (values if name in materialized else {}) for name, values in meta.items()}  # no stale numbers
    label_summary = meta["label_issues"].get("summary") or {}
    report_path = meta["evaluation_report"].get("report_path")
    evaluation = {}
    if report_path and Path(report_path).with_suffix(".json").exists():
        evaluation = evaluation_summary(json.loads(Path(report_path).with_suffix(".json").read_text()))
    return {
        "pipeline": spec.name,
        "run_id": run_id,
        "preference": _preference_summary(instance, spec, materialized, key),
        "student": _student_summary(instance, spec, materialized, key),
        "success": bool(run is not None and run.status.value == "SUCCESS") and not failed_blocking,
        "error": _stop_reason(events, failed_blocking, steps, run),
        "materialized": materialized,
        "warnings": list(meta["raw_examples"].get("warnings") or []),
        "rows": {
            "in": meta["raw_examples"].get("rows_read"),
            "ingested": meta["raw_examples"].get("dagster/row_count"),
            "labelled": meta["labelled_examples"].get("dagster/row_count"),
            "curated": meta["curated_examples"].get("dagster/row_count"),
            "quarantined": meta["quarantine"].get("dagster/row_count"),
            "quarantined_by_stage": meta["quarantine"].get("by_stage"),
            "splits": (meta["dataset_splits"].get("summary") or {}).get("rows"),
        },
        "label_issues": {k: label_summary.get(k) for k in ("label_issue_count", "label_issue_rate", "outlier_count",
                                                           "near_duplicate_count", "status", "estimated_precision_top")}
                        | {"label_conflict_rows": meta["label_issues"].get("label_conflict_rows")}
                        # generation tasks: the response findings (misaligned, wrong language, copies ...)
                        | ({"response_issues": {k: label_summary["response"].get(k) for k in (
                            "issue_count", "issue_rate", "warning_count", "by_kind")}} if "response" in label_summary else {}),
        "label_issue_audit": meta["label_issues"].get("audit"),
        "checks": checks,
        "failed_blocking_checks": [f"{c['asset']}:{c['check']}" for c in failed_blocking],
        "training": meta["fine_tuned_adapter"].get("metrics"),
        "evaluation": evaluation,
        "artefacts": {
            # a few-shot prompt model (training.min_rows_to_train) is a prompt, not an adapter
            ("prompt_model" if (meta["fine_tuned_adapter"].get("metrics") or {}).get("method") == PROMPT_MODEL
             else "adapter"): meta["fine_tuned_adapter"].get("adapter_dir"),
            "report": report_path,
            "registry": meta["promoted_model"].get("path"),
            "review_queue": meta["label_issues"].get("review_queue_csv"),
        },
    }


def _check_evaluations(events, graph) -> list[dict]:
    """Every asset check evaluated in the run, with its blocking flag and where its failing ids are."""
    import dagster as dg

    checks = []
    for event in events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            data = event.event_specific_data
            check_key = dg.AssetCheckKey(data.asset_key, data.check_name)
            blocking = graph.get_check_spec(check_key).blocking if graph.has(check_key) else data.severity.value == "ERROR"
            check_meta = {k: v.value for k, v in (data.metadata or {}).items()}
            checks.append({"asset": data.asset_key.path[-1], "check": data.check_name, "passed": data.passed,
                           "blocking": blocking, "severity": data.severity.value, "description": data.description,
                           "failing_rows": check_meta.get("failing_rows_count"),
                           "failing_ids": check_meta.get("failing_ids_file")})
    return checks


def _stop_reason(events, failed_blocking: list[dict], steps: dict[str, list[str]], run) -> dict | None:
    """Why the run stopped: the first failed step, else the blocking checks that failed, else the run's status."""
    error = None
    # A blocking check that fails inside its asset's step fails that step (Dagster's blocking=True):
    # the reason is then the checks, reported below, not Dagster's wrapper error.
    failures = [e for e in events if e.event_type_value == "STEP_FAILURE"
                and not (failed_blocking and e.event_specific_data.error.cls_name == "DagsterAssetCheckFailedError")]
    if failures:
        first = failures[0]
        kind, message = _user_error(first.event_specific_data.error)
        names = steps.get(first.step_key, [first.step_key])
        error = {"stage": names[0], "step": first.step_key, "type": kind, "message": message}
    elif failed_blocking:
        first = failed_blocking[0]
        error = {"stage": first["asset"], "type": "BlockingCheckFailed",
                 "message": f"{len(failed_blocking)} blocking check(s) failed; training and promotion are stopped "
                            "until they pass"}
    elif run is not None and run.status.value != "SUCCESS":
        error = {"stage": None, "type": "RunFailed", "message": f"the run ended {run.status.value}"}
    if error is not None and failed_blocking:
        error["failed_checks"] = [{"check": f"{c['asset']}:{c['check']}", "failing_rows": c["failing_rows"],
                                   "failing_ids": c["failing_ids"], "description": c["description"]}
                                  for c in failed_blocking]
    return error


def _preference_summary(instance, spec, materialized: list[str], key) -> dict:
    if spec.preference is None:
        return {}
    pref = {n: _latest_metadata(instance, key(n)) if n in materialized else {}
            for n in ("preference_pairs", "preference_quarantine", "reward_model", "preference_report",
                      "preference_promoted_model")}
    report_file = pref["preference_report"].get("report_path")
    report = json.loads(Path(report_file).with_suffix(".json").read_text()) if report_file else {}
    return {"pairs_kept": pref["preference_pairs"].get("pairs_kept"),
            "pairs_quarantined": pref["preference_pairs"].get("pairs_quarantined"),
            # every record removed: pairs failing a gate, and rankings / imported rows that never
            # became pairs (unreadable, a side missing)
            "records_quarantined": pref["preference_quarantine"].get("dagster/row_count"),
            "reward_model_pairwise_accuracy": pref["reward_model"].get("pairwise_accuracy"),
            "policies": report.get("policies"), "vs_sft": report.get("vs_sft"),
            "promotion": report.get("promotion"), "report": report_file,
            "registry": pref["preference_promoted_model"].get("path")}


def _student_summary(instance, spec, materialized: list[str], key) -> dict:
    if spec.student is None or "student_report" not in materialized:
        return {}
    report_file = _latest_metadata(instance, key("student_report")).get("report_path")
    report = json.loads(Path(report_file).with_suffix(".json").read_text()) if report_file else {}
    return {name: {"model": report[name]["model"], report["primary_metric"]: report[name]["metrics"][report["primary_metric"]],
                   "parameters": report[name]["parameters"],
                   "tokens_per_second": report[name]["speed"]["tokens_per_second"]}
            for name in ("teacher", "student") if name in report} | {"report": report_file}


def evaluation_summary(report: dict) -> dict:
    """What the run summary shows of an evaluation report: each model's metrics and the promotion decision;
    for generation tasks also the primary metric's 95% interval per model, the candidate's difference from
    the model it was compared with (the champion, else the base model) with its interval, and the judged
    win rates (reports without them: none)."""
    from .task_types import LABEL_TASKS

    summary = {"primary_metric": report["primary_metric"], "base": report["base"], "tuned": report["tuned"],
               "champion": report.get("champion"), "champion_version": report.get("champion_version"),
               "promotion": report.get("promotion"), "corrected_view": report.get("corrected_view")}
    intervals = report.get("intervals") or {}
    if report.get("task") in LABEL_TASKS or not intervals.get("models"):
        return summary
    metric, compared = report["primary_metric"], intervals.get("compared_with")
    difference = ((intervals.get("differences") or {}).get(compared) or {}).get(metric)
    summary |= {"confidence": intervals.get("confidence", 0.95),
                "intervals": {model: found.get(metric) for model, found in intervals["models"].items()
                              if model in ("base", "champion", "tuned")},
                "difference": difference and {"versus": "champion" if compared == "tuned_minus_champion" else "base",
                                              **difference}}
    if win_rate := report.get("win_rate"):
        summary["win_rate"] = {"judge": win_rate["judge"], "n": win_rate["n"],
                               "versus": {name: {k: found.get(k) for k in ("label", "value", "interval")}
                                          for name, found in win_rate["versus"].items()}}
    return summary


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _with_interval(value, interval, sign: str = "") -> str:
    text = "n/a" if value is None else f"{value:{sign}.3f}"
    return text + (f" [{interval[0]:{sign}.3f}, {interval[1]:{sign}.3f}]" if interval else "")


def evaluation_lines(ev: dict) -> list[str]:
    """The run summary's evaluation lines: the primary metric of base, champion and candidate (generation
    tasks: each with its 95% interval, then the candidate's difference with its interval, and the judged win
    rates), and the promotion decision."""
    m = ev["primary_metric"]
    if "intervals" not in ev:  # label tasks (and reports without intervals): one line, as it always was
        champion = (f"champion {ev['champion_version']} {ev['champion'][m]:.3f}" if ev.get("champion")
                    else "no champion yet")
        lines = [f"{m}: base {ev['base'][m]:.3f}  |  {champion}  |  candidate {ev['tuned'][m]:.3f}"]
    else:
        cell = lambda model: _with_interval(ev[model].get(m), ev["intervals"].get(model))  # noqa: E731
        champion = f"champion {ev['champion_version']} {cell('champion')}" if ev.get("champion") else "no champion yet"
        lines = [f"{m} ({ev['confidence']:.0%} intervals): base {cell('base')}  |  {champion}  |  candidate {cell('tuned')}"]
        if d := ev.get("difference"):
            versus = f"champion {ev['champion_version']}" if d["versus"] == "champion" else "base"
            lines.append(f"  candidate - {versus}: {_with_interval(d.get('value'), d.get('interval'), '+')}")
        if wr := ev.get("win_rate"):
            lines.append(f"win rate over {wr['n']} test rows (judge {wr['judge']}): " + ", ".join(
                f"vs {found['label']} {_with_interval(found['value'], found['interval'])}"
                for found in wr["versus"].values()))
    if ev.get("promotion"):
        lines.append(f"promotion: {'promote' if ev['promotion']['promote'] else 'not promoted'}: {ev['promotion']['reason']}")
    return lines


def _print_summary(s: dict) -> None:
    rows = s["rows"]
    print(f"\n== {s['pipeline']}: run {s['run_id'][:8]} {'succeeded' if s['success'] else 'FAILED'} ==")
    if error := s["error"]:
        print(f"stopped at {error['stage'] or 'the run'}: {error['message']}")
        for c in error.get("failed_checks", []):
            where = f"; failing ids: {c['failing_ids']}" if c.get("failing_ids") else ""
            count = f"{c['failing_rows']} failing rows" if c.get("failing_rows") is not None else "failed"
            print(f"  - {c['check']} (blocking): {count}{where}\n      {c['description']}")
    for warning in s["warnings"]:
        print(f"warning: {warning}")
    if rows["in"] is not None:
        curated = f"  ->  curated {rows['curated']}" if rows["curated"] is not None else ""
        quarantined = (f"  +  quarantined {rows['quarantined']} {rows['quarantined_by_stage'] or ''}"
                       if rows["quarantined"] is not None else "")
        print(f"rows in {rows['in']}{curated}{quarantined}")
    if rows["splits"]:
        print(f"splits: {rows['splits']}")
    li = s["label_issues"]
    if li.get("status") and li["status"] != "run" and li.get("label_issue_rate") is None:
        print(f"label issues: {li['status']}")
    elif li.get("label_issue_count") is not None:
        print(f"label issues found: {li['label_issue_count']} (rate {li['label_issue_rate']:.3f}), outliers {li['outlier_count']}, near duplicates {li['near_duplicate_count']}")
    if li.get("label_conflict_rows"):
        print(f"label conflicts (duplicates with different labels) in the review queue: {li['label_conflict_rows']} rows")
    if (ri := li.get("response_issues")) and ri.get("issue_rate") is not None:
        kinds = ", ".join(f"{k} {v}" for k, v in (ri.get("by_kind") or {}).items() if v)
        print(f"response issues found: {ri['issue_count']} (rate {ri['issue_rate']:.3f})" + (f": {kinds}" if kinds else ""))
    if s.get("label_issue_audit"):
        a = s["label_issue_audit"]
        print(f"label-issue detection vs known errors: precision {a['precision']:.2f}, recall {a['recall']:.2f}")
    failed = [c for c in s["checks"] if not c["passed"]]
    print(f"checks: {len(s['checks']) - len(failed)} passed, {len(failed)} failed"
          + "".join(f"\n  - {c['asset']}:{c['check']} ({'blocking' if c['blocking'] else 'warning'})" for c in failed))
    if s["evaluation"]:
        print("\n".join(evaluation_lines(s["evaluation"])))
    for name, path in s["artefacts"].items():
        if path:
            print(f"{name}: {path}")
    pref = s.get("preference") or {}
    if pref.get("pairs_kept") is not None:
        unread = (pref.get("records_quarantined") or 0) - (pref["pairs_quarantined"] or 0)
        print(f"preference pairs: {pref['pairs_kept']} kept, {pref['pairs_quarantined']} quarantined by the pair gates"
              + (f", {unread} rankings or imported rows quarantined before pairing" if unread > 0 else "")
              + f"; reward model pairwise accuracy {_fmt(pref['reward_model_pairwise_accuracy'])}")
    for name, row in (pref.get("policies") or {}).items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
    for name, measures in (pref.get("vs_sft") or {}).items():
        print(f"  {name} - sft (95% interval over prompts): " + ", ".join(
            f"{k} {d['difference']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]" for k, d in measures.items()))
    if pref.get("promotion"):
        print(f"preference promotion ({pref['promotion']['candidate_policy']}): "
              f"{'promote' if pref['promotion']['promote'] else 'not promoted'}: {pref['promotion']['reason']}")
    for name in ("report", "registry"):
        if pref.get(name):
            print(f"preference {name}: {pref[name]}")
    for name, row in (s.get("student") or {}).items():
        if name == "report":
            print(f"student report: {row}")
        else:
            print(f"{name} ({row['model']}): " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v:,}"
                                                          for k, v in row.items() if k != "model"))


def cmd_run(args: argparse.Namespace) -> int:
    if not args.verbose:
        quiet_libraries()  # before tqdm and huggingface_hub are imported: both read these settings on import
    from .spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ensure_dagster_home()
    import dagster as dg

    from .console import EventFollower, StageConsole
    from .defs import build_definitions
    from .defs.automation import job_name
    from .defs.cli_runs import create_cli_run, execute_cli_run

    defs = build_definitions([spec], storage_root=args.storage, device=args.device)
    graph = defs.resolve_asset_graph()
    selection = None
    if args.select:
        keys = [dg.AssetKey([spec.name, s]) for s in args.select]
        unknown = [k.path[-1] for k in keys if not graph.has(k)]
        if unknown:
            known = sorted(k.path[-1] for k in graph.get_all_asset_keys() if k.path[0] == spec.name)
            print(f"error: --select: unknown stage(s) {unknown}; stages are {known}", file=sys.stderr)
            return 2
        selection = list(dg.AssetSelection.assets(*keys).upstream().required_multi_asset_neighbors().resolve(graph))
    run_config: dict = {"execution": {"config": {"in_process": {}}}}
    if not args.verbose:  # Dagster's per-event DEBUG lines; the event log keeps them all
        run_config["loggers"] = {"console": {"config": {"log_level": "CRITICAL"}}}
    instance = dg.DagsterInstance.get()
    job, run = create_cli_run(instance, spec, args.spec, storage_root=args.storage, device=args.device,
                              asset_selection=selection, run_config=run_config)
    steps = stage_names(defs.resolve_job_def(job_name(spec)))
    out = sys.stderr if args.json else sys.stdout
    if not args.verbose:
        print(f"{spec.name}: run {run.run_id} ({len(steps)} stages; --verbose for Dagster's event log)", file=out)
        with EventFollower(instance, run.run_id, StageConsole(steps, out).handle):
            execute_cli_run(instance, job, run)
    else:
        execute_cli_run(instance, job, run)
    summary = run_summary(instance, spec, run.run_id, graph, steps)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        _print_summary(summary)
    return 0 if summary["success"] else 1


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .demo_data import generate_demo_dataset

    manifest = generate_demo_dataset(args.out, n_rows=args.rows, seed=args.seed)
    print(f"wrote {manifest['rows_written']} rows ({len(manifest['planted_label_errors'])} planted label errors, "
          f"{manifest['exact_duplicates']} duplicates, {manifest['broken_rows']} broken rows) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft-dagster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize a spec's assets and print a summary")
    run.add_argument("spec", help="path to a pipeline spec (assets/*.yaml)")
    run.add_argument("--select", nargs="+", metavar="STAGE", help="only these stages and what they need")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    run.add_argument("--storage", default=None, help="storage root (default $SFT_DAGSTER_STORAGE or ./.sft)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--verbose", action="store_true", help="also print Dagster's per-event log lines")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo-data", help="write the demo sentiment data set")
    demo.add_argument("--out", default="data/demo_sentiment")
    demo.add_argument("--rows", type=int, default=1200)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_data)

    review_cli.register(sub)
    rank_cli.register(sub)
    return parser


# The run executes in this process: libraries' own progress bars and INFO lines (transformers' weight
# loading, the GGUF conversion, MLflow's store set-up) would interleave with the stage console.
QUIET_LIBRARIES = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_LOGGING_LEVEL": "WARNING"}


def quiet_libraries() -> None:
    """Silence library progress bars and INFO logs for a console run (a user's own setting wins).

    Effective only before those libraries are imported (tqdm and huggingface_hub read the variables
    on import), so `cmd_run` calls it first."""
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> int:
    from .labels import CorrectionsError
    from .spec import SpecError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, CorrectionsError, FileNotFoundError, KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
