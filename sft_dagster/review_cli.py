"""The data engineer's loop on the command line: review the queue, then accept, drop or keep rows.

    sft-dagster review demo_sentiment [--limit 20]
    sft-dagster accept demo_sentiment ID [ID ...] [--note "..."]     # relabel to cleanlab's suggestion
    sft-dagster accept demo_sentiment --all-above 0.9                  # every queued label issue that severe
    sft-dagster drop demo_sentiment ID [ID ...] [--note "..."]       # send rows to the quarantine
    sft-dagster keep demo_sentiment ID [ID ...] [--note "..."]       # checked-correct: stop flagging them
    sft-dagster relabel translation_en_fr ID --to "Un chien court."  # a rewritten response (or any label)
    sft-dagster relabel dialogsum ID --to-file summary.txt           # a long rewrite, read from a file

A label conflict (duplicates whose labels disagree) is resolved by `keep` on the row whose label is right
(curation then keeps that label and quarantines the others), or by relabelling or dropping rows.

Every decision is appended to the pipeline's corrections file with who, when, old and new value and
the note (atomically, under a lock file beside it: two people deciding at once lose nothing). The data-change sensor then starts a run and the stale assets re-materialize.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .labels import append_corrections
from .spec import PipelineSpec, SpecError, load_spec
from .storage import PipelinePaths, default_storage_root
from .task_types import LABEL_TASKS


def _spec(args: argparse.Namespace) -> PipelineSpec:
    path = Path(args.specs_dir) / f"{args.pipeline}.yaml"
    if not path.exists():
        raise SpecError(f"{path}: no spec for pipeline {args.pipeline!r} (looked in --specs-dir {args.specs_dir})")
    return load_spec(path)


def corrections_file(spec: PipelineSpec, storage_root: Path) -> Path:
    if spec.labels.corrections_file:
        return spec.resolve(spec.labels.corrections_file)
    return PipelinePaths(storage_root, spec.name).default_corrections_file


def review_queue(spec: PipelineSpec, storage_root: Path) -> pd.DataFrame:
    path = corrections_file(spec, storage_root).parent / "review_queue.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no review queue yet; materialize {spec.name}/label_issues first "
                                f"(sft-dagster run <spec> --select label_issues)")
    return pd.read_csv(path, dtype={"example_id": str})


def _author() -> str:
    return os.environ.get("SFT_DAGSTER_USER") or getpass.getuser()


def _decisions(queue: pd.DataFrame, ids: list[str], action: str, note: str | None,
               new_value: str | None = None) -> list[dict]:
    by_id = queue.set_index("example_id")
    unknown = [i for i in ids if i not in by_id.index]
    if unknown:
        raise KeyError(f"not in the review queue: {unknown}")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for example_id in ids:
        row = by_id.loc[example_id]
        value = new_value or ""
        if action == "relabel" and new_value is None:
            if pd.isna(row["suggested_label"]):
                raise ValueError(f"{example_id}: cleanlab has no suggested label to accept; use drop or keep, or (a "
                                 "generation row) `sft-dagster relabel PIPELINE ID --to TEXT` with the rewritten "
                                 "response")
            value = str(row["suggested_label"])
        rows.append({"example_id": example_id, "action": action, "new_value": value, "note": note or "",
                     "author": _author(), "timestamp": now, "old_value": str(row["given_label"])})
    return rows


def _storage(args: argparse.Namespace) -> Path:
    return Path(args.storage) if args.storage else default_storage_root()


def cmd_review(args: argparse.Namespace) -> int:
    spec = _spec(args)
    queue = review_queue(spec, _storage(args))
    columns = ["example_id", "severity", "issue_types", "given_label", "suggested_label", "prompt"]
    columns += ["response_issue_reason"] if "response_issue_reason" in queue else []  # generation tasks
    shown = queue.head(args.limit)[columns + (["conflict_detail"] if "conflict_detail" in queue else [])]
    shown = shown.assign(prompt=shown["prompt"].astype(str).str.slice(0, 70))
    if "response_issue_reason" in shown:
        shown = shown.assign(response_issue_reason=shown["response_issue_reason"].fillna("").astype(str).str.slice(0, 120))
    if "conflict_detail" in shown:  # a label conflict: every label of the duplicates, with their ids
        shown = shown.assign(conflict_detail=shown["conflict_detail"].fillna(""))
    print(f"{len(queue)} rows in the review queue of {spec.name} (worst first); corrections go to "
          f"{corrections_file(spec, _storage(args))}")
    print(shown.to_string(index=False))
    return 0


def _apply(args: argparse.Namespace, action: str) -> int:
    spec = _spec(args)
    queue = review_queue(spec, _storage(args))
    ids = list(args.ids or [])
    if getattr(args, "all_above", None) is not None:
        chosen = queue[(queue["severity"] >= args.all_above) & queue["is_label_issue"].astype(bool)]
        ids += [i for i in chosen["example_id"] if i not in ids]
    if not ids:
        print("error: name example ids (or --all-above SCORE for accept)", file=sys.stderr)
        return 2
    return _write(spec, args, _decisions(queue, ids, action, args.note), action)


def _write(spec: PipelineSpec, args: argparse.Namespace, rows: list[dict], action: str) -> int:
    path = corrections_file(spec, _storage(args))
    append_corrections(path, rows)
    for row in rows:  # the audit line of each decision, as written
        print(f"who={row['author']} when={row['timestamp']} id={row['example_id']} action={row['action']} "
              f"old={row['old_value']!r} new={row['new_value']!r} note={row['note']!r}")
    print(f"{action}: {len(rows)} decision(s) appended to {path}")
    return 0


def _new_value(spec: PipelineSpec, args: argparse.Namespace) -> str:
    """The value `relabel` writes: `--to` or the text of `--to-file` (its trailing newline dropped); for a
    label task it must be one of the task's labels."""
    value = Path(args.to_file).read_text(encoding="utf-8").rstrip("\n") if args.to_file else args.to
    if not (value or "").strip():
        raise ValueError("relabel needs the new value: --to TEXT or --to-file PATH (not empty)")
    labels = spec.task.labels if spec.task.type in LABEL_TASKS else None
    if labels and value not in labels:
        raise ValueError(f"{value!r} is not a label of {spec.name} ({spec.task.type}): one of {list(labels)}")
    return value


