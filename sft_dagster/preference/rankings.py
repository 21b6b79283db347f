"""The rankings file: people's judgements of a prompt's candidate replies, and the ranking queue.

The rankings file is JSONL, one judgement per line, appended (never edited) so it doubles as the
audit log:

    {"prompt_id": "3f2a...", "kind": "full", "ranking": [["c7..."], ["a1...", "e4..."], ["9b..."]],
     "author": "ana", "timestamp": "2026-11-24T10:00:00+00:00", "note": "second one hedges", "source": "cli"}

`ranking` lists tiers, best first; the ids in a tier are tied. A `full` ranking orders every candidate
of the prompt; a `best_worst` judgement names only the best and the worst (two tiers of one id).
JSONL rather than CSV because a ranking is a list of lists. Appends hold `atomic.locked(path)` for
the read-modify-replace and validate the whole new content before the atomic rename, so concurrent
rankers never lose a line and a bad line never reaches the file. Errors name file:line:field.

Rankings made elsewhere are imported from CSV (`ranking` as text, "c7>a1=e4>9b", or `best` and
`worst` columns) or JSONL (the same fields, `ranking` as text or tiers), all-or-nothing: one bad row
and nothing is appended.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .. import atomic
from ..ingest import _iter_csv, _iter_jsonl
from .columns import REQUIRED_CANDIDATE_COLUMNS

RANKING_FIELDS = ["prompt_id", "kind", "ranking", "author", "timestamp", "note", "source"]
KINDS = ("full", "best_worst")
ERRORS_SHOWN = 10


class RankingsError(ValueError):
    """A rankings file or a ranking that cannot be used; the message names file, line and field."""


def parse_ranking(value, kind: str = "full") -> list[list[str]]:
    """Tiers of candidate ids, best first, from "a>b=c" text or a list of ids / lists of ids."""
    if isinstance(value, str):
        tiers = [[i.strip() for i in tier.split("=")] for tier in value.split(">")]
    elif isinstance(value, list):
        tiers = [list(t) if isinstance(t, list) else [t] for t in value]
    else:
        raise ValueError(f"must be text like 'a>b=c' or a list of tiers, got {type(value).__name__}")
    ids = [i for tier in tiers for i in tier]
    if not all(isinstance(i, str) and i.strip() for i in ids):
        raise ValueError("every candidate id must be non-empty text")
    ids = [i.strip() for i in ids]
    if len(ids) < 2:
        raise ValueError("a ranking needs at least two candidates")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"candidate(s) named more than once: {repeated}")
    if kind == "best_worst" and [len(t) for t in tiers] != [1, 1]:
        raise ValueError("a best_worst judgement names exactly one best and one worst candidate")
    return [[i.strip() for i in tier] for tier in tiers]


def format_ranking(tiers: list[list[str]]) -> str:
    return ">".join("=".join(tier) for tier in tiers)


def _timestamp(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be an ISO 8601 time")
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone (write e.g. 2026-11-24T10:00:00+00:00)")
    return value.strip()


def validate_record(record, where: str) -> dict:
    """A canonical ranking record, or RankingsError naming `where` (file:line) and the field."""
    if not isinstance(record, dict):
        raise RankingsError(f"{where}: record: a ranking must be an object, got {type(record).__name__}")
    out: dict = {}
    prompt_id = record.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id.strip():
        raise RankingsError(f"{where}: prompt_id: must be non-empty text")
    out["prompt_id"] = prompt_id.strip()
    kind = record.get("kind") or "full"
    if kind not in KINDS:
        raise RankingsError(f"{where}: kind: {kind!r} is not one of {list(KINDS)}")
    out["kind"] = kind
    try:
        out["ranking"] = parse_ranking(record.get("ranking"), kind)
    except ValueError as exc:
        raise RankingsError(f"{where}: ranking: {exc}") from None
    author = record.get("author")
    if not isinstance(author, str) or not author.strip():
        raise RankingsError(f"{where}: author: must name who ranked")
    out["author"] = author.strip()
    try:
        out["timestamp"] = _timestamp(record.get("timestamp"))
    except ValueError as exc:
        raise RankingsError(f"{where}: timestamp: {exc}") from None
    for name in ("note", "source"):
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise RankingsError(f"{where}: {name}: must be text")
        out[name] = value or ""
    unknown = sorted(set(record) - set(RANKING_FIELDS))
    if unknown:
        raise RankingsError(f"{where}: {unknown[0]}: unknown field; fields are {RANKING_FIELDS}")
    return out


def parse_rankings_text(text: str, source: str) -> list[tuple[int, dict]]:
    """(line, canonical record) for each non-blank line of a rankings file's text."""
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RankingsError(f"{source}:{line_no}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        records.append((line_no, validate_record(raw, f"{source}:{line_no}")))
    return records


def empty_rankings() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in [*RANKING_FIELDS, "source_file", "source_line"]})


