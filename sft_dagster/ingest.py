"""Read a spec's sources (JSONL, CSV, Parquet; files or globs) into canonical examples.

Rows that cannot be used go to the quarantine with their reason; a file that cannot be used at all
(unreadable, undecodable, a mapped column absent) fails with an `IngestError` naming file, line and
field. rows read = rows returned + rows quarantined, per file, always.

Text files are read in `sources[].encoding` (default UTF-8); a UTF-8 byte-order mark is dropped. A file
without rows (empty, blank lines only, a CSV header alone) is skipped with a warning, since a glob of
daily exports may hold a day without data; when every file of every source is empty, ingest fails.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from .schema import EXAMPLE_COLUMNS, QUARANTINE_COLUMNS, column_or_none, content_hash
from .spec import PipelineSpec, SourceSpec

REQUIRED = ("prompt", "response")
_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class IngestError(ValueError):
    """A source file that cannot be used; the message names file, line and field."""


def source_files(spec: PipelineSpec, source: SourceSpec) -> list[Path]:
    pattern = str(spec.resolve(source.path).resolve())
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        where = f"{spec.spec_path}: " if spec.spec_path else ""
        raise IngestError(f"{where}sources.path: no file matches {source.path!r} (resolved to {pattern})")
    return files


def _format_of(path: Path, source: SourceSpec) -> str:
    if source.format:
        return source.format
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise IngestError(f"{path}: format: cannot tell the format from the extension; set sources.format")
    return fmt


_UTF8 = {"utf-8", "utf8", "utf_8", "u8", "utf-8-sig", "utf_8_sig"}
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _decode(path: Path, encoding: str) -> str:
    """A text file's content in `encoding`; a UTF-8 byte-order mark (Excel, Notepad) is dropped.

    An undecodable byte fails the file, naming its line and byte and the spec key that fixes it.
    """
    data = path.read_bytes()
    utf8 = encoding.lower() in _UTF8
    if utf8 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8" if utf8 else encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        hint = ("the file starts with a UTF-16 byte-order mark: set sources[].encoding: utf-16"
                if utf8 and data.startswith(_UTF16_BOMS) else
                "if the file was saved in another encoding, set sources[].encoding (e.g. cp1252 or latin-1)")
        raise IngestError(f"{path}:{line}: not {'UTF-8' if utf8 else encoding} text: byte 0x{data[exc.start]:02x} at byte {column} of the "
                          f"line ({exc.reason}); {hint}") from None
    except LookupError:
        raise IngestError(f"{path}: sources[].encoding: unknown encoding {encoding!r}") from None


def _iter_jsonl(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, Any, str | None]]:
    for line_no, text in enumerate(_decode(path, encoding).split("\n"), start=1):
        text = text.removesuffix("\r").lstrip("\ufeff")  # a BOM also where exported files were concatenated
        if not text.strip():
            continue
        try:
            yield line_no, json.loads(text), None
        except json.JSONDecodeError as exc:
            yield line_no, {"_raw": text}, f"invalid JSON: {exc.msg} (column {exc.colno})"


def _csv_rows(path: Path, encoding: str = "utf-8"):
    return csv.reader(io.StringIO(_decode(path, encoding), newline=""))


def _iter_csv(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, Any, str | None]]:
    try:
        reader = _csv_rows(path, encoding)
        header = next(reader, None)
        if header is None:
            return
        line_no = reader.line_num
        for row in reader:
            start, line_no = line_no + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield start, {"_raw": ",".join(row)}, f"expected {len(header)} fields, found {len(row)}"
                continue
            yield start, dict(zip(header, row)), None
    except csv.Error as exc:
        raise IngestError(f"{path}: not valid CSV: {exc}") from None


def _csv_header(path: Path, encoding: str = "utf-8") -> list[str]:
    return next(_csv_rows(path, encoding), [])


def _iter_parquet(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, Any, str | None]]:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise IngestError(f"{path}: not a readable Parquet file: {exc}") from None
    for row_no, row in enumerate(table.to_pylist(), start=1):
        yield row_no, row, None


_READERS = {"jsonl": _iter_jsonl, "csv": _iter_csv, "parquet": _iter_parquet}


def _text_lines(path: Path, encoding: str) -> list[str]:
    """A plain-text file's lines (a final newline ends the last line; it does not start another)."""
    text = _decode(path, encoding)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _iter_parallel(path: Path, target: Path, encoding: str = "utf-8") -> Iterator[tuple[int, Any, str | None]]:
    """Line N of `path` and line N of `target` as one record {prompt, response}.

    Unequal line counts fail the pair of files: one missing or extra line misaligns every line after it,
    so no row of such a pair can be trusted. A line blank on one side is that row's problem (quarantined).
    """
    prompts, responses = _text_lines(path, encoding), _text_lines(target, encoding)
    if len(prompts) != len(responses):
        raise IngestError(f"{path}: target: {target} has {len(responses)} lines, {path.name} has {len(prompts)}; "
                          "a parallel pair must be line-aligned (a missing or extra line shifts every line after it)")
    for line_no, (prompt, response) in enumerate(zip(prompts, responses), start=1):
        if not prompt.strip() and not response.strip():
            continue
        record = {"prompt": prompt, "response": response}
        empty = [f"line {line_no} of {p.name} is blank" for p, t in ((path, prompt), (target, response)) if not t.strip()]
        yield line_no, record, ("; ".join(empty) or None)