def cmd_relabel(args: argparse.Namespace) -> int:
    spec = _spec(args)
    queue = review_queue(spec, _storage(args))
    rows = _decisions(queue, [args.id], "relabel", args.note, new_value=_new_value(spec, args))
    return _write(spec, args, rows, "relabel")


def register(subparsers) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("pipeline", help="pipeline name (assets/<name>.yaml)")
        p.add_argument("--specs-dir", default="assets")
        p.add_argument("--storage", default=None,
                       help="storage root (default: $SFT_DAGSTER_STORAGE or ./.sft)")

    review = subparsers.add_parser("review", help="print a pipeline's review queue (cleanlab findings)")
    common(review)
    review.add_argument("--limit", type=int, default=20)
    review.set_defaults(func=cmd_review)

    for name, action, help_text in (
        ("accept", "relabel", "relabel rows to cleanlab's suggested label"),
        ("drop", "drop", "send rows to the quarantine"),
        ("keep", "keep", "mark rows checked-correct so they are not flagged again"),
    ):
        p = subparsers.add_parser(name, help=help_text)
        common(p)
        p.add_argument("ids", nargs="*", metavar="ID", help="example ids from the review queue")
        p.add_argument("--note", default=None, help="why (kept in the audit trail)")
        if name == "accept":
            p.add_argument("--all-above", type=float, default=None, metavar="SCORE",
                           help="also accept every queued label issue with severity >= SCORE")
        p.set_defaults(func=lambda a, action=action: _apply(a, action))

    relabel = subparsers.add_parser("relabel", help="set a row's new response (generation) or label, as written")
    common(relabel)
    relabel.add_argument("id", metavar="ID", help="an example id from the review queue")
    value = relabel.add_mutually_exclusive_group(required=True)
    value.add_argument("--to", default=None, metavar="TEXT", help="the new response or label")
    value.add_argument("--to-file", default=None, metavar="PATH", help="a file holding the new response (UTF-8)")
    relabel.add_argument("--note", default=None, help="why (kept in the audit trail)")
    relabel.set_defaults(func=cmd_relabel)