def read_rankings(path: str | Path) -> pd.DataFrame:
    """Every judgement in a rankings file (validated); a missing file holds none."""
    path = Path(path)
    if not path.exists():
        return empty_rankings()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RankingsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records = parse_rankings_text(text, str(path))
    if not records:
        return empty_rankings()
    return pd.DataFrame([r | {"source_file": str(path), "source_line": line} for line, r in records])


def _line(record: dict) -> str:
    return json.dumps({k: record[k] for k in RANKING_FIELDS}, ensure_ascii=False)


def append_rankings(path: str | Path, records: list[dict]) -> list[dict]:
    """Append judgements atomically under the file's lock; returns them as written.

    The whole new content is validated before it replaces the file, so a bad record (or an earlier
    hand edit that broke the file) fails here, naming the line, and the file keeps its old content.
    """
    path = Path(path)
    canonical = [validate_record(r, f"{path}:<new record {i + 1}>") for i, r in enumerate(records)]
    with atomic.locked(path):
        existing = path.read_text(encoding="utf-8") if path.exists() else ""
        if existing and not existing.endswith("\n"):
            existing += "\n"
        text = existing + "".join(_line(r) + "\n" for r in canonical)
        parse_rankings_text(text, str(path))
        atomic.write_text(path, text)
    return canonical


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_candidates(path: str | Path) -> pd.DataFrame:
    """A candidates table (Parquet, JSONL or CSV) with at least prompt_id, candidate_id, prompt, response."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no candidates yet; generate them first (or pass --candidates FILE)")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    elif suffix in (".jsonl", ".ndjson"):
        df = pd.read_json(path, lines=True, dtype=False)
    elif suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    else:
        raise RankingsError(f"{path}: format: cannot tell the format from the extension (.parquet, .jsonl or .csv)")
    missing = [c for c in REQUIRED_CANDIDATE_COLUMNS if c not in df.columns]
    if missing:
        raise RankingsError(f"{path}:1: {missing[0]}: column not found; a candidates table needs {REQUIRED_CANDIDATE_COLUMNS}")
    repeated = df["candidate_id"][df["candidate_id"].duplicated()]
    if len(repeated):
        line = int(repeated.index[0]) + (2 if suffix == ".csv" else 1)
        raise RankingsError(f"{path}:{line}: candidate_id: {repeated.iloc[0]!r} appears more than once")
    for column in ("prompt_id", "candidate_id"):
        df[column] = df[column].astype(str)
    return df


def candidates_by_prompt(candidates: pd.DataFrame) -> dict[str, list[str]]:
    return {str(k): list(map(str, v)) for k, v in candidates.groupby("prompt_id", sort=False)["candidate_id"]}


def check_against_candidates(record: dict, by_prompt: dict[str, list[str]], where: str) -> None:
    """The judgement names only candidates of its prompt, and a full ranking names all of them."""
    known = by_prompt.get(record["prompt_id"])
    if known is None:
        raise RankingsError(f"{where}: prompt_id: {record['prompt_id']!r} has no candidates")
    named = [i for tier in record["ranking"] for i in tier]
    foreign = [i for i in named if i not in known]
    if foreign:
        raise RankingsError(f"{where}: ranking: {foreign} are not candidates of prompt {record['prompt_id']}")
    if record["kind"] == "full" and len(named) != len(known):
        missing = [i for i in known if i not in named]
        raise RankingsError(f"{where}: ranking: a full ranking orders all {len(known)} candidates; missing {missing}")


def _import_record(raw: dict) -> dict:
    """A row made elsewhere -> a ranking record (`best`/`worst` columns become a best_worst judgement)."""
    raw = {k: (None if isinstance(v, str) and not v.strip() else v) for k, v in raw.items()}
    if raw.get("ranking") is None and (raw.get("best") is not None or raw.get("worst") is not None):
        raw = {**raw, "kind": raw.get("kind") or "best_worst", "ranking": [[raw.get("best") or ""], [raw.get("worst") or ""]]}
    return {k: v for k, v in raw.items() if k in RANKING_FIELDS}  # other columns (e.g. the prompt text) are ignored


def import_rankings(path: str | Path, candidates: pd.DataFrame, author: str | None = None,
                    timestamp: str | None = None) -> list[dict]:
    """Rankings from a CSV or JSONL file made elsewhere, validated against the candidates.

    `author` fills rows without one; `timestamp` (default: now) rows without one. Raises
    RankingsError listing every bad row (file:line:field) when any row is bad; nothing is returned
    half. The caller appends the result with `append_rankings`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise RankingsError(f"{path}: format: import takes .csv or .jsonl rankings")
    rows = _iter_csv(path) if suffix == ".csv" else _iter_jsonl(path)
    by_prompt = candidates_by_prompt(candidates)
    when = timestamp or now_utc()
    records, problems = [], []
    for line_no, raw, problem in rows:
        where = f"{path}:{line_no}"
        if problem is not None:
            problems.append(f"{where}: record: {problem}")
            continue
        if not isinstance(raw, dict):
            problems.append(f"{where}: record: a ranking must be an object")
            continue
        raw = _import_record(raw)
        raw.setdefault("author", None)
        raw["author"] = raw["author"] or author
        raw["timestamp"] = raw.get("timestamp") or when
        raw["source"] = raw.get("source") or f"import:{path.name}"
        try:
            record = validate_record(raw, where)
            check_against_candidates(record, by_prompt, where)
        except RankingsError as exc:
            problems.append(str(exc))
            continue
        records.append(record)
    if problems:
        shown = "\n  ".join(problems[:ERRORS_SHOWN])
        more = f"\n  ... and {len(problems) - ERRORS_SHOWN} more" if len(problems) > ERRORS_SHOWN else ""
        raise RankingsError(f"{len(problems)} bad row(s) in {path}; nothing imported:\n  {shown}{more}")
    if not records:
        raise RankingsError(f"{path}: no rankings in the file")
    return records


def ranking_queue(candidates: pd.DataFrame, rankings: pd.DataFrame, author: str | None = None,
                  rankings_per_prompt: int = 1) -> pd.DataFrame:
    """The candidates of every prompt still to rank, in a stable order.

    A prompt leaves the queue once `rankings_per_prompt` different people ranked it; `author` never
    sees a prompt they ranked already. Prompts come in prompt_id order (a content hash: a fixed
    shuffle that spreads a labelling session over the data and that new prompts never reorder),
    candidates in candidate_id order within a prompt.
    """
    ranked = rankings.groupby("prompt_id")["author"].nunique() if len(rankings) else pd.Series(dtype=int)
    done = set(ranked[ranked >= rankings_per_prompt].index)
    if author is not None and len(rankings):
        done |= set(rankings.loc[rankings["author"] == author, "prompt_id"])
    queue = candidates[~candidates["prompt_id"].isin(done)]
    return queue.sort_values(["prompt_id", "candidate_id"], kind="stable").reset_index(drop=True)
