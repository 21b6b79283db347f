"""Preference pairs (prompt, chosen, rejected) from rankings or imported data sets, and their gates.

A ranking expands into every pair it orders: a full ranking of K candidates gives K(K-1)/2 pairs
(pairs within a tier are ties), a best/worst judgement gives one. An imported data set is JSONL or
CSV with prompt/chosen/rejected text, or chat-style `chosen`/`rejected` message lists (full
conversations that differ only in the last reply, or completions after a `prompt` message list).
Like ingest: a file that cannot be read fails naming file and line; a row that cannot be used goes to
the quarantine with its reason; rows in = pairs kept + rows quarantined.

Checks are pure functions returning `quality.checks.CheckOutcome`; the caller decides which block
(`config.PairGatesConfig`). Row gates (identical or empty sides, ties, over-length, duplicates,
split leakage) name their failing pairs, which `curate_pairs` quarantines; report gates
(inconsistent rankings, length bias, ranker agreement) measure the data and remove nothing.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pandas as pd

from ..ingest import IngestError, _as_text, _csv_header, _from_messages, _iter_csv, _iter_jsonl
from ..quality.check_registry import FAILING_ROWS_SHOWN, CheckDef, CheckOutcome, CheckRegistry
from ..quality.sft_checks import SFT_CHECKS, run_sft_check
from ..quality.suite import CheckEntry
from ..schema import QUARANTINE_COLUMNS, quarantine_rows
from ..spec import SplitSpec, TaskSpec
from ..splits import assign_splits, normalized_text
from .columns import PAIR_COLUMNS, pair_id_of, prompt_id_of
from ..spec.preference import AgreementGate, InconsistencyGate, LengthBiasGate, PairGatesConfig, RowGate
from .rankings import RankingsError, candidates_by_prompt, check_against_candidates

# Every pair gate, registered below with its description and its gate's config model. Row gates
# (a `RowGate`: identical or empty sides, ties, over-length, duplicates, split leakage) name failing
# pairs, which `curate_pairs` quarantines; the other gates measure the data and remove nothing.
PAIR_CHECKS = CheckRegistry("pair gate")


def row_gates() -> list[str]:
    return [name for name in PAIR_CHECKS.names() if PAIR_CHECKS[name].args is RowGate]


def pair_check_defs(gates: PairGatesConfig) -> list[CheckDef]:
    """Every pair gate as its asset check declares it, blocking as `gates` says."""
    return PAIR_CHECKS.definitions(lambda name: getattr(gates, name).blocking)


def _unique_ids(ids: list[str]) -> list[str]:
    """The N-th repeat of an id gets "~N" appended (as example ids do)."""
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        n = seen.get(i, 0)
        seen[i] = n + 1
        out.append(i if n == 0 else f"{i}~{n}")
    return out


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    df["pair_id"] = _unique_ids(df["pair_id"].astype(str).tolist())
    df["tie"] = df["tie"].astype(bool)
    for column in ("system", "history", "author", "split", "chosen_id", "rejected_id"):
        df[column] = df[column].astype("object").where(df[column].notna(), None)
    return df


def _quarantine(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)


def pairs_from_rankings(rankings: pd.DataFrame, candidates: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Expand rankings (`rankings.read_rankings`) into pairs -> (pairs, quarantined rankings, stats).

    A ranking naming a prompt or candidate that is not in `candidates` (e.g. regenerated since) is
    quarantined with the reason; rankings in = rankings expanded + rankings quarantined.
    """
    by_prompt = candidates_by_prompt(candidates)
    lookup = candidates.drop_duplicates("candidate_id").set_index("candidate_id")
    rows, bad = [], []
    for record in rankings.to_dict("records"):
        where = f"{record.get('source_file')}:{record.get('source_line')}"
        try:
            check_against_candidates(record, by_prompt, where)
        except RankingsError as exc:
            bad.append({"example_id": record["prompt_id"], "stage": "pairs", "reason": str(exc).split(": ", 1)[1],
                        "source_file": record.get("source_file"), "source_line": record.get("source_line"),
                        "record": json.dumps({k: record.get(k) for k in ("prompt_id", "kind", "ranking", "author",
                                                                         "timestamp", "note")}, default=str)})
            continue
        tiers = record["ranking"]
        ordered = [(a, b, False) for i, j in combinations(range(len(tiers)), 2) for a in tiers[i] for b in tiers[j]]
        tied = [(a, b, True) for tier in tiers for a, b in combinations(tier, 2)]
        for chosen_id, rejected_id, tie in ordered + tied:
            chosen, rejected = lookup.loc[chosen_id], lookup.loc[rejected_id]
            rows.append({
                "pair_id": pair_id_of(record["prompt_id"], str(chosen["response"]), str(rejected["response"]),
                                      record["author"], "ranking"),
                "prompt_id": record["prompt_id"], "prompt": str(chosen["prompt"]),
                "system": chosen.get("system"), "history": chosen.get("history"),
                "chosen": str(chosen["response"]), "rejected": str(rejected["response"]),
                "chosen_id": chosen_id, "rejected_id": rejected_id, "tie": tie, "author": record["author"],
                "origin": "ranking", "split": None, "source_file": record.get("source_file"),
                "source_line": record.get("source_line"),
            })
    pairs = _frame(rows)
    stats = {"rankings_in": len(rankings), "rankings_expanded": len(rankings) - len(bad),
             "rankings_quarantined": len(bad), "pairs": len(pairs), "tied_pairs": int(pairs["tie"].sum())}
    return pairs, _quarantine(bad), stats


