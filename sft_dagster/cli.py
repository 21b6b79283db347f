"""`sft-dagster`: run a spec without the UI, through the same Dagster definitions and instance.

    sft-dagster run assets/demo_sentiment.yaml               # the whole pipeline
    sft-dagster run assets/demo_sentiment.yaml --select label_issues --json
    sft-dagster demo-data                                     # regenerate the demo data set
    sft-dagster review demo_sentiment                          # the data engineer's loop (see review_cli)
    sft-dagster rank demo_preference                           # rank candidate replies (see rank_cli)

Runs are recorded in the Dagster instance under $DAGSTER_HOME (default ./.dagster_home), so they show
in `dagster dev -w workspace.yaml` afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import rank_cli, review_cli
from .instance import ensure_dagster_home

def _latest_metadata(instance, key) -> dict:
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def run_summary(instance, spec, result) -> dict:
    """One JSON-able summary of a run: rows per stage, checks, metrics, artefact paths."""
    import dagster as dg

    key = lambda n: dg.AssetKey([spec.name, n])  # noqa: E731
    meta = {n: _latest_metadata(instance, key(n)) for n in (
        "raw_examples", "labelled_examples", "label_issues", "curated_examples", "quarantine", "dataset_splits",
        "fine_tuned_adapter", "evaluation_report", "promoted_model")}
    checks = []
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            data = event.event_specific_data
            checks.append({"asset": data.asset_key.path[-1], "check": data.check_name, "passed": data.passed,
                           "severity": data.severity.value})
    materialized = sorted({e.asset_key.path[-1] for e in result.all_events
                           if e.event_type_value == "ASSET_MATERIALIZATION" and e.asset_key})
    label_summary = meta["label_issues"].get("summary") or {}
    report_path = meta["evaluation_report"].get("report_path")
    evaluation = {}
    if report_path and Path(report_path).with_suffix(".json").exists():
        report = json.loads(Path(report_path).with_suffix(".json").read_text())
        evaluation = {"primary_metric": report["primary_metric"], "base": report["base"], "tuned": report["tuned"],
                      "champion": report.get("champion"), "champion_version": report.get("champion_version"),
                      "promotion": report.get("promotion"), "corrected_view": report.get("corrected_view")}
    return {
        "pipeline": spec.name,
        "run_id": result.run_id,
        "success": result.success,
        "materialized": materialized,
        "rows": {
            "in": meta["raw_examples"].get("rows_read"),
            "ingested": meta["raw_examples"].get("dagster/row_count"),
            "labelled": meta["labelled_examples"].get("dagster/row_count"),
            "curated": meta["curated_examples"].get("dagster/row_count"),
            "quarantined": meta["quarantine"].get("dagster/row_count"),
            "quarantined_by_stage": meta["quarantine"].get("by_stage"),
            "splits": (meta["dataset_splits"].get("summary") or {}).get("rows"),
        },
        "label_issues": {k: label_summary.get(k) for k in ("label_issue_count", "label_issue_rate", "outlier_count", "near_duplicate_count")},
        "label_issue_audit": meta["label_issues"].get("audit"),
        "checks": checks,
        "failed_blocking_checks": [f"{c['asset']}:{c['check']}" for c in checks if not c["passed"] and c["severity"] == "ERROR"],
        "training": meta["fine_tuned_adapter"].get("metrics"),
        "evaluation": evaluation,
        "artefacts": {
            "adapter": meta["fine_tuned_adapter"].get("adapter_dir"),
            "report": report_path,
            "registry": meta["promoted_model"].get("path"),
            "review_queue": meta["label_issues"].get("review_queue_csv"),
        },
    }


def _print_summary(s: dict) -> None:
    rows = s["rows"]
    print(f"\n== {s['pipeline']}: run {s['run_id'][:8]} {'succeeded' if s['success'] else 'FAILED'} ==")
    print(f"rows in {rows['in']}  ->  curated {rows['curated']}  +  quarantined {rows['quarantined']} {rows['quarantined_by_stage'] or ''}")
    if rows["splits"]:
        print(f"splits: {rows['splits']}")
    li = s["label_issues"]
    if li.get("label_issue_count") is not None:
        print(f"label issues found: {li['label_issue_count']} (rate {li['label_issue_rate']:.3f}), outliers {li['outlier_count']}, near duplicates {li['near_duplicate_count']}")
    if s.get("label_issue_audit"):
        a = s["label_issue_audit"]
        print(f"label-issue detection vs known errors: precision {a['precision']:.2f}, recall {a['recall']:.2f}")
    failed = [c for c in s["checks"] if not c["passed"]]
    print(f"checks: {len(s['checks']) - len(failed)} passed, {len(failed)} failed"
          + "".join(f"\n  - {c['asset']}:{c['check']} ({'blocking' if c['severity'] == 'ERROR' else 'warning'})" for c in failed))
    ev = s["evaluation"]
    if ev:
        m = ev["primary_metric"]
        champion = (f"champion {ev['champion_version']} {ev['champion'][m]:.3f}" if ev.get("champion")
                    else "no champion yet")
        print(f"{m}: base {ev['base'][m]:.3f}  |  {champion}  |  candidate {ev['tuned'][m]:.3f}")
        if ev.get("promotion"):
            print(f"promotion: {'promote' if ev['promotion']['promote'] else 'not promoted'}: {ev['promotion']['reason']}")
    for name, path in s["artefacts"].items():
        if path:
            print(f"{name}: {path}")


def cmd_run(args: argparse.Namespace) -> int:
    from .spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ensure_dagster_home()
    import dagster as dg

    from .defs import build_definitions
    from .defs.automation import job_name

    defs = build_definitions([spec], storage_root=args.storage, device=args.device)
    job = defs.resolve_job_def(job_name(spec))
    selection = None
    if args.select:
        graph = defs.resolve_asset_graph()
        keys = [dg.AssetKey([spec.name, s]) for s in args.select]
        unknown = [k.path[-1] for k in keys if not graph.has(k)]
        if unknown:
            known = sorted(k.path[-1] for k in graph.get_all_asset_keys() if k.path[0] == spec.name)
            print(f"error: --select: unknown stage(s) {unknown}; stages are {known}", file=sys.stderr)
            return 2
        selection = list(dg.AssetSelection.assets(*keys).upstream().required_multi_asset_neighbors().resolve(graph))
    instance = dg.DagsterInstance.get()
    result = job.execute_in_process(instance=instance, asset_selection=selection, raise_on_error=False,
                                    tags={"sft_dagster/launched_by": "cli"})
    summary = run_summary(instance, spec, result)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        _print_summary(summary)
    return 0 if summary["success"] and not summary["failed_blocking_checks"] else 1


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
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo-data", help="write the demo sentiment data set")
    demo.add_argument("--out", default="data/demo_sentiment")
    demo.add_argument("--rows", type=int, default=1200)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_data)

    review_cli.register(sub)
    rank_cli.register(sub)
    return parser


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