def _as_text(value: Any, field: str) -> tuple[str | None, str | None]:
    """(text, problem): scalars become text; containers and nulls are problems."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None, f"{field} is missing"
    if isinstance(value, (dict, list, tuple)):
        return None, f"{field} is a {type(value).__name__}, not text"
    if isinstance(value, bool):
        return str(value).lower(), None
    return str(value), None


def _from_messages(messages: Any) -> tuple[dict[str, str | None], str | None]:
    """A chat `messages` list -> system, history (earlier turns, JSON), prompt (last user turn), response."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            return {}, f"messages is not valid JSON: {exc.msg}"
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return {}, "messages is not a list of {role, content} objects"
    roles = [m.get("role") for m in messages]
    system, offset = None, 0
    if roles and roles[0] == "system":
        offset = 1
        system = messages[0].get("content")
        messages, roles = messages[1:], roles[1:]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
        return {}, f"messages must be [system?, user, assistant, (user, assistant)...], got roles {roles}"
    for i, m in enumerate(messages[:-2]):
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return {}, f"messages[{i + offset}].content is empty or not text"
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:-2]]
    return {"system": system, "history": json.dumps(history, ensure_ascii=False) if history else None,
            "prompt": messages[-2].get("content"), "response": messages[-1].get("content")}, None


def _canonical(record: Any, source: SourceSpec) -> tuple[dict[str, Any], str | None]:
    """Map one source record to canonical fields; returns (fields, problem)."""
    if not isinstance(record, dict):
        return {}, f"record is a {type(record).__name__}, not an object"
    mapping = {"prompt": "prompt", "response": "response", "system": "system"} | dict(source.columns)
    used = set(mapping.values())
    fields: dict[str, Any] = {}
    if "messages" in source.columns:
        parsed, problem = _from_messages(record.get(source.columns["messages"]))
        if problem:
            return {}, problem
        fields.update(parsed)
    else:
        for name in ("prompt", "response", "system"):
            fields[name] = record.get(mapping[name])
        fields["history"] = None
    for name in ("prompt", "response", "system"):
        if name == "system" and fields.get(name) is None:
            continue
        text, problem = _as_text(fields.get(name), mapping.get(name, name))
        if problem:
            return {}, problem
        fields[name] = text
    extra = {k: v for k, v in record.items() if k not in used}
    fields["metadata"] = json.dumps(extra, default=str, ensure_ascii=False, sort_keys=True)
    return fields, None