def _side(prompt, reply) -> tuple[dict, str | None]:
    """One side of an imported pair -> system, history, prompt, response (through ingest's chat parser)."""
    if isinstance(reply, list):
        if isinstance(prompt, list):
            messages = prompt + reply
        elif isinstance(prompt, str) and reply and isinstance(reply[0], dict) and reply[0].get("role") == "assistant":
            messages = [{"role": "user", "content": prompt}] + reply
        else:
            messages = reply
        return _from_messages(messages)
    if isinstance(prompt, list):
        return _from_messages(prompt + [{"role": "assistant", "content": reply}])
    return {"system": None, "history": None, "prompt": prompt, "response": reply}, None


def _truthy(value) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    return None


def _imported_pair(record, columns: dict[str, str]) -> tuple[dict, str | None]:
    if not isinstance(record, dict):
        return {}, f"record is a {type(record).__name__}, not an object"
    col = {k: columns.get(k, k) for k in ("prompt", "chosen", "rejected", "system", "author", "split", "tie",
                                          "score_chosen", "score_rejected")}
    prompt = record.get(col["prompt"])
    sides = {}
    for name in ("chosen", "rejected"):
        fields, problem = _side(prompt, record.get(col[name]))
        if problem:
            return {}, f"{name}: {problem}"
        sides[name] = fields
    for key in ("system", "history", "prompt"):
        if sides["chosen"].get(key) != sides["rejected"].get(key):
            return {}, f"chosen and rejected differ before the last reply ({key})"
    out = {}
    for name, value in (("prompt", sides["chosen"]["prompt"]), ("chosen", sides["chosen"]["response"]),
                        ("rejected", sides["rejected"]["response"])):
        text, problem = _as_text(value, col[name])
        if problem:
            return {}, problem
        out[name] = text
    system = sides["chosen"].get("system") or record.get(col["system"])
    if system is not None and not isinstance(system, str):
        return {}, f"{col['system']} is a {type(system).__name__}, not text"
    split = record.get(col["split"])
    if split is not None and split not in ("train", "validation", "test", ""):
        return {}, f"{col['split']} is {split!r}, not train, validation or test"
    tie = False
    if record.get(col["tie"]) is not None:
        tie = _truthy(record[col["tie"]])
        if tie is None:
            return {}, f"{col['tie']} is {record[col['tie']]!r}, not true or false"
    elif record.get(col["score_chosen"]) is not None and record.get(col["score_rejected"]) is not None:
        try:
            tie = float(record[col["score_chosen"]]) == float(record[col["score_rejected"]])
        except (TypeError, ValueError):
            return {}, f"{col['score_chosen']}/{col['score_rejected']} are not numbers"
    author = record.get(col["author"])
    return {**out, "system": system or None, "history": sides["chosen"].get("history"), "tie": bool(tie),
            "author": str(author) if author not in (None, "") else None, "split": split or None}, None


