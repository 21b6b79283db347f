"""Rankings file, ranking queue, imports and the `rank` CLI driven through stdin in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from preference_fixtures import make_candidates, record

from sft_dagster.preference.columns import prompt_id_of
from sft_dagster.preference.rankings import (
    RankingsError,
    append_rankings,
    import_rankings,
    parse_ranking,
    ranking_queue,
    read_candidates,
    read_rankings,
)
from sft_dagster.rank_cli import parse_answer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def candidates() -> pd.DataFrame:
    return make_candidates({"What is 2 + 2?": ["4.", "Maybe 4?", "5."], "Capital of Peru?": ["Lima.", "Quito."],
                            "What is 3 + 3?": ["6.", "7.", "It is 6."]})


def test_ranking_text_and_tiers():
    assert parse_ranking("a>b=c>d") == [["a"], ["b", "c"], ["d"]]
    assert parse_ranking(["a", ["b", "c"]]) == [["a"], ["b", "c"]]
    with pytest.raises(ValueError, match="more than once"):
        parse_ranking("a>b>a")
    with pytest.raises(ValueError, match="at least two"):
        parse_ranking("a")
    with pytest.raises(ValueError, match="exactly one best and one worst"):
        parse_ranking("a>b=c", "best_worst")


def test_append_then_read_round_trips(tmp_path, candidates):
    path = tmp_path / "rankings.jsonl"
    append_rankings(path, [record(candidates, "What is 2 + 2?", [0, 1, 2])])
    append_rankings(path, [record(candidates, "Capital of Peru?", [0, 1], author="bo", kind="best_worst")])
    df = read_rankings(path)
    assert df["author"].tolist() == ["ana", "bo"] and df["source_line"].tolist() == [1, 2]
    assert df.loc[1, "kind"] == "best_worst" and len(df.loc[0, "ranking"]) == 3


@pytest.mark.parametrize(("change", "message"), [
    ({"author": ""}, r":2: author: must name who ranked"),
    ({"timestamp": "2026-11-24 10:00"}, r":2: timestamp: .* has no time zone"),
    ({"kind": "top3"}, r":2: kind: 'top3' is not one of"),
    ({"ranking": "x>x"}, r":2: ranking: candidate\(s\) named more than once"),
    ({"extra": 1}, r":2: extra: unknown field"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, candidates, change, message):
    path = tmp_path / "rankings.jsonl"
    good = record(candidates, "What is 2 + 2?", [0, 1, 2])
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | change) + "\n")
    with pytest.raises(RankingsError, match=f"{path.name}{message}"):
        read_rankings(path)


def test_a_bad_record_never_reaches_the_file(tmp_path, candidates):
    path = tmp_path / "rankings.jsonl"
    append_rankings(path, [record(candidates, "What is 2 + 2?", [0, 1, 2])])
    before = path.read_bytes()
    with pytest.raises(RankingsError, match="author"):
        append_rankings(path, [record(candidates, "What is 3 + 3?", [0, 1, 2]) | {"author": " "}])
    assert path.read_bytes() == before
    # A file broken by a hand edit is refused (naming its line) instead of being appended to.
    path.write_text(before.decode() + "{not json\n")
    with pytest.raises(RankingsError, match=r"rankings.jsonl:2: not valid JSON"):
        append_rankings(path, [record(candidates, "What is 3 + 3?", [0, 1, 2])])
    assert path.read_text().endswith("{not json\n")


def test_concurrent_appends_lose_nothing(tmp_path, candidates):
    path = tmp_path / "rankings.jsonl"
    rec = record(candidates, "What is 2 + 2?", [0, 1, 2])
    script = textwrap.dedent(f"""
        import sys
        from sft_dagster.preference.rankings import append_rankings
        rec = {rec!r}
        for i in range(15):
            append_rankings({str(path)!r}, [rec | {{"note": f"{{sys.argv[1]}}-{{i}}"}}])
    """)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)], env=env) for n in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0]
    notes = read_rankings(path)["note"].tolist()
    assert sorted(notes) == sorted(f"{n}-{i}" for n in range(3) for i in range(15))


def test_queue_is_stable_and_skips_what_is_ranked(candidates):
    rankings = pd.DataFrame([record(candidates, "What is 2 + 2?", [0, 1, 2])])
    queue = ranking_queue(candidates, rankings)
    assert set(queue["prompt"]) == {"Capital of Peru?", "What is 3 + 3?"}
    assert queue["prompt_id"].is_monotonic_increasing
    assert queue.equals(ranking_queue(candidates.sample(frac=1, random_state=3), rankings))  # input order is irrelevant
    # Two rankers per prompt: a prompt ana ranked stays queued for bo, not for ana.
    for_bo = ranking_queue(candidates, rankings, author="bo", rankings_per_prompt=2)
    for_ana = ranking_queue(candidates, rankings, author="ana", rankings_per_prompt=2)
    assert "What is 2 + 2?" in set(for_bo["prompt"]) and "What is 2 + 2?" not in set(for_ana["prompt"])


def test_import_csv_and_jsonl(tmp_path, candidates):
    ids = {p: g["candidate_id"].tolist() for p, g in candidates.groupby("prompt")}
    csv_path = tmp_path / "made_elsewhere.csv"
    pd.DataFrame([
        {"prompt_id": prompt_id_of("What is 2 + 2?"), "ranking": ">".join(ids["What is 2 + 2?"]), "best": "", "worst": "",
         "author": "cy", "timestamp": "2026-11-20T08:00:00Z", "note": "spreadsheet", "prompt": "What is 2 + 2?"},
        {"prompt_id": prompt_id_of("What is 3 + 3?"), "ranking": "", "best": ids["What is 3 + 3?"][0],
         "worst": ids["What is 3 + 3?"][1], "author": "", "timestamp": "", "note": "", "prompt": "What is 3 + 3?"},
    ]).to_csv(csv_path, index=False)
    records = import_rankings(csv_path, candidates, author="dee", timestamp="2026-11-25T00:00:00+00:00")
    assert [r["kind"] for r in records] == ["full", "best_worst"]
    assert [r["author"] for r in records] == ["cy", "dee"]  # --author fills only rows without one
    assert records[1]["timestamp"] == "2026-11-25T00:00:00+00:00" and records[0]["source"] == "import:made_elsewhere.csv"
    jsonl_path = tmp_path / "made_elsewhere.jsonl"
    jsonl_path.write_text(json.dumps({"prompt_id": prompt_id_of("Capital of Peru?"), "ranking": [ids["Capital of Peru?"]],
                                      "author": "cy", "timestamp": "2026-11-20T08:00:00+00:00"}) + "\n")
    assert import_rankings(jsonl_path, candidates)[0]["ranking"] == [ids["Capital of Peru?"]]  # one tier: a tie


def test_import_refuses_the_whole_file_listing_every_bad_row(tmp_path, candidates):
    ids = candidates[candidates["prompt"] == "What is 2 + 2?"]["candidate_id"].tolist()
    pid = prompt_id_of("What is 2 + 2?")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt_id": pid, "ranking": ids, "author": "cy", "timestamp": "2026-11-20T08:00:00+00:00"}),
        json.dumps({"prompt_id": pid, "ranking": ids[:2], "author": "cy"}),  # a full ranking missing one
        json.dumps({"prompt_id": "nope", "ranking": ids, "author": "cy"}),
        json.dumps({"prompt_id": pid, "ranking": ids[:1] + ["zzz"], "kind": "best_worst", "author": "cy"}),
        '{"prompt_id": ',
    ]) + "\n")
    with pytest.raises(RankingsError) as err:
        import_rankings(path, candidates, author="x")
    message = str(err.value)
    assert "4 bad row(s)" in message and "nothing imported" in message
    assert f"bad.jsonl:2: ranking: a full ranking orders all 3 candidates; missing ['{ids[2]}']" in message
    assert "bad.jsonl:3: prompt_id: 'nope' has no candidates" in message
    assert "bad.jsonl:4: ranking: ['zzz'] are not candidates" in message
    assert "bad.jsonl:5: record: invalid JSON" in message


def test_candidates_table_errors(tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame({"prompt_id": ["p"], "candidate_id": ["c"], "prompt": ["x"]}).to_csv(path, index=False)
    with pytest.raises(RankingsError, match=r"c.csv:1: response: column not found"):
        read_candidates(path)
    pd.DataFrame({"prompt_id": ["p", "p"], "candidate_id": ["c", "c"], "prompt": ["x", "x"],
                  "response": ["a", "b"]}).to_csv(path, index=False)
    with pytest.raises(RankingsError, match=r"c.csv:3: candidate_id: 'c' appears more than once"):
        read_candidates(path)


@pytest.mark.parametrize(("answer", "expected"), [
    ("2>1>3", ("full", [[2], [1], [3]], "")),
    ("2 > 1 = 3  # the others hedge", ("full", [[2], [1, 3]], "the others hedge")),
    ("best 3 worst 1", ("best_worst", [[3], [1]], "")),
    ("Best 3  WORST 1", ("best_worst", [[3], [1]], "")),
])
def test_parse_answer(answer, expected):
    assert parse_answer(answer, 3) == expected


@pytest.mark.parametrize(("answer", "message"), [
    ("2>1", "orders all 3"), ("2>1>4", "no candidate 4"), ("2>2>1", "named twice"), ("first", "cannot read"),
])
def test_parse_answer_errors(answer, message):
    with pytest.raises(ValueError, match=message):
        parse_answer(answer, 3)


def test_rank_cli_through_stdin_and_import(tmp_path, candidates):
    cpath = tmp_path / "candidates.parquet"
    candidates.to_parquet(cpath)
    rpath = tmp_path / "rankings.jsonl"
    env = os.environ | {"PYTHONPATH": str(ROOT), "SFT_DAGSTER_USER": "ana"}
    cmd = [sys.executable, "-m", "sft_dagster.cli", "rank", "shop", "--candidates", str(cpath), "--rankings", str(rpath)]
    queue = ranking_queue(candidates, read_rankings(rpath))
    first, second, third = [g.reset_index(drop=True) for _, g in queue.groupby("prompt_id", sort=False)]
    # prompt 1: a typo, then an answer with a note; prompt 2: skipped; prompt 3: best/worst; then end of input
    answers = "\n".join(["9>1", "1>2" + (">3" if len(first) == 3 else "") + " # clear winner", "s", "best 2 worst 1"]) + "\n"
    done = subprocess.run(cmd, input=answers, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "error: there is no candidate 9" in done.stdout and "2 ranking(s) recorded" in done.stdout
    df = read_rankings(rpath)
    assert df["prompt_id"].tolist() == [first.loc[0, "prompt_id"], third.loc[0, "prompt_id"]]
    assert df.loc[0, "ranking"][0] == [first.loc[0, "candidate_id"]] and df.loc[0, "note"] == "clear winner"
    assert df.loc[1, "kind"] == "best_worst"
    assert df.loc[1, "ranking"] == [[third.loc[1, "candidate_id"]], [third.loc[0, "candidate_id"]]]
    assert set(df["author"]) == {"ana"} and set(df["source"]) == {"cli"}
    # Run again: only the skipped prompt is left, and 'q' stops cleanly.
    again = subprocess.run(cmd, input="q\n", capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "1 prompt(s) to rank" in again.stdout and second.loc[0, "prompt"] in again.stdout
    # Import: a bad file is a clear error (exit 2) and appends nothing.
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"prompt_id": ["nope"], "ranking": ["a>b"], "author": ["cy"]}).to_csv(bad, index=False)
    failed = subprocess.run(cmd + ["--import", str(bad)], capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 2 and "bad.csv:2: prompt_id: 'nope' has no candidates" in failed.stderr
    assert len(read_rankings(rpath)) == 2
