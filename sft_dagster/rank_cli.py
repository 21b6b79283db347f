"""The labelling loop for preferences on the command line: rank candidate replies, or import rankings.

    sft-dagster rank demo_preference                     # one unranked prompt at a time, in the terminal
    sft-dagster rank demo_preference --mode best_worst   # only the best and the worst reply
    sft-dagster rank demo_preference --import FILE       # rankings made elsewhere (CSV or JSONL)
    sft-dagster demo-preference-data                     # write the preference demo data set

Each prompt is shown with its candidates numbered [1]..[K]. Answer with a ranking, best first:
`2>1>3` (ties with `=`: `2>1=3`), or `best 2 worst 3`; add a note after `#`; `s` skips the prompt,
`q` (or end of input) stops. Every answer is appended at once (atomically, under the file's lock) to
the pipeline's rankings file with who and when, so stopping loses nothing.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from .formatting import history_turns
from .preference.rankings import (
    append_rankings,
    format_ranking,
    import_rankings,
    now_utc,
    ranking_queue,
    read_candidates,
    read_rankings,
)
from .review_cli import _author
from .storage import PipelinePaths, default_storage_root

HELP = ("rank best first, e.g. 2>1>3 (ties: 2>1=3), or 'best 2 worst 3'; add '# note' to explain; "
        "s = skip this prompt, q = quit")
_BEST_WORST = re.compile(r"^best\s+(\d+)\s+worst\s+(\d+)$")


def parse_answer(answer: str, n: int, mode: str = "full") -> tuple[str, list[list[int]], str]:
    """A typed answer -> (kind, tiers of 1-based candidate numbers, note); ValueError says what is wrong."""
    text, _, note = answer.partition("#")
    text = re.sub(r"\s+", " ", text.strip().lower())
    match = _BEST_WORST.match(text)
    if match:
        tiers = [[int(match.group(1))], [int(match.group(2))]]
        kind = "best_worst"
    elif re.fullmatch(r"\d+( ?[>=] ?\d+)+", text):
        tiers = [[int(x) for x in tier.split("=")] for tier in text.replace(" ", "").split(">")]
        kind = "full"
        if mode == "best_worst" and [len(t) for t in tiers] == [1, 1]:
            kind = "best_worst"
    else:
        raise ValueError(f"cannot read {answer.strip()!r}: {HELP}")
    numbers = [x for tier in tiers for x in tier]
    out_of_range = [x for x in numbers if not 1 <= x <= n]
    if out_of_range:
        raise ValueError(f"there is no candidate {out_of_range[0]}; candidates are 1..{n}")
    if len(set(numbers)) != len(numbers):
        raise ValueError("a candidate is named twice")
    if kind == "full" and len(numbers) != n:
        raise ValueError(f"a full ranking orders all {n} candidates (or answer 'best X worst Y')")
    return kind, tiers, note.strip()


def _show(prompt_row: pd.Series, group: pd.DataFrame, position: int, total: int) -> None:
    print(f"\n=== prompt {position} of {total} (prompt_id {prompt_row['prompt_id']}) ===")
    system = prompt_row.get("system")
    if isinstance(system, str) and system:
        print(f"[system] {system}")
    for turn in history_turns(prompt_row.get("history")):
        print(f"[{turn['role']}] {turn['content']}")
    print(f"[user] {prompt_row['prompt']}")
    for number, row in enumerate(group.itertuples(), start=1):
        text = str(row.response).replace("\n", "\n      ")
        print(f"  [{number}] {text}")


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    paths = PipelinePaths(Path(args.storage) if args.storage else default_storage_root(), args.pipeline)
    candidates = Path(args.candidates) if args.candidates else paths.default_candidates_file
    rankings = Path(args.rankings) if args.rankings else paths.default_rankings_file
    return candidates, rankings


def cmd_rank(args: argparse.Namespace) -> int:
    candidates_path, rankings_path = _paths(args)
    candidates = read_candidates(candidates_path)
    author = args.author or _author()
    if args.import_file:
        records = import_rankings(args.import_file, candidates, author=args.author)
        append_rankings(rankings_path, records)
        print(f"imported {len(records)} ranking(s) from {args.import_file} into {rankings_path}")
        return 0
    queue = ranking_queue(candidates, read_rankings(rankings_path), author=author,
                          rankings_per_prompt=args.per_prompt)
    groups = list(queue.groupby("prompt_id", sort=False))
    print(f"{len(groups)} prompt(s) to rank for {args.pipeline} as {author}; rankings go to {rankings_path}")
    print(HELP)
    recorded = 0
    for position, (prompt_id, group) in enumerate(groups[: args.limit], start=1):
        group = group.reset_index(drop=True)
        _show(group.iloc[0], group, position, len(groups))
        while True:
            try:
                answer = input("ranking> ")
            except EOFError:
                answer = "q"
            command = answer.strip().lower()
            if command in ("q", "quit"):
                print(f"stopped: {recorded} ranking(s) recorded")
                return 0
            if command in ("s", "skip"):
                break
            if command in ("", "?", "h", "help"):
                print(HELP)
                continue
            try:
                kind, tiers, note = parse_answer(answer, len(group), args.mode)
            except ValueError as exc:
                print(f"error: {exc}")
                continue
            ids = [[str(group.loc[n - 1, "candidate_id"]) for n in tier] for tier in tiers]
            record = {"prompt_id": str(prompt_id), "kind": kind, "ranking": ids, "author": author,
                      "timestamp": now_utc(), "note": note, "source": "cli"}
            append_rankings(rankings_path, [record])
            recorded += 1
            print(f"recorded who={author} prompt={prompt_id} {kind} {format_ranking(ids)}"
                  + (f" note={note!r}" if note else ""))
            break
    print(f"done: {recorded} ranking(s) recorded")
    return 0


def cmd_demo_preference_data(args: argparse.Namespace) -> int:
    from .preference.demo_data import generate_preference_demo

    manifest = generate_preference_demo(args.out, n_prompts=args.prompts, seed=args.seed, noise=args.noise)
    print(f"wrote {manifest['prompts']} prompts, {manifest['candidates']} candidates and {manifest['rankings']} rankings "
          f"({manifest['noisy_rankings']} with annotator noise) to {args.out}")
    return 0


def register(subparsers) -> None:
    rank = subparsers.add_parser("rank", help="rank a pipeline's candidate replies in the terminal, or import rankings")
    rank.add_argument("pipeline", help="pipeline name")
    rank.add_argument("--storage", default=None, help="storage root (default: $SFT_DAGSTER_STORAGE or ./.sft)")
    rank.add_argument("--candidates", default=None, help="candidates table (default <storage>/<pipeline>/preference/candidates.parquet)")
    rank.add_argument("--rankings", default=None, help="rankings file (default <storage>/<pipeline>/preference/rankings.jsonl)")
    rank.add_argument("--author", default=None, help="who ranks (default $SFT_DAGSTER_USER or the login name)")
    rank.add_argument("--mode", choices=["full", "best_worst"], default="full")
    rank.add_argument("--per-prompt", type=int, default=1, help="rankings by different people each prompt needs")
    rank.add_argument("--limit", type=int, default=None, help="stop after this many prompts")
    rank.add_argument("--import", dest="import_file", default=None, metavar="FILE",
                      help="import rankings made elsewhere (CSV or JSONL) instead of ranking here")
    rank.set_defaults(func=cmd_rank)

    demo = subparsers.add_parser("demo-preference-data", help="write the preference demo data set")
    demo.add_argument("--out", default="data/demo_preference")
    demo.add_argument("--prompts", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--noise", type=float, default=0.1, help="share of rankings the simulated annotator gets wrong")
    demo.set_defaults(func=cmd_demo_preference_data)