def read_preference_file(path: str | Path, columns: dict[str, str] | None = None,
                         fmt: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """An imported preference data set -> (pairs, quarantine, stats); rows read = kept + quarantined."""
    path = Path(path)
    fmt = fmt or {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}.get(path.suffix.lower())
    if fmt not in ("jsonl", "csv"):
        raise IngestError(f"{path}: format: preference data must be .jsonl or .csv (or set the format)")
    if not path.exists():
        raise IngestError(f"{path}: no such file")
    columns = dict(columns or {})
    records = list(_iter_jsonl(path) if fmt == "jsonl" else _iter_csv(path))
    present = set().union(*(r.keys() for _, r, p in records if p is None and isinstance(r, dict))) if records else set()
    if fmt == "csv":
        present |= set(_csv_header(path))
    for needed in ("chosen", "rejected"):
        if columns.get(needed, needed) not in present:
            raise IngestError(f"{path}:{records[0][0] if records else 1}: {columns.get(needed, needed)}: column not "
                              f"found (needed for {needed}); columns present: {sorted(present)}")
    rows, bad = [], []
    for line_no, record, problem in records:
        fields = {}
        if problem is None:
            fields, problem = _imported_pair(record, columns)
        if problem is not None:
            bad.append({"example_id": None, "stage": "preference_ingest", "reason": problem, "source_file": str(path),
                        "source_line": line_no, "record": json.dumps(record, default=str, ensure_ascii=False)})
            continue
        pid = prompt_id_of(fields["prompt"], fields["system"], fields["history"])
        rows.append(fields | {"pair_id": pair_id_of(pid, fields["chosen"], fields["rejected"], fields["author"], "import"),
                              "prompt_id": pid, "chosen_id": None, "rejected_id": None, "origin": "import",
                              "source_file": str(path), "source_line": line_no})
    pairs = _frame(rows)
    stats = {"rows_read": len(records), "rows_kept": len(pairs), "rows_quarantined": len(bad)}
    return pairs, _quarantine(bad), stats


# ----------------------------------------------------------------------------------------------- checks


def _outcome(name: str, gate, pairs: pd.DataFrame, failing: pd.Series, extra: dict | None = None,
             passed: bool | None = None) -> CheckOutcome:
    n_fail = int(failing.sum())
    rate = n_fail / max(1, len(pairs))
    shown = [c for c in ("pair_id", "prompt", "chosen", "rejected", "author", "source_file", "source_line") if c in pairs]
    metadata = {"failing_rows": n_fail, "failing_rate": round(rate, 6), "pairs": len(pairs)}
    if isinstance(gate, RowGate):
        metadata["max_rate"] = gate.max_rate
        passed = rate <= gate.max_rate + 1e-12 if passed is None else passed
    return CheckOutcome(name=name, passed=bool(passed), blocking=gate.blocking,
                        description=PAIR_CHECKS.description(name),
                        metadata=metadata | (extra or {}), failing_ids=pairs.loc[failing, "pair_id"].astype(str).tolist(),
                        failing_rows=pairs.loc[failing, shown].head(FAILING_ROWS_SHOWN))


@PAIR_CHECKS.register("identical_sides", "chosen and rejected differ (after trimming whitespace)", RowGate)
def check_identical_sides(pairs: pd.DataFrame, gate: RowGate) -> CheckOutcome:
    chosen, rejected = pairs["chosen"].astype(str).str.strip(), pairs["rejected"].astype(str).str.strip()
    near = (normalized_text(pairs["chosen"]) == normalized_text(pairs["rejected"])) & (chosen != rejected)
    return _outcome("identical_sides", gate, pairs, chosen == rejected,
                    {"equal_up_to_case_and_punctuation": int(near.sum())})


@PAIR_CHECKS.register("empty_sides", "neither side is empty or whitespace only", RowGate)
def check_empty_sides(pairs: pd.DataFrame, gate: RowGate) -> CheckOutcome:
    empty = pairs["chosen"].astype(str).str.strip().eq("") | pairs["rejected"].astype(str).str.strip().eq("")
    empty |= pairs["prompt"].astype(str).str.strip().eq("")
    return _outcome("empty_sides", gate, pairs, empty)


@PAIR_CHECKS.register("ties", "the pair states a preference (not a tie)", RowGate)
def check_ties(pairs: pd.DataFrame, gate: RowGate) -> CheckOutcome:
    return _outcome("ties", gate, pairs, pairs["tie"].astype(bool))


def pair_token_lengths(pairs: pd.DataFrame, tokenizer, task: TaskSpec) -> pd.DataFrame:
    """Tokens of the whole conversation with each side (exact, in the training template): pair_id,
    n_tokens_chosen, n_tokens_rejected."""
    from ..formatting import token_lengths

    lengths = {}
    for side in ("chosen", "rejected"):
        frame = pd.DataFrame({"example_id": pairs["pair_id"], "prompt": pairs["prompt"], "response": pairs[side],
                              "system": pairs["system"], "history": pairs["history"]})
        lengths[side] = token_lengths(tokenizer, frame, task)["n_tokens"].to_numpy()
    return pd.DataFrame({"pair_id": pairs["pair_id"].to_numpy(), "n_tokens_chosen": lengths["chosen"],
                         "n_tokens_rejected": lengths["rejected"]})


@PAIR_CHECKS.register("over_length", "prompt + each side fit the training max_length in the base model's tokenizer "
                                     "(never truncated)", RowGate)
def check_over_length(pairs: pd.DataFrame, gate: RowGate, tokenizer, task: TaskSpec, max_length: int) -> CheckOutcome:
    lengths = pair_token_lengths(pairs, tokenizer, task)
    longest = lengths[["n_tokens_chosen", "n_tokens_rejected"]].max(axis=1)
    failing = pd.Series((longest > max_length).to_numpy(), index=pairs.index)
    shown = pairs.assign(n_tokens=longest.to_numpy())
    outcome = _outcome("over_length", gate, shown, failing,
                       {"max_length": max_length, "longest": int(longest.max()) if len(longest) else 0})
    return outcome


@PAIR_CHECKS.register("duplicates", "no pair repeats an earlier one (same prompt, chosen and rejected)", RowGate)
def check_duplicate_pairs(pairs: pd.DataFrame, gate: RowGate) -> CheckOutcome:
    """A pair repeating an earlier one's prompt, chosen and rejected text (by anyone); the first stays."""
    key = pairs["prompt_id"].astype(str) + "\x1f" + pairs["chosen"].astype(str) + "\x1f" + pairs["rejected"].astype(str)
    return _outcome("duplicates", gate, pairs, key.duplicated(keep="first"))


def assign_pair_splits(pairs: pd.DataFrame, cfg: SplitSpec) -> pd.DataFrame:
    """`pairs` with `split` set: a source's own split where it gives one, else `splits.assign_splits`
    on the prompt (every pair of a prompt lands in the same split)."""
    assigned = assign_splits(pairs, cfg)["split"]
    given = pairs["split"].astype("string") if "split" in pairs else pd.Series(pd.NA, index=pairs.index, dtype="string")
    return pairs.assign(split=given.fillna(assigned))


@PAIR_CHECKS.register("split_leakage", SFT_CHECKS.description("split_leakage"), RowGate)
def check_split_leakage(pairs: pd.DataFrame, gate: RowGate, task: TaskSpec) -> CheckOutcome:
    """The SFT split_leakage check (`quality.checks`) on the pairs' prompts: a validation/test prompt
    whose normalised text is also in an earlier split."""
    entry = CheckEntry(name="split_leakage", sft_check="split_leakage", blocking=gate.blocking)
    frame = pairs.rename(columns={"pair_id": "example_id"}).reset_index(drop=True)
    sft = run_sft_check(entry, frame, task, None, None)
    failing = pairs["pair_id"].isin(set(sft.failing_ids))
    extra = {k: v for k, v in sft.metadata.items() if k not in ("failing_rows", "failing_rate", "mostly")}
    passed = (failing.mean() if len(pairs) else 0.0) <= gate.max_rate + 1e-12 and sft.metadata.get("rows_without_split", 0) == 0
    return _outcome("split_leakage", gate, pairs, failing, extra, passed=passed and sft.metadata.get("evaluated", False))


def _judgements(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per pair with an author: an order-free key of the two replies and the vote (+1: the
    key's first reply wins, -1: the second, 0: tie)."""
    judged = pairs[pairs["author"].notna()]
    first_is_chosen = judged["chosen"].astype(str) <= judged["rejected"].astype(str)
    low = judged["chosen"].where(first_is_chosen, judged["rejected"]).astype(str)
    high = judged["rejected"].where(first_is_chosen, judged["chosen"]).astype(str)
    vote = first_is_chosen.map({True: 1, False: -1}).where(~judged["tie"].astype(bool), 0)
    return pd.DataFrame({"pair_id": judged["pair_id"], "author": judged["author"].astype(str),
                         "key": judged["prompt_id"].astype(str) + "\x1f" + low + "\x1f" + high, "vote": vote})


@PAIR_CHECKS.register("inconsistent_rankings", "a person's repeated judgements of the same two replies agree", InconsistencyGate)
def check_inconsistent_rankings(pairs: pd.DataFrame, gate: InconsistencyGate) -> CheckOutcome:
    """Among the two replies a person judged more than once, the share judged both ways (A>B and B>A)."""
    j = _judgements(pairs)
    strict = j[j["vote"] != 0]
    per = strict.groupby(["author", "key"])["vote"].agg(["nunique", "size"])
    repeated = per[per["size"] > 1]
    contradicted = repeated[repeated["nunique"] > 1]
    rate = len(contradicted) / len(repeated) if len(repeated) else 0.0
    bad_keys = set(contradicted.index)
    failing_ids = set(strict.loc[[(a, k) in bad_keys for a, k in zip(strict["author"], strict["key"])], "pair_id"])
    failing = pairs["pair_id"].isin(failing_ids)
    by_author = {str(a): {"repeated": int((repeated.index.get_level_values(0) == a).sum()),
                          "contradicted": int((contradicted.index.get_level_values(0) == a).sum())}
                 for a in sorted(set(repeated.index.get_level_values(0)))}
    extra = {"evaluated": bool(len(repeated)), "repeated_judgements": len(repeated),
             "contradicted": len(contradicted), "inconsistency_rate": round(rate, 6), "max_rate": gate.max_rate,
             "by_author": by_author}
    return _outcome("inconsistent_rankings", gate, pairs, failing, extra, passed=rate <= gate.max_rate + 1e-12)


@PAIR_CHECKS.register("length_bias", "the longer reply does not win too often", LengthBiasGate)
def length_bias(pairs: pd.DataFrame, gate: LengthBiasGate, tokenizer=None) -> CheckOutcome:
    """How often the longer reply is the chosen one, over non-tie pairs whose sides differ in length
    (tokens when a tokenizer is given, else characters)."""
    strict = pairs[~pairs["tie"].astype(bool)]
    unit = "tokens" if tokenizer is not None and len(strict) else "characters"

    def measure(texts: pd.Series) -> pd.Series:
        if unit == "characters":
            return texts.astype(str).str.strip().str.len()
        ids = tokenizer(texts.astype(str).tolist(), add_special_tokens=False)["input_ids"]
        return pd.Series([len(i) for i in ids], index=texts.index)

    chosen_len, rejected_len = measure(strict["chosen"]), measure(strict["rejected"])
    differ = chosen_len != rejected_len
    longer_wins = (chosen_len > rejected_len)[differ]
    n = int(differ.sum())
    rate = float(longer_wins.mean()) if n else float("nan")
    evaluated = n >= gate.min_pairs
    by_author = {}
    if "author" in strict:
        for author, wins in longer_wins.groupby(strict.loc[differ, "author"].fillna("<unknown>")):
            by_author[str(author)] = {"pairs": len(wins), "longer_win_rate": round(float(wins.mean()), 6)}
    extra = {"evaluated": evaluated, "unit": unit, "comparable_pairs": n,
             "longer_win_rate": round(rate, 6) if n else None, "max_longer_win_rate": gate.max_longer_win_rate,
             "mean_length_chosen": round(float(chosen_len.mean()), 2) if len(strict) else None,
             "mean_length_rejected": round(float(rejected_len.mean()), 2) if len(strict) else None,
             "by_author": by_author}
    passed = (not evaluated) or rate <= gate.max_longer_win_rate
    return _outcome("length_bias", gate, pairs, pd.Series(False, index=pairs.index), extra, passed=passed)


@PAIR_CHECKS.register("ranker_agreement", "people who judged the same two replies agree often enough", AgreementGate)
def ranker_agreement(pairs: pd.DataFrame, gate: AgreementGate) -> CheckOutcome:
    """Pairwise agreement: over every two people who judged the same two replies of a prompt, the share
    who gave the same verdict (same winner, or both a tie). Each person's last judgement counts."""
    j = _judgements(pairs).drop_duplicates(["author", "key"], keep="last")
    agree = total = 0
    by_pair: dict[str, list[int]] = {}
    disputed: set[str] = set()
    for key, group in j.groupby("key"):
        votes = list(zip(group["author"], group["vote"]))
        for (a, va), (b, vb) in combinations(sorted(votes), 2):
            same = int(va == vb)
            agree, total = agree + same, total + 1
            by_pair.setdefault(f"{a}|{b}", [0, 0])
            by_pair[f"{a}|{b}"][0] += same
            by_pair[f"{a}|{b}"][1] += 1
            if not same:
                disputed.add(key)
    rate = agree / total if total else None
    failing = pairs["pair_id"].isin(set(j.loc[j["key"].isin(disputed), "pair_id"]))
    extra = {"evaluated": bool(total), "compared": total, "agreement": round(rate, 6) if rate is not None else None,
             "min_agreement": gate.min_agreement, "disputed_comparisons": len(disputed),
             "by_ranker_pair": {k: {"compared": v[1], "agreement": round(v[0] / v[1], 6)} for k, v in sorted(by_pair.items())}}
    passed = rate is None or rate >= gate.min_agreement
    return _outcome("ranker_agreement", gate, pairs, failing, extra, passed=passed)


def run_pair_checks(pairs: pd.DataFrame, gates: PairGatesConfig, *, task: TaskSpec, tokenizer=None,
                    max_length: int | None = None) -> list[CheckOutcome]:
    """Every pair check, in a fixed order. `pairs` needs a `split` column (`assign_pair_splits`) for the
    leakage check; without a tokenizer the over_length check fails (it cannot be skipped silently)."""
    outcomes = [check_identical_sides(pairs, gates.identical_sides), check_empty_sides(pairs, gates.empty_sides),
                check_ties(pairs, gates.ties)]
    if tokenizer is None or max_length is None:
        outcomes.append(CheckOutcome("over_length", False, gates.over_length.blocking, PAIR_CHECKS.description("over_length"),
                                     {"error": "token lengths were not computed (no tokenizer)"}))
    else:
        outcomes.append(check_over_length(pairs, gates.over_length, tokenizer, task, max_length))
    outcomes += [check_duplicate_pairs(pairs, gates.duplicates), check_split_leakage(pairs, gates.split_leakage, task),
                 check_inconsistent_rankings(pairs, gates.inconsistent_rankings),
                 length_bias(pairs, gates.length_bias, tokenizer), ranker_agreement(pairs, gates.ranker_agreement)]
    return outcomes


def curate_pairs(pairs: pd.DataFrame, outcomes: list[CheckOutcome]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Pairs training may use, and the quarantine: a pair failing a row gate (`row_gates`) goes, with the
    first such check as its reason; report gates remove nothing. rows in = kept + quarantined."""
    reason = pd.Series(pd.NA, index=pairs.index, dtype="string")
    row_level = set(row_gates())
    for outcome in outcomes:
        if outcome.name in row_level and outcome.failing_ids:
            hit = pairs["pair_id"].isin(set(outcome.failing_ids)) & reason.isna()
            reason[hit] = f"failed pair check {outcome.name}"
    removed = reason.notna()
    quarantined = quarantine_rows(pairs[removed].rename(columns={"pair_id": "example_id"}), "pair_curation", reason[removed])
    kept = pairs[~removed].reset_index(drop=True)
    stats = {"pairs_in": len(pairs), "pairs_kept": len(kept), "pairs_quarantined": int(removed.sum()),
             "quarantine_reasons": {str(k): int(v) for k, v in reason[removed].value_counts().items()}}
    return kept, quarantined, stats
