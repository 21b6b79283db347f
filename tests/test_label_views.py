"""Label-probability views (tfidf, embeddings, llm, ensemble), their pooling, the ranked queue with its
estimated precision, a disabled cleanlab, and the synthetic noise the benchmarks measure with."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sft_dagster.quality import find_label_issues
from sft_dagster.quality import llm_probs
from sft_dagster.quality.label_views import knn_label_probabilities, pool
from sft_dagster.quality.noise import confusion_flips, detection_quality, uniform_flips
from sft_dagster.spec import CleanlabSpec, SpecError, TaskSpec, parse_spec

from test_quality import TASK, labelled_reviews  # noqa: E402


def precision_recall(report, planted):
    flagged = set(report.flags.loc[report.flags["is_label_issue"], "example_id"])
    return len(flagged & planted) / max(1, len(flagged)), len(flagged & planted) / len(planted)


@pytest.mark.parametrize("features", ["embeddings", "ensemble"])
def test_embedding_and_ensemble_features_find_planted_errors(features):
    df, planted = labelled_reviews()
    cfg = CleanlabSpec(features=features, ensemble=["tfidf", "embeddings"])
    report = find_label_issues(df, TASK, cfg)
    precision, recall = precision_recall(report, planted)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    info = report.summary["view_info"]
    assert set(info) == set(cfg.views)
    assert max(info[v]["weight"] for v in cfg.views) > 0.5, info
    assert report.summary["missing_issue_types"] == []


def test_llm_view_needs_the_model_directory():
    df, _ = labelled_reviews(n=60, errors=3)
    with pytest.raises(ValueError, match="base model directory"):
        find_label_issues(df, TASK, CleanlabSpec(features="llm"))


def test_llm_and_tfidf_ensemble_runs_on_a_model(tiny_model_dir):
    df, planted = labelled_reviews(n=120, errors=6)
    report = find_label_issues(df, TASK, CleanlabSpec(features="ensemble", ensemble=["tfidf", "llm"], llm_shots=3),
                               model_dir=tiny_model_dir)
    llm = report.summary["view_info"]["llm"]
    assert llm["shots"] == 3 and llm["tokens_scored"] > 0
    # the random tiny model adds nothing: the pool leans on tfidf, which still finds the planted errors
    assert report.summary["view_info"]["tfidf"]["weight"] > llm["weight"]
    precision, recall = precision_recall(report, planted)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)


def test_llm_scores_equal_the_full_sequence_log_likelihood(tiny_model_dir, monkeypatch):
    """The cached two-stage scoring (prefix once, row turn, label replies in chunks) is exact."""
    import torch

    labels = ["positive", "negative", "neutral", "mixed feelings overall"]
    task = TaskSpec(type="classification", labels=labels, prompt_template="Review: {prompt}")
    scorer = llm_probs.LlmScorer.load(tiny_model_dir, task, labels, batch_size=2)
    monkeypatch.setattr(llm_probs, "CACHE_TOKEN_BUDGET", 1)  # forces one label per chunk
    demos = [("great product", "positive"), ("it broke", "negative")]
    prompts = ["fine", "the battery lasts long and the screen is bright, I love it", "meh"]
    replies = scorer.label_reply_ids(demos, prompts[0])
    assert all(r[-1] == scorer.tokenizer.convert_tokens_to_ids("<|im_end|>") for r in replies)
    prefix, rows = scorer.prefix_and_rows(demos, prompts, [None] * len(prompts))
    got = scorer.score(prefix, rows, replies)
    with torch.inference_mode():
        for i, row in enumerate(rows):
            for j, reply in enumerate(replies):
                ids = torch.tensor([prefix + row + reply])
                logp = torch.log_softmax(scorer.model(input_ids=ids).logits[0].float(), -1)
                start = len(prefix) + len(row)
                want = sum(float(logp[start - 1 + t, tok]) for t, tok in enumerate(reply))
                assert got[i, j] == pytest.approx(want, abs=1e-3), (i, j)


def test_llm_demos_are_two_disjoint_label_spread_sets():
    given = np.array(["a"] * 10 + ["b"] * 6 + ["c"] * 2)
    a, b = llm_probs.pick_demos(given, ["a", "b", "c"], shots=3, seed=0)
    assert len(a) == len(b) == 3 and not set(a) & set(b)
    assert sorted(given[a]) == ["a", "b", "c"] and sorted(given[b]) == ["a", "b", "c"]


def test_pool_weighs_an_informative_view_over_noise():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    truth = rng.integers(0, 3, 600)
    good = np.full((600, 3), 0.1)
    good[np.arange(600), truth] = 0.8
    noise = rng.dirichlet(np.ones(3), 600)
    labels = np.array(classes)[truth]
    probs, weights, nll = pool({"good": good, "noise": noise}, labels, classes)
    assert weights["good"] > 1.0 and weights["noise"] < 0.1 * weights["good"], weights
    single = -np.log(good[np.arange(600), truth]).mean()
    assert nll < single  # calibration alone (a temperature) lowers the NLL of an underconfident view
    assert np.allclose(probs.sum(1), 1)


def test_knn_label_probabilities_use_the_neighbours_labels_only():
    labels = np.array(["a", "a", "b", "b"])
    neighbours = np.array([[2, 3], [2, 3], [0, 1], [0, 1]])  # every row's neighbours carry the other label
    probs = knn_label_probabilities(neighbours, labels, ["a", "b"])
    assert (probs[:2, 1] > probs[:2, 0]).all() and (probs[2:, 0] > probs[2:, 1]).all()


def test_queue_is_ranked_with_its_estimated_precision():
    df, planted = labelled_reviews()
    report = find_label_issues(df, TASK, CleanlabSpec())
    queue = report.review_queue[report.review_queue["is_label_issue"]]
    assert queue["label_score"].is_monotonic_increasing
    flags = report.flags.set_index("example_id")
    # the estimate is the running mean of 1 - the pooled probability of each row's given label
    errors = flags.loc[queue["example_id"], "error_probability"].to_numpy()
    expected = np.cumsum(errors) / np.arange(1, len(errors) + 1)
    assert np.allclose(queue["estimated_precision_at_rank"], expected, atol=1e-3)
    top = report.summary["estimated_precision_top"]
    assert top["10"] == pytest.approx(expected[9], abs=1e-3)
    depth = report.summary["review_depth_for_precision"]
    assert depth["0.5"] >= depth["0.9"]
    # these planted errors are obvious: the rows at the top are errors, and are estimated to be
    assert set(queue["example_id"].head(10)) <= planted and top["10"] > 0.8
    quality = detection_quality(df["example_id"].isin(planted).to_numpy(), report.flags, report.review_queue, at=(10,))
    assert quality["precision_at"]["10"]["measured"] == 1.0 and quality["auroc"] > 0.95


def test_disabled_cleanlab_flags_nothing_and_says_why():
    df, _ = labelled_reviews(n=60, errors=5)
    cfg = CleanlabSpec(enabled=False)
    report = find_label_issues(df, TASK, cfg)
    assert report.summary["enabled"] is False and "disabled in the spec" in report.summary["status"]
    assert len(report.flags) == len(df) and not report.flags["is_label_issue"].any()
    assert report.review_queue.empty
    outcomes = report.gate_outcomes(cfg)
    assert {o.name for o in outcomes} == {"label_issue_rate", "issue_types_evaluated", "class_imbalance", "non_iid"}
    assert all(o.passed and "not run: disabled in the spec" in o.description for o in outcomes)


def test_spec_validates_the_feature_choices():
    base = {"name": "x", "task": {"type": "sentiment", "labels": ["a", "b"]}, "sources": [{"path": "d.jsonl"}]}
    spec = parse_spec(base | {"quality": {"cleanlab": {"features": "ensemble", "ensemble": ["tfidf", "llm"]}}})
    assert spec.quality.cleanlab.views == ["tfidf", "llm"]
    assert parse_spec(base).quality.cleanlab.views == ["tfidf"]
    with pytest.raises(SpecError, match="ensemble"):
        parse_spec(base | {"quality": {"cleanlab": {"features": "ensemble", "ensemble": ["tfidf"]}}})
    with pytest.raises(SpecError, match="features"):
        parse_spec(base | {"quality": {"cleanlab": {"features": "bert"}}})
    with pytest.raises(SpecError, match="relabel_min_confidence"):
        parse_spec(base | {"quality": {"policy": {"label_issues": "relabel", "relabel_min_confidence": 0}}})


def test_confusion_flips_follow_the_classifier_confusion():
    labels = np.array([0] * 50 + [1] * 50)
    probs = np.zeros((100, 3))
    probs[:, 2] = 0.001  # class 2 is never confused
    probs[np.arange(100), labels] = 0.5
    probs[:50, 1] = np.linspace(0.001, 0.5, 50)  # rows of class 0: ever more confusable with 1
    probs[50:, 0] = 0.001
    noisy = confusion_flips(labels, probs, rate=0.1, seed=0)
    flipped = np.flatnonzero(noisy != labels)
    assert len(flipped) == 10 and (noisy[flipped] == 1 - labels[flipped]).all()
    assert np.median(flipped) > 25  # drawn from the confusable end, not uniformly
    uniform = uniform_flips(labels, 3, rate=0.2, seed=0)
    assert (uniform != labels).sum() == 20


def test_preflight_estimates_each_view_before_the_run(tiny_model_dir):
    from sft_dagster.quality.label_issues import label_issue_preflight

    df, _ = labelled_reviews(n=90, errors=4)
    cfg = CleanlabSpec(features="ensemble", ensemble=["tfidf", "llm"], llm_shots=3)
    plan = label_issue_preflight(df, TASK, cfg, model_dir=tiny_model_dir, sample_rows=60)
    assert set(plan["views"]) == {"tfidf", "llm"}
    assert plan["views"]["tfidf"]["estimated_seconds"] > 0 and plan["views"]["llm"]["measured_tokens_per_second"] > 0
    report = find_label_issues(df, TASK, cfg, model_dir=tiny_model_dir)
    scored = report.summary["view_info"]["llm"]["tokens_scored"]
    assert abs(plan["views"]["llm"]["tokens_to_score"] - scored) <= 0.1 * scored, (plan, scored)
    assert label_issue_preflight(df, TASK, CleanlabSpec(enabled=False))["enabled"] is False
