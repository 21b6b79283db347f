"""Response-quality findings for generation data (quality/response_issues.py) and their integration:
the review queue, curation's `response_issues` policy, the gates, corrections, the spec."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sft_dagster import curation
from sft_dagster.formatting import IGNORE_INDEX, build_messages, encode_example
from sft_dagster.labels import apply_corrections
from sft_dagster.quality import find_label_issues
from sft_dagster.quality import response_fit
from sft_dagster.quality.label_issues import with_response_issues
from sft_dagster.quality.response_issues import (FINDINGS, find_response_issues, response_issue_report, robust_z,
                                                 tail_precision)
from sft_dagster.spec import (CleanlabSpec, CurationPolicy, ResponseQualitySpec, SpecError, SplitSpec, TaskSpec,
                              parse_spec)
from sft_dagster.splits import assign_splits

from test_quality_checks import frame  # noqa: E402  (one row-frame builder for every quality test)

PAIRS = [
    ("A man in a blue shirt is standing on a ladder.", "Un homme en chemise bleue est debout sur une échelle."),
    ("Two young girls are playing in the sand at the beach.", "Deux jeunes filles jouent dans le sable à la plage."),
    ("A dog runs through the tall green grass.", "Un chien court dans les hautes herbes vertes."),
    ("A woman is reading a book on a park bench.", "Une femme lit un livre sur un banc du parc."),
    ("Three men are working on a construction site.", "Trois hommes travaillent sur un chantier de construction."),
    ("A child is eating an ice cream in the street.", "Un enfant mange une glace dans la rue."),
    ("A group of people are waiting for the bus.", "Un groupe de personnes attend le bus."),
    ("An old man is fishing from a small boat.", "Un vieil homme pêche depuis un petit bateau."),
    ("A boy in a red jacket rides his bicycle.", "Un garçon en veste rouge fait du vélo."),
    ("Two women are talking in front of a shop.", "Deux femmes discutent devant un magasin."),
    ("A musician plays the guitar on the stage.", "Un musicien joue de la guitare sur la scène."),
    ("A little girl is jumping into a swimming pool.", "Une petite fille saute dans une piscine."),
    ("A man is cooking food in a restaurant kitchen.", "Un homme prépare à manger dans la cuisine d'un restaurant."),
    ("Several children are running across a field.", "Plusieurs enfants courent à travers un champ."),
    ("A woman with a hat is selling fruit at the market.", "Une femme avec un chapeau vend des fruits au marché."),
    ("A black dog is catching a ball in the snow.", "Un chien noir attrape une balle dans la neige."),
    ("A couple is walking along the river at sunset.", "Un couple se promène le long de la rivière au coucher du soleil."),
    ("A worker in an orange vest is repairing the road.", "Un ouvrier en gilet orange répare la route."),
    ("Two boys are playing football in the park.", "Deux garçons jouent au football dans le parc."),
    ("A man is climbing a steep rock wall.", "Un homme escalade une paroi rocheuse abrupte."),
    ("A woman is taking a picture of the mountains.", "Une femme prend une photo des montagnes."),
    ("People are dancing in the street during a festival.", "Des gens dansent dans la rue pendant un festival."),
    ("A young man is skateboarding down a ramp.", "Un jeune homme descend une rampe en skateboard."),
    ("A baby is sleeping in his mother's arms.", "Un bébé dort dans les bras de sa mère."),
    ("A man with a beard is drinking coffee outside.", "Un homme barbu boit un café dehors."),
    ("Four friends are sitting around a campfire.", "Quatre amis sont assis autour d'un feu de camp."),
    ("A girl in a pink dress is holding a balloon.", "Une fille en robe rose tient un ballon."),
    ("A policeman is directing traffic at the crossing.", "Un policier dirige la circulation au carrefour."),
    ("Two cyclists are riding on a country road.", "Deux cyclistes roulent sur une route de campagne."),
    ("A woman is painting a picture in her studio.", "Une femme peint un tableau dans son atelier."),
]
GERMAN = "Ein Mann mit einem roten Hut spielt Gitarre auf der Straße."
TASK = TaskSpec(type="translation", prompt_template="Translate to French: {prompt}", response_language="fr",
                prompt_language="en")
NO_MODEL = ["wrong_language", "copy", "length", "truncated", "boilerplate"]


def translation_rows() -> tuple[pd.DataFrame, dict[str, str]]:
    """The pairs with one misaligned, one German and one copied response planted (ids in the dict)."""
    rows = list(PAIRS)
    rows[3] = (rows[3][0], PAIRS[20][1])  # misaligned: the response of another row
    rows[7] = (rows[7][0], GERMAN)  # wrong language
    rows[11] = (rows[11][0], rows[11][0])  # copy: the English prompt left untranslated
    df = frame(rows)
    df["history"] = None
    df["reviewed"] = False
    return df, {"misaligned": "id3", "wrong_language": "id7", "copy": "id11"}


def flagged(flags: pd.DataFrame, kind: str) -> set[str]:
    return set(flags.loc[flags["response_issue_types"].str.split(",").map(lambda t: kind in t), "example_id"])


def test_planted_wrong_language_and_copied_responses_are_flagged_with_their_kind_and_reason():
    df, planted = translation_rows()
    flags = find_response_issues(df, TASK, ResponseQualitySpec(findings=NO_MODEL))
    assert list(flags["example_id"]) == list(df["example_id"])
    assert flagged(flags, "wrong_language") == {"id7"}  # the English copy is reported as a copy only
    assert flagged(flags, "copy") == {"id11"}
    assert set(flags.loc[flags["is_response_issue"], "example_id"]) == {"id7", "id11"}
    by_id = flags.set_index("example_id")
    reason = by_id.loc["id7", "response_issue_reason"]
    assert "the response is in German (de, p=" in reason and "task.response_language is fr" in reason
    assert "copy of the prompt" in by_id.loc["id11", "response_issue_reason"]
    assert by_id.loc["id7", "response_language"] == "de" and by_id.loc["id3", "response_language"] == "fr"
    # higher = worse, for ranking: both planted rows above every clean row; an estimate on each flagged row
    clean = by_id.drop(index=["id3", "id7", "id11"])
    assert by_id.loc[["id7", "id11"], "response_issue_score"].min() > clean["response_issue_score"].max()
    assert by_id.loc[["id7", "id11"], "estimated_precision_at_rank"].between(0.8, 1.0).all()
    assert clean["estimated_precision_at_rank"].isna().all()


def test_the_prompt_language_is_checked_for_translation():
    df, _ = translation_rows()
    df.loc[5, ["prompt", "response"]] = ["Un enfant mange une glace dans la rue.", "Un enfant mange une glace dans la rue!"]
    flags = find_response_issues(df, TASK, ResponseQualitySpec(findings=["wrong_language"]))
    reason = flags.set_index("example_id").loc["id5", "response_issue_reason"]
    assert "the prompt is in French (fr" in reason and "task.prompt_language is en" in reason


def test_without_response_language_the_dominant_language_is_expected():
    df, _ = translation_rows()
    task = TaskSpec(type="translation", prompt_template="Translate to French: {prompt}")
    flags = find_response_issues(df, task, ResponseQualitySpec(findings=["wrong_language"]))
    assert flagged(flags, "wrong_language") == {"id7", "id11"}  # without the copy finding, the copy is English
    assert "the dataset's responses are" in flags.set_index("example_id").loc["id7", "response_issue_reason"]


def test_short_answers_in_a_qa_task_are_not_read_as_a_wrong_language():
    """A 1-3 word answer is rarely identified with confidence (py3langid tempers by length): never flagged."""
    qa = frame([(f"What colour is the shirt of the man number {i} in the picture?", a)
                for i, a in enumerate(["Blue.", "Red", "Dark green", "Two men.", "Yes", "No, it is not."] * 5)])
    flags = find_response_issues(qa, TaskSpec(type="qa"), ResponseQualitySpec(findings=["wrong_language"]))
    assert not flags["is_response_issue"].any()


def test_chunk_copies_are_flagged_only_where_copying_is_not_the_norm():
    dialogue = "#Person1#: Hello, how are you doing today?\n#Person2#: I have been having trouble breathing."
    rows = [(f"{dialogue}\n#Person1#: Case {i}, let us see.", f"Person2 has trouble breathing and sees doctor {i}.")
            for i in range(20)]
    rows[4] = (rows[4][0], "#Person1#: Hello, how are you doing today?")  # the first turn, copied
    flags = find_response_issues(frame(rows), TaskSpec(type="summarization"), ResponseQualitySpec(findings=["copy"]))
    assert flagged(flags, "copy") == {"id4"}
    assert "one chunk copied out of the prompt" in flags.set_index("example_id").loc["id4", "response_issue_reason"]
    # extractive QA: every answer is a span of its context; copying is the norm, nothing is flagged
    spans = frame([(f"The river Seine flows through the city of Paris number {i}.", f"the city of Paris number {i}")
                   for i in range(20)])
    report = response_issue_report(spans, TaskSpec(type="qa"), ResponseQualitySpec(findings=["copy"]))
    assert not report.flags["is_response_issue"].any()
    assert report.summary["findings"]["copy"]["chunk_rule"].startswith("off")


def test_truncated_length_and_boilerplate():
    rows = [(f"Write a short sentence about day {i} of the trip.", f"On day {i} we walked to the old harbour.")
            for i in range(30)]
    rows[2] = (rows[2][0], "On day 2 we walked to the")  # cut mid-sentence
    rows[5] = (rows[5][0], "As an AI language model, I cannot have a trip.")
    rows[9] = (rows[9][0], "On day 9 we walked to the old harbour, then along the beach for hours and hours, and "
                           "then we took a boat across the bay to the island, where we stayed until late at night.")
    report = response_issue_report(frame(rows), TaskSpec(type="instruction"),
                                   ResponseQualitySpec(findings=["truncated", "length", "boilerplate"]))
    flags = report.flags.set_index("example_id")
    assert flagged(report.flags, "truncated") == {"id2"} and "ends on 'the'" in flags.loc["id2", "response_issue_reason"]
    assert "id9" in flagged(report.flags, "length") and "long for its prompt" in flags.loc["id9", "response_issue_reason"]
    # boilerplate is a warning: shown, never an issue
    assert flags.loc["id5", "is_response_warning"] and not flags.loc["id5", "is_response_issue"]
    assert "as an AI language model" in flags.loc["id5", "response_issue_reason"]
    gates = {o.name: o for o in report.gate_outcomes(ResponseQualitySpec())}
    assert not gates["response_warnings"].passed and not gates["response_warnings"].blocking


def test_fit_losses_are_the_mean_reply_loss_of_a_direct_forward_pass_and_are_cached(tiny_model_dir, tmp_path):
    """The tiny random model cannot tell aligned from misaligned pairs (its losses are near log(vocab)
    everywhere), so this checks what the `misaligned` finding computes: each loss equals the mean token
    loss a plain forward pass gives on the training-formatted conversation (the reply's tokens without its
    end-of-turn token), with the prompt and with an empty prompt; the flagging rule is tested below on
    given losses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    df, _ = translation_rows()
    df = df.head(6).copy()
    df.loc[2, "system"] = "A row of its own system prompt."  # a shorter shared prefix
    task = TaskSpec(type="translation", prompt_template="Translate to French: {prompt}", system="You translate.")
    losses, info = response_fit.response_losses(df, task, tiny_model_dir, cache_dir=tmp_path, batch_size=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def direct(messages):
        enc = encode_example(tokenizer, messages, max_length=10**6)
        labels = list(enc.labels)
        last = max(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert enc.input_ids[last] == tokenizer.eos_token_id  # the end-of-turn token is not scored
        labels[last] = IGNORE_INDEX
        with torch.no_grad():
            return model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([labels])).loss.item()

    for i, row in df.iterrows():
        system = row["system"] if isinstance(row["system"], str) else None
        assert losses.loc[i, "loss_with_prompt"] == pytest.approx(
            direct(build_messages(row["prompt"], row["response"], system, task)), abs=1e-4)
        assert losses.loc[i, "loss_without_prompt"] == pytest.approx(
            direct(build_messages("", row["response"], system, task)), abs=1e-4)
    assert info["rows_scored"] == 6
    df.loc[0, "response"] = "Un autre texte."
    again, info = response_fit.response_losses(df, task, tiny_model_dir, cache_dir=tmp_path)
    assert info["rows_scored"] == 1 and info["rows_from_cache"] == 5  # only the changed row
    pd.testing.assert_frame_equal(again.iloc[1:], losses.iloc[1:])
    flags = find_response_issues(df, task, ResponseQualitySpec(findings=["misaligned"]), model_dir=tiny_model_dir,
                                 cache_dir=tmp_path)
    assert np.allclose(flags["fit_ifd"], again["loss_with_prompt"] / again["loss_without_prompt"])
    # decoys: row i's response after row j's prompt (and system), cached per pair
    decoys, info = response_fit.decoy_losses(df, task, tiny_model_dir, [(0, 2), (3, 1)], cache_dir=tmp_path)
    for (i, j), loss in zip([(0, 2), (3, 1)], decoys):
        system = df.loc[j, "system"] if isinstance(df.loc[j, "system"], str) else None
        assert loss == pytest.approx(direct(build_messages(df.loc[j, "prompt"], df.loc[i, "response"], system, task)),
                                     abs=1e-4)
    assert info["pairs_scored"] == 2
    assert response_fit.decoy_losses(df, task, tiny_model_dir, [(3, 1)], cache_dir=tmp_path)[1]["pairs_scored"] == 0


def test_decoy_pairs_are_stable_when_rows_are_added():
    keys = [f"k{i}" for i in range(40)]
    pairs = response_fit.decoy_pairs(keys, np.ones(40, dtype=bool), 40)
    assert all(i != j for i, j in pairs) and sorted(i for i, _ in pairs) == list(range(40))
    more = response_fit.decoy_pairs(keys + ["new"], np.ones(41, dtype=bool), 41)
    assert len(set(pairs) - set(more)) <= 1  # only the new row's predecessor changes partner
    assert response_fit.decoy_pairs(keys, np.arange(40) < 10, 128) and all(
        i < 10 and j < 10 for i, j in response_fit.decoy_pairs(keys, np.arange(40) < 10, 128))


def test_decoy_precision_counts_the_rows_that_look_like_decoys():
    """300 clean rows (relative gain 1 +- 0.3) and 30 misaligned ones that look like the decoys (0 +- 0.15):
    the rows below the decoys' lower quartile estimate the misaligned count, so the candidates' estimated
    precision is near the true one; with no misaligned rows it is near 0."""
    from sft_dagster.quality.response_issues import decoy_precision

    rng = np.random.default_rng(0)
    decoys = rng.normal(0.0, 0.15, 128)
    clean, bad = rng.normal(1.0, 0.3, 300), rng.normal(0.0, 0.15, 30)
    gain = np.concatenate([clean, bad])
    candidates = gain <= 0.3
    precision, info = decoy_precision(gain, np.ones(len(gain), dtype=bool), int(candidates.sum()), decoys, 0.3)
    true = candidates[300:].sum() / candidates.sum()
    assert 15 <= info["estimated_misaligned_rows"] <= 45 and abs(precision - true) <= 0.35 and precision >= 0.5
    only_clean, info = decoy_precision(clean, np.ones(300, dtype=bool), int((clean <= 0.3).sum()), decoys, 0.3)
    assert info["rows_below_reference"] == 1 and only_clean == 0.0  # one stray row is taken as clean
    assert np.isnan(decoy_precision(gain, np.ones(len(gain), dtype=bool), 5, decoys[:8], 0.3)[0])  # too few decoys


def fake_decoys(monkeypatch, seed: int = 1):
    """Decoys as a misaligned pair scores: IFD 1.00 +- 0.03 (loss without the prompt 4.0, as `fake_losses`)."""
    rng = np.random.default_rng(seed)

    def decoys(frame, task, model_dir, pairs, cache_dir=None, **kw):
        return 4.0 * rng.normal(1.0, 0.03, len(pairs)), {"pairs": len(pairs), "pairs_scored": len(pairs)}
    monkeypatch.setattr(response_fit, "decoy_losses", decoys)


def fake_losses(ifd: dict[int, float], n: int, seed: int = 0, spread: float = 0.05):
    """A stand-in for the base model: loss without the prompt 4.0, with it 4.0 * IFD (clean rows ~0.8)."""
    rng = np.random.default_rng(seed)

    def losses(frame, task, model_dir, cache_dir=None, **kw):
        ratio = rng.normal(0.8, spread, n)
        for i, v in ifd.items():
            ratio[i] = v
        return (pd.DataFrame({"loss_with_prompt": 4.0 * ratio, "loss_without_prompt": 4.0}, index=frame.index),
                {"rows": n, "rows_scored": n})
    return losses


def test_misaligned_pairs_are_flagged_from_their_losses(monkeypatch, tmp_path):
    df, planted = translation_rows()
    misaligned = {3: 1.02, 13: 0.99, 17: 0.97, 21: 1.05, 25: 0.98}  # 5 of 30 rows gain (almost) nothing
    monkeypatch.setattr(response_fit, "response_losses", fake_losses(misaligned, len(df)))
    fake_decoys(monkeypatch)
    report = response_issue_report(df, TASK, ResponseQualitySpec(findings=["misaligned"]), model_dir=tmp_path)
    assert flagged(report.flags, "misaligned") == {f"id{i}" for i in misaligned}
    reason = report.flags.set_index("example_id").loc["id3", "response_issue_reason"]
    assert "barely follows from its prompt" in reason and "IFD 1.02" in reason
    info = report.summary["findings"]["misaligned"]  # rows at IFD >= 1.02 look like the decoys (1.00 +- 0.03)
    assert info["status"] == "run" and info["ifd_threshold"] < 0.97
    assert 0.5 <= info["estimated_precision"] <= 1 and info["decoy_estimate"]["rows_below_reference"] >= 2
    at_rank = report.flags.loc[report.flags["is_response_issue"], "estimated_precision_at_rank"]
    assert np.allclose(at_rank, info["estimated_precision"])
    # the row German explains is neither flagged nor in the reference median
    both = response_issue_report(df, TASK, ResponseQualitySpec(findings=["wrong_language", "misaligned"]),
                                 model_dir=tmp_path)
    assert "id7" not in flagged(both.flags, "misaligned") and "id7" in flagged(both.flags, "wrong_language")


def test_candidates_no_more_than_the_clean_tail_are_warnings_with_a_precision_floor(monkeypatch, tmp_path):
    """Clean rows only (IFD 0.80 +- 0.08; seed 2: two rows at 0.944 and 0.965 gain under 30% of the median
    row's gain), but none looks like a decoy (a response after another row's prompt: IFD 1.00 +- 0.03).
    With `fit.min_estimated_precision: 0.5` none is flagged; they are warnings, ranked first."""
    df, _ = translation_rows()
    monkeypatch.setattr(response_fit, "response_losses", fake_losses({}, len(df), seed=2, spread=0.08))
    fake_decoys(monkeypatch)
    cfg = ResponseQualitySpec(findings=["misaligned"], fit={"min_estimated_precision": 0.5})
    report = response_issue_report(df, TASK, cfg, model_dir=tmp_path)
    assert not report.flags["is_response_issue"].any()
    info = report.summary["findings"]["misaligned"]
    assert info["status"] == "abstained" and info["candidates"] >= 1 and info["estimated_precision"] < 0.5
    warned = report.flags[report.flags["is_response_warning"]]
    assert len(warned) == info["candidates"]
    assert warned["response_issue_reason"].str.startswith("possibly misaligned, not flagged").all()
    assert report.flags["response_issue_score"].idxmax() in set(warned.index)
    assert report.flags["response_issue_score"].max() < 0.5  # below every flagged row's score


def test_a_model_that_gains_nothing_from_any_prompt_abstains(monkeypatch, tmp_path):
    """The tiny random model's case: IFD ~1 on every row. Nothing is flagged, and the warning gate says so."""
    df, _ = translation_rows()
    monkeypatch.setattr(response_fit, "response_losses", fake_losses({i: 1.0 + 0.01 * (i % 3) for i in range(30)}, 30))
    report = response_issue_report(df, TASK, ResponseQualitySpec(findings=["misaligned"]), model_dir=tmp_path)
    assert not report.flags["is_response_issue"].any()
    assert report.summary["findings"]["misaligned"]["status"] == "abstained"
    gates = {o.name: o for o in report.gate_outcomes(ResponseQualitySpec())}
    assert gates["response_issue_rate"].passed and gates["response_findings_evaluated"].passed
    assert not gates["response_warnings"].passed and "misaligned abstained" in gates["response_warnings"].description


def test_gates_fail_above_the_issue_rate_and_when_a_finding_was_not_evaluated():
    df, _ = translation_rows()
    cfg = ResponseQualitySpec(findings=NO_MODEL, max_issue_rate=0.05)  # 2 of 30 flagged: 0.067
    gates = {o.name: o for o in response_issue_report(df, TASK, cfg).gate_outcomes(cfg)}
    assert not gates["response_issue_rate"].passed and gates["response_issue_rate"].blocking
    assert set(gates["response_issue_rate"].failing_ids) == {"id7", "id11"}
    assert gates["response_findings_evaluated"].passed
    ok = ResponseQualitySpec(findings=NO_MODEL, max_issue_rate=0.1)
    assert {o.name: o for o in response_issue_report(df, TASK, ok).gate_outcomes(ok)}["response_issue_rate"].passed
    # misaligned without the base model directory: not evaluated, so both blocking gates fail
    cfg = ResponseQualitySpec()
    report = response_issue_report(df, TASK, cfg)
    gates = {o.name: o for o in report.gate_outcomes(cfg)}
    assert not gates["response_findings_evaluated"].passed and "misaligned" in gates["response_findings_evaluated"].description
    assert not gates["response_issue_rate"].passed
    off = ResponseQualitySpec(enabled=False)
    assert all(o.passed for o in response_issue_report(df, TASK, off).gate_outcomes(off))


def test_reviewed_rows_are_not_flagged_again():
    df, _ = translation_rows()
    df.loc[df["example_id"] == "id7", "reviewed"] = True  # `keep` in the corrections file
    flags = find_response_issues(df, TASK, ResponseQualitySpec(findings=NO_MODEL))
    assert set(flags.loc[flags["is_response_issue"], "example_id"]) == {"id11"}
    assert flags.set_index("example_id").loc["id7", "response_language"] == "de"  # still scored


def generation_report(df: pd.DataFrame):
    report = find_label_issues(df, TASK, CleanlabSpec())
    return with_response_issues(report, df, response_issue_report(df, TASK, ResponseQualitySpec(findings=NO_MODEL)))


def test_the_review_queue_shows_response_issues_with_reason_and_score():
    df, _ = translation_rows()
    queue = generation_report(df).review_queue.set_index("example_id")
    assert {"id7", "id11"} <= set(queue.index)
    assert "wrong_language" in queue.loc["id7", "issue_types"] and "copy" in queue.loc["id11", "issue_types"]
    assert "German" in queue.loc["id7", "response_issue_reason"]
    assert queue.loc["id7", "severity"] == pytest.approx(queue.loc["id7", "response_issue_score"], abs=1e-6)
    assert queue.loc[["id7", "id11"], "estimated_precision_at_rank"].notna().all()


@pytest.mark.parametrize("policy", ["drop", "keep"])
def test_curation_follows_the_response_issue_policy_in_train_and_validation_only(policy):
    df, _ = translation_rows()
    report = generation_report(df)
    splits = SplitSpec(validation=0.1, test=0.2)
    curated, quarantined, stats = curation.curate(df, {}, report.flags, CurationPolicy(response_issues=policy,
                                                                                      near_duplicates="keep"),
                                                  splits, label_task=False)
    assert stats["rows_in"] == len(df) == len(curated) + len(quarantined)
    assigned = assign_splits(df, splits)
    split_of = dict(zip(assigned["example_id"], assigned["split"]))
    flagged_ids = {"id7", "id11"}
    dropped = set(quarantined["example_id"])
    if policy == "drop":
        assert dropped == {i for i in flagged_ids if split_of[i] != "test"}
        assert all(r.startswith("response issue (") for r in quarantined["reason"])
        assert stats["response_issues_quarantined"] == len(dropped)
    else:
        assert dropped == set()
    kept_test = curated[curated["split"] == "test"]
    assert kept_test["is_response_issue"].sum() == sum(split_of[i] == "test" for i in flagged_ids)


def test_curation_drops_a_flagged_train_row_and_keeps_a_flagged_test_row():
    """The split is a hash of the prompt: flag one row that lands in train and one in test."""
    df, _ = translation_rows()
    splits = SplitSpec(validation=0.1, test=0.2)
    split = dict(zip(assign_splits(df, splits)["example_id"], assign_splits(df, splits)["split"]))
    train_id = next(i for i, s in split.items() if s == "train")
    test_id = next(i for i, s in split.items() if s == "test")
    flags = pd.DataFrame({"example_id": df["example_id"], "is_label_issue": False, "is_outlier": False,
                          "is_near_duplicate": False, "is_response_issue": df["example_id"].isin([train_id, test_id]),
                          "is_response_warning": False, "response_issue_types": "copy", "response_issue_score": 0.9,
                          "response_issue_reason": "the response is a copy of the prompt"})
    curated, quarantined, stats = curation.curate(df, {}, flags, CurationPolicy(), splits, label_task=False)
    assert list(quarantined["example_id"]) == [train_id]
    assert quarantined["reason"].iloc[0] == "response issue (copy): the response is a copy of the prompt"
    assert test_id in set(curated["example_id"]) and stats["flagged_test_response_rows_kept"] == 1
    assert len(curated) + len(quarantined) == len(df)


def test_a_relabel_correction_replaces_a_generation_response_and_keep_marks_it_reviewed():
    df, _ = translation_rows()
    corrections = pd.DataFrame({"example_id": ["id11", "id7"], "action": ["relabel", "keep"],
                                "new_value": ["Une petite fille saute dans une piscine.", None], "note": ["fixed", "ok"],
                                "author": "ana", "timestamp": None, "old_value": None}).astype("string")
    labelled, quarantined, stats = apply_corrections(df.drop(columns=["reviewed"]), corrections, None)
    row = labelled.set_index("example_id").loc["id11"]
    assert row["response"] == "Une petite fille saute dans une piscine." and row["label_source"] == "correction"
    flags = find_response_issues(labelled, TASK, ResponseQualitySpec(findings=NO_MODEL))
    assert not flags["is_response_issue"].any()  # the copy is fixed, the German row was kept by a person


def test_label_tasks_get_no_response_findings():
    labels = TaskSpec(type="sentiment", labels=["negative", "positive"])
    with pytest.raises(ValueError, match="generation tasks"):
        find_response_issues(frame([("good", "positive")]), labels, ResponseQualitySpec())
    from sft_dagster.defs.quality import LABEL_GATE_CHECKS, gate_checks

    spec = type("S", (), {"task": labels})
    assert gate_checks(spec) == LABEL_GATE_CHECKS
    assert {"response_issue_rate", "response_findings_evaluated"} <= {c[0] for c in gate_checks(type("S", (), {"task": TASK}))}


def test_an_unknown_language_code_fails_at_spec_load_naming_the_key():
    text = ("name: t\ntask:\n  type: translation\n  response_language: french\nsources:\n  - path: x.jsonl\n")
    import yaml

    with pytest.raises(SpecError, match=r"spec\.yaml:4: task\.response_language: .*'french' is not a language code"):
        parse_spec(yaml.safe_load(text), "spec.yaml", text)
    with pytest.raises(SpecError, match=r"task\.response_language: .*for generation tasks"):
        parse_spec({"name": "t", "task": {"type": "sentiment", "labels": ["a", "b"], "response_language": "en"},
                    "sources": [{"path": "x"}]})
    spec = parse_spec({"name": "t", "task": {"type": "translation", "response_language": "FR"}, "sources": [{"path": "x"}]})
    assert spec.task.response_language == "fr"
    with pytest.raises(SpecError, match=r"quality\.response\.findings\.0"):
        parse_spec({"name": "t", "task": {"type": "qa"}, "sources": [{"path": "x"}],
                    "quality": {"response": {"findings": ["misalinged"]}}})


def test_every_registered_finding_is_a_spec_choice_and_the_statistics_behave():
    from sft_dagster.spec import RESPONSE_FINDINGS

    assert tuple(FINDINGS) == RESPONSE_FINDINGS
    z, median, sd = robust_z(np.array([1.0, 1.1, 0.9, 1.0, 5.0]))
    assert median == 1.0 and z[-1] > 10 and abs(z[0]) < 1e-9
    est = tail_precision(np.array([0.0, 0.5, -0.3, 8.0]))
    assert est[3] > 0.99 and est[0] < 0.5 and est[3] > est[1] > est[0] >= est[2]


def test_the_preflight_counts_the_fit_tokens_and_skips_cached_rows(tiny_model_dir, tmp_path):
    from sft_dagster.quality.response_issues import response_preflight

    df, _ = translation_rows()
    cfg = ResponseQualitySpec()
    plan = response_preflight({"enabled": True, "rows": 30, "views": {"tfidf": {"estimated_seconds": 1.0}}}, df, TASK,
                              cfg, tiny_model_dir, tmp_path)
    fit = plan["views"]["response_fit"]
    assert fit["rows_to_score"] == 30 and fit["tokens_to_score"] > 30 * 10 and fit["estimated_seconds"] > 0
    assert plan["estimated_seconds_total"] == pytest.approx(1.0 + fit["estimated_seconds"], abs=0.11)
    response_fit.response_losses(df, TASK, tiny_model_dir, cache_dir=tmp_path)
    again = response_preflight(None, df, TASK, cfg, tiny_model_dir, tmp_path)["views"]["response_fit"]
    assert again["rows_to_score"] == 0 and again["estimated_seconds"] == 0.0
    assert response_preflight(None, df, TASK, ResponseQualitySpec(findings=["copy"]), tiny_model_dir, tmp_path) is None


def test_flag_threshold_lowers_the_cut_until_the_estimate_reaches_the_floor():
    """600 clean rows (relative gain 1 +- 0.45) and 30 misaligned (0 +- 0.15), seed 2: the 0.3 cut's
    candidates are estimated below 0.5; the cut falls by 0.05 steps to the first one estimated at 0.5 or
    more, whose measured precision is higher too. A floor no cut reaches flags nothing (None)."""
    from sft_dagster.quality.response_issues import decoy_precision, flag_threshold

    rng = np.random.default_rng(2)
    decoys = rng.normal(0.0, 0.15, 128)
    gain = np.concatenate([rng.normal(1.0, 0.45, 600), rng.normal(0.0, 0.15, 30)])
    eligible = np.ones(len(gain), dtype=bool)
    measured = lambda cut: (gain[600:] <= cut).sum() / (gain <= cut).sum()  # noqa: E731
    assert decoy_precision(gain, eligible, int((gain <= 0.3).sum()), decoys, 0.3)[0] < 0.5
    cut, precision, info = flag_threshold(gain, eligible, decoys, 0.3, 0.5)
    assert cut is not None and cut < 0.3 and precision >= 0.5 and info["flagged_candidates"] == (gain <= cut).sum()
    assert measured(cut) > measured(0.3)
    assert flag_threshold(gain, eligible, decoys, 0.3, 0.99)[0] is None
