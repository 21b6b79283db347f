"""The leakage check on the splits: a validation/test row that nearly repeats a train row fails it.

The splits keep prompts that are the same text up to case, punctuation and spacing together, so the
suite's `split_leakage` cannot fail on them; a near copy with a word changed is what leaks.
"""

from __future__ import annotations

import random
import re

import pandas as pd

from sft_dagster.curation import curate
from sft_dagster.demo_data import _review
from sft_dagster.quality.leakage import LEAKAGE_SIMILARITY, check_split_neighbours
from sft_dagster.quality.sft_checks import run_sft_check
from sft_dagster.quality.suite import CheckEntry
from sft_dagster.spec import CurationPolicy, SplitSpec, TaskSpec
from sft_dagster.splits import assign_splits

LABELS = ["negative", "neutral", "positive"]


SPLITS = SplitSpec(validation=0.1, test=0.2, seed=0)


def reviews(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Distinct demo reviews: templated sentences, some of them the same review with another opener."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = LABELS[len(rows) % 3]
        text = _review(rng, label)
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    df = pd.DataFrame(rows, columns=["prompt", "response"])
    df["example_id"] = [f"id{i}" for i in range(n)]
    df["content_hash"] = df["example_id"]
    df["system"], df["reviewed"] = None, False
    df["source_file"], df["source_line"] = "reviews.jsonl", range(1, n + 1)
    return df


def curated(df: pd.DataFrame, **policy) -> tuple[pd.DataFrame, pd.DataFrame]:
    kept, quarantined, _ = curate(df, {}, None, CurationPolicy(**policy), SPLITS)
    return kept, quarantined


def test_train_copies_of_evaluation_rows_fail_until_curation_drops_them():
    split = assign_splits(reviews(), SPLITS)
    before = check_split_neighbours("leak", split)
    assert not before.passed and before.failing_ids  # the templated reviews hold copies across splits
    assert set(split.set_index("example_id").loc[before.failing_ids, "split"]) <= {"validation", "test"}
    kept, quarantined = curated(reviews())
    assert check_split_neighbours("leak", kept).passed
    copies = quarantined[quarantined["reason"].str.startswith("near copy of evaluation row")]
    assert set(copies["example_id"]) == set(before.failing_rows["train_example_id"])
    assert set(before.failing_ids) <= set(kept["example_id"])  # the evaluation rows stay as they are
    # whatever the near-duplicate policy (the demo keeps near duplicates); `leaking_train_rows: keep`
    # keeps the copies, and the check says so
    assert check_split_neighbours("leak", curated(reviews(), near_duplicates="keep")[0]).passed
    assert not check_split_neighbours("leak", curated(reviews(), leaking_train_rows="keep")[0]).passed


def test_a_paraphrase_of_a_test_row_planted_in_train_fails_and_names_the_train_row():
    clean = curated(reviews())[0]
    assert check_split_neighbours("leak", clean).passed
    test_row = clean[clean["split"] == "test"].iloc[0]
    # The same review under another opener: a different normalised text, so the splits could not group it.
    text = re.sub(r"^(Well, |Honestly, |Overall, |In short, |To be fair, |Update: |After a month, )", "", test_row["prompt"])
    paraphrase = "To be honest, " + text[0].lower() + text[1:]
    planted = clean[clean["example_id"] == test_row["example_id"]].assign(example_id="planted", prompt=paraphrase,
                                                                         split="train")
    leaky = pd.concat([clean, planted], ignore_index=True)
    outcome = check_split_neighbours("leak", leaky, blocking=True)
    assert not outcome.passed and outcome.blocking
    assert outcome.failing_ids == [test_row["example_id"]]
    assert outcome.failing_rows["train_example_id"].tolist() == ["planted"]
    assert outcome.failing_rows["similarity"].iloc[0] >= LEAKAGE_SIMILARITY
    assert outcome.metadata["leaked_rows_by_split"] == {"validation": 0, "test": 1}
    # The suite's normalised-text leakage check does not see it: that is why this check exists.
    entry = CheckEntry(name="no_split_leakage", sft_check="split_leakage", blocking=True)
    assert run_sft_check(entry, leaky, TaskSpec(type="sentiment", labels=LABELS), None, None).passed


def test_cleanlab_near_duplicate_sets_across_splits_fail():
    df = curated(reviews())[0]
    test_id = df.loc[df["split"] == "test", "example_id"].iloc[0]
    train_id = df.loc[df["split"] == "train", "example_id"].iloc[0]
    flags = pd.DataFrame({"example_id": df["example_id"], "near_duplicate_of": ""})
    assert check_split_neighbours("leak", df, flags).passed
    flags.loc[flags["example_id"] == train_id, "near_duplicate_of"] = f"removed_by_curation|{test_id}"
    outcome = check_split_neighbours("leak", df, flags)
    assert not outcome.passed and outcome.failing_ids == [test_id]
    assert outcome.metadata["by"] == {"cleanlab": 1}
    # a set naming only rows that are not evaluation rows still in the splits is no leak
    flags.loc[flags["example_id"] == train_id, "near_duplicate_of"] = "removed_by_curation"
    assert check_split_neighbours("leak", df, flags).passed


def test_no_train_rows_fails():
    df = reviews(30).assign(split="test")
    outcome = check_split_neighbours("leak", df)
    assert not outcome.passed and not outcome.failing_ids and outcome.metadata["train_rows"] == 0


def test_prompts_that_state_other_numbers_are_other_questions():
    """The TF-IDF drops one-character tokens: "... 3 hours?" and "... 8 hours?" have the same vector."""
    rows = [("How many minutes are in 3 hours?", "train"), ("How many minutes are in 8 hours?", "test"),
            ("Name a colour.", "train"), ("What is the capital of France?", "validation")]
    df = pd.DataFrame(rows, columns=["prompt", "split"]).assign(example_id=lambda d: [f"q{i}" for i in range(len(d))])
    assert check_split_neighbours("leak", df).passed
    df.loc[0, "prompt"] = "So, how many minutes are in 8 hours?"
    outcome = check_split_neighbours("leak", df)
    assert not outcome.passed and outcome.failing_ids == ["q1"] and outcome.failing_rows["train_example_id"].tolist() == ["q0"]
    flags = pd.DataFrame({"example_id": ["q0", "q1"], "near_duplicate_of": ["q1", "q0"]})  # cleanlab's sets alike
    df.loc[0, "prompt"] = "How many minutes are in 3 hours?"
    assert check_split_neighbours("leak", df, flags).passed