def _check_columns(path: Path, fmt: str, source: SourceSpec, records: list[tuple[int, Any, str | None]]) -> None:
    """A mapped column that appears nowhere in a file is a file-level error, not row problems."""
    if "messages" in source.columns:
        wanted = {"messages": source.columns["messages"]}
    else:
        wanted = {k: source.columns.get(k, k) for k in REQUIRED}
    if fmt == "csv":
        header = _csv_header(path, source.encoding)
        present = set(header)
        line = 1
    else:
        objects = [r for _, r, p in records if p is None and isinstance(r, dict)]
        if not objects and fmt == "jsonl":
            return  # no line parsed as an object: each is quarantined with its own reason
        present = set().union(*(r.keys() for r in objects))
        line = records[0][0]
        if fmt == "parquet":
            present |= set(pq.read_schema(path).names)
    for canonical, column in wanted.items():
        if column not in present:
            raise IngestError(
                f"{path}:{line}: {column}: column not found (needed for {canonical}); "
                f"columns present: {sorted(present)}. Map it with sources[].columns.{canonical}"
            )


def read_source_file(path: Path, source: SourceSpec, target: Path | None = None) -> tuple[list[dict], list[dict]]:
    """One file -> (canonical rows, quarantined rows); a file without rows gives two empty lists.
    target: the resolved target-side file of a `format: parallel` source."""
    fmt = _format_of(path, source)
    if fmt == "parallel":
        if target is None or not target.is_file():
            raise IngestError(f"{path}: target: no such file {target} (the line-aligned responses of format: parallel)")
        records = list(_iter_parallel(path, target, source.encoding))
    else:
        records = list(_READERS[fmt](path, source.encoding))
    if not records:
        return [], []
    if fmt != "parallel":
        _check_columns(path, fmt, source, records)
    kept, quarantined = [], []
    for line_no, record, problem in records:
        fields = {}
        if problem is None:
            fields, problem = _canonical(record, source)
        if problem is None:
            kept.append(fields | {"source_file": str(path), "source_line": line_no})
        else:
            quarantined.append(
                {
                    "example_id": None,
                    "stage": "ingest",
                    "reason": problem,
                    "source_file": str(path),
                    "source_line": line_no,
                    "record": json.dumps(record, default=str, ensure_ascii=False),
                }
            )
    return kept, quarantined


def assign_example_ids(df: pd.DataFrame) -> pd.DataFrame:
    """Stable ids from content; the N-th repeat of identical content gets "~N" appended."""
    histories = column_or_none(df, "history")
    # History joins the hash only when present, so single-exchange ids stay what they always were.
    hashes = [content_hash(s, p, r) if not isinstance(h, str) else content_hash(s, p, r, h)
              for s, p, r, h in zip(df["system"], df["prompt"], df["response"], histories)]
    df = df.assign(content_hash=pd.Series(hashes, index=df.index, dtype="object"))
    repeat = df.groupby("content_hash").cumcount()
    df["example_id"] = df["content_hash"].where(repeat == 0, df["content_hash"] + "~" + repeat.astype(str))
    return df


def ingest(spec: PipelineSpec) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """All of a spec's sources -> (examples, quarantine, stats)."""
    kept: list[dict] = []
    quarantined: list[dict] = []
    per_file: dict[str, dict[str, int]] = {}
    warnings: list[str] = []
    for source in spec.sources:
        files = source_files(spec, source)
        target = spec.resolve(source.target).resolve() if source.target else None
        if target is not None and len(files) != 1:
            raise IngestError(f"{spec.spec_path or '<spec>'}: sources.path: format: parallel reads one file and its "
                              f"target; {source.path!r} matches {len(files)} files")
        for path in files:
            rows, bad = read_source_file(path, source, target)
            kept.extend(rows)
            quarantined.extend(bad)
            per_file[str(path)] = {"rows_read": len(rows) + len(bad), "kept": len(rows), "quarantined": len(bad)}
            if not rows and not bad:
                warnings.append(f"{path}: the file has no rows (skipped)")
    if not kept and not quarantined:
        where = f"{spec.spec_path}: " if spec.spec_path else ""
        raise IngestError(f"{where}sources: no rows in any source file; every file is empty: {sorted(per_file)}")
    examples = pd.DataFrame(kept, columns=[c for c in EXAMPLE_COLUMNS if c not in ("example_id", "content_hash")])
    examples["system"] = examples["system"].astype("object")
    examples["history"] = examples["history"].astype("object")
    examples = assign_example_ids(examples)[EXAMPLE_COLUMNS]
    for col in ("example_id", "content_hash", "prompt", "response", "system", "history", "source_file", "metadata"):
        examples[col] = examples[col].astype("string")
    examples["source_line"] = examples["source_line"].astype("int64")
    quarantine = pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS)
    stats = {
        "rows_read": len(examples) + len(quarantine),
        "rows_kept": len(examples),
        "rows_quarantined": len(quarantine),
        "files": per_file,
        "warnings": warnings,
    }
    return examples, quarantine, stats


PROMPT_COLUMNS = ["prompt", "system", "metadata", "source_file", "source_line"]


def read_prompts(spec: PipelineSpec, sources) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Prompt files (`preference.prompts`: path, format, encoding, columns prompt/system) -> (prompts,
    quarantine, stats), read like the spec's sources: a missing file or column fails naming file, line and
    column; a row without a text prompt is quarantined with its reason; rows read = kept + quarantined.
    Other fields of a row are kept as JSON in `metadata`."""
    kept: list[dict] = []
    bad: list[dict] = []
    for source in sources:
        mapping = {"prompt": "prompt", "system": "system"} | dict(source.columns)
        for path in source_files(spec, source):
            fmt = _format_of(path, source)
            records = list(_READERS[fmt](path, source.encoding))
            objects = [r for _, r, p in records if p is None and isinstance(r, dict)]
            present = set(_csv_header(path, source.encoding)) if fmt == "csv" else set().union(*(r.keys() for r in objects))
            if records and (objects or fmt != "jsonl") and mapping["prompt"] not in present:
                raise IngestError(f"{path}:{records[0][0]}: {mapping['prompt']}: column not found (needed for prompt); "
                                  f"columns present: {sorted(present)}. Map it with preference.prompts[].columns.prompt")
            for line_no, record, problem in records:
                fields: dict[str, Any] = {}
                if problem is None and not isinstance(record, dict):
                    problem = f"record is a {type(record).__name__}, not an object"
                if problem is None:
                    fields["prompt"], problem = _as_text(record.get(mapping["prompt"]), mapping["prompt"])
                if problem is None and not fields["prompt"].strip():
                    problem = f"{mapping['prompt']} is empty"
                if problem is None:
                    system = record.get(mapping["system"])
                    fields["system"] = None if system is None or (isinstance(system, float) and pd.isna(system)) else str(system)
                    extra = {k: v for k, v in record.items() if k not in set(mapping.values())}
                    fields["metadata"] = json.dumps(extra, default=str, ensure_ascii=False, sort_keys=True)
                    kept.append(fields | {"source_file": str(path), "source_line": line_no})
                else:
                    bad.append({"example_id": None, "stage": "prompts", "reason": problem, "source_file": str(path),
                                "source_line": line_no, "record": json.dumps(record, default=str, ensure_ascii=False)})
    prompts = pd.DataFrame(kept, columns=PROMPT_COLUMNS)
    prompts["system"] = prompts["system"].astype("object")
    quarantine = pd.DataFrame(bad, columns=QUARANTINE_COLUMNS)
    return prompts, quarantine, {"rows_read": len(prompts) + len(quarantine), "rows_kept": len(prompts),
                                 "rows_quarantined": len(quarantine)}
