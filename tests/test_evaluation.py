"""Scoring: label normalisation, metrics, slices, the corrected view and the Markdown report."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sft_dagster.evaluation import (
    INVALID,
    ModelScores,
    build_report,
    normalise_answer,
    normalise_label,
    render_markdown,
    score_model,
)
from sft_dagster.spec import PipelineSpec

LABELS = ["negative", "neutral", "positive"]


def spec(**evaluation) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "e", "task": {"type": "sentiment", "labels": LABELS}, "sources": [{"path": "x"}],
        "evaluation": {"num_samples": 2} | evaluation,
    })


def test_label_normalisation():
    assert normalise_label(" Positive.\nBecause...", LABELS) == "positive"
    assert normalise_label("negative, clearly", LABELS) == "negative"
    assert normalise_label("The review is positive", LABELS) == "positive"
    assert normalise_label("positive or negative?", LABELS) == "positive"  # the first word decides
    assert normalise_label("Either negative or neutral", LABELS) == INVALID  # two labels named
    assert normalise_label("", LABELS) == INVALID


def test_answer_normalisation_uses_gsm8k_final_answer():
    assert normalise_answer("2 + 2 = 4\n#### 4") == normalise_answer(" 4. ")
    assert normalise_answer("Paris") == normalise_answer("paris")


def test_report_metrics_slices_and_corrected_view():
    test = pd.DataFrame({
        "example_id": ["a", "b", "c", "d"], "prompt": ["p1", "p2 longer", "p3 much longer", "p4 longest one"],
        "response": ["positive", "negative", "neutral", "positive"], "system": [None] * 4,
        "is_label_issue": [False, False, False, True], "suggested_label": [None, None, None, "negative"],
    })
    base = ModelScores(predictions=["positive", INVALID, INVALID, INVALID], raw_outputs=["positive", "?", "?", "?"],
                       loss=2.0, metrics={"accuracy": 0.25, "macro_f1": 0.1, "loss": 2.0})
    tuned = ModelScores(predictions=["positive", "negative", "neutral", "negative"],
                        raw_outputs=["positive", "negative", "neutral", "negative"], loss=0.5,
                        metrics={"accuracy": 0.75, "macro_f1": 0.7, "loss": 0.5})
    report = build_report(test, base, tuned, spec())
    assert report["improvement"]["accuracy"] == 0.5
    assert report["slices"]["by_label"]["positive"] == {"n": 2, "base": 0.5, "tuned": 0.5}
    assert report["corrected_view"]["relabelled_rows"] == 1
    assert report["corrected_view"]["tuned"]["accuracy"] == 1.0  # d scored against cleanlab's suggestion
    assert len(report["samples"]) == 2
    md = render_markdown(report)
    assert "| accuracy | 0.2500 | 0.7500 | 0.5000 |" in md and "Corrected view" in md
    # Sample generations reach Dagster's event log as metadata: PII in them is masked.
    report["samples"][0]["prompt"] = "refund to ana@example.com please, call 415-555-2671"
    md = render_markdown(report)
    assert "refund to [email] please, call [phone]" in md and "ana@example.com" not in md


def test_score_model_runs_generation_and_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    test = pd.DataFrame({"example_id": ["a", "b", "c"], "prompt": ["good", "bad one", "so so"],
                         "response": ["positive", "negative", "neutral"], "system": [None] * 3})
    scores = score_model(model, tokenizer, test, spec(max_new_tokens=3, batch_size=2), "cpu")
    assert len(scores.predictions) == 3 and set(scores.predictions) <= {*LABELS, INVALID}
    assert scores.loss > 0 and scores.metrics["perplexity"] > 1
    assert 0 <= scores.metrics["accuracy"] <= 1


def test_greedy_generation_runs_once_per_distinct_prompt(tiny_model_dir):
    """Rows sharing a prompt (a test split with several reference replies per prompt) share one greedy
    generation, and every row gets the reply its prompt gets alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_dagster.evaluation import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows_generated = []
    original = model.generate

    def counting(**kwargs):
        rows_generated.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    model.generate = counting
    test = pd.DataFrame({"prompt": ["good", "bad one", "good", "so so", "bad one", "good"], "system": [None] * 6})
    task = spec().task
    out = generate(model, tokenizer, test, task, 4, 2, "cpu")
    assert sum(rows_generated) == 3  # three distinct prompts, not six rows
    alone = {p: generate(model, tokenizer, test[test["prompt"] == p].head(1), task, 4, 1, "cpu")[0]
             for p in ("good", "bad one", "so so")}
    assert out == [alone[p] for p in test["prompt"]]


def test_few_shot_examples_come_from_train_cover_labels_and_are_seeded():
    from sft_dagster.evaluation import few_shot_examples, with_few_shot

    train = pd.DataFrame({"example_id": [f"t{i}" for i in range(30)], "prompt": [f"text {i}" for i in range(30)],
                          "response": [LABELS[0]] * 20 + [LABELS[1]] * 8 + [LABELS[2]] * 2, "system": [None] * 30})
    task = spec().task
    shots = few_shot_examples(train, task, 3, seed=0)
    assert sorted(shots["response"]) == sorted(LABELS)  # one of each label first, despite the 20/8/2 skew
    assert shots["example_id"].tolist() == few_shot_examples(train, task, 3, seed=0)["example_id"].tolist()
    assert shots["example_id"].tolist() != few_shot_examples(train, task, 3, seed=1)["example_id"].tolist()
    rows = pd.DataFrame({"example_id": ["x"], "prompt": ["new"], "response": ["positive"], "system": [None]})
    history = json.loads(with_few_shot(rows, shots, task)["history"][0])
    assert [t["role"] for t in history] == ["user", "assistant"] * 3
    assert history[1]["content"] == shots["response"].iloc[0]


def test_retention_summary_measures_forgetting_of_what_the_base_got_right():
    from sft_dagster.retention import answer_is_right, retention_set, retention_summary

    items = retention_set()
    assert len(items) >= 200 and items["family"].nunique() == 9 and items["example_id"].is_unique
    small = retention_set(18, seed=3)
    assert len(small) == 18 and small["family"].nunique() == 9
    assert answer_is_right("The capital of France is Paris.", "Paris") and answer_is_right("Eight legs", "8")
    assert not answer_is_right("Parisian food", "Paris") and not answer_is_right("It is 18", "8")
    refs = items.head(4)
    base = list(refs["response"].iloc[:3]) + ["no idea"]  # the base gets 3 of 4 right
    tuned = [refs["response"].iloc[0], "wrong", "wrong", refs["response"].iloc[3]]  # keeps 1 of those 3
    summary = retention_summary(refs, {"base": base, "tuned": tuned}, {"base": 1.0, "tuned": 1.5})
    assert summary["base_right"] == 3
    assert summary["models"]["tuned"]["forgetting"] == pytest.approx(2 / 3)
    assert summary["models"]["tuned"]["accuracy"] == 0.5 and summary["models"]["tuned"]["nll_change"] == 0.5


def test_evaluate_reports_few_shot_and_retention_on_the_tiny_model(tiny_model_dir, tmp_path):
    from sft_dagster.evaluation import evaluate

    rows = lambda n, o: pd.DataFrame({"example_id": [f"e{i}" for i in range(o, o + n)],  # noqa: E731
                                      "prompt": [f"good item {i}" for i in range(o, o + n)],
                                      "response": [LABELS[i % 3] for i in range(o, o + n)], "system": [None] * n})
    s = spec(max_new_tokens=2, few_shot_k=2, retention_examples=9)
    s = s.model_copy(update={"model": s.model.model_copy(update={"max_length": 128})})
    report = evaluate(s, tiny_model_dir, tiny_model_dir, rows(4, 0), device="cpu", method="full", adapter_id="a1",
                      cache_dir=tmp_path / "scores", train=rows(10, 100))
    assert report["few_shot"]["k"] == 2 and set(report["few_shot"]["example_ids"]) <= {f"e{i}" for i in range(100, 110)}
    assert "accuracy" in report["base_few_shot"] and "loss" not in report["base_few_shot"]
    assert report["retention"]["n"] == 9 and set(report["retention"]["models"]) == {"base", "tuned"}
    # The "candidate" here is the base model itself: it forgets nothing and its reference NLL is the same.
    assert report["retention"]["models"]["tuned"]["nll_change"] == pytest.approx(0.0, abs=1e-5)
    assert report["retention"]["models"]["tuned"]["forgetting"] == 0.0
    assert "Retention" in render_markdown(report) and "base 2-shot" in render_markdown(report)
    cached = len(list((tmp_path / "scores").glob("*.json")))
    assert cached == 5  # base test, base few-shot, base retention, candidate test, candidate retention


def test_report_shows_the_training_techniques_a_run_used():
    from sft_dagster.evaluation import training_summary

    assert training_summary({"neftune_alpha": 0.0, "steps": 3}) is None  # nothing used: no section
    metrics = {"neftune_alpha": 5.0, "prompt_template_counts": {"Review: {prompt}": 7, "{prompt}?": 5},
               "replay_examples_mixed": 4, "steps": 3,
               "distillation": {"teacher": "/m", "replay_examples": 6, "computed": 0, "hits": 6, "final_kl": 0.25}}
    test = pd.DataFrame({"example_id": ["a"], "prompt": ["p"], "response": ["positive"], "system": [None]})
    scores = ModelScores(predictions=["positive"], raw_outputs=["positive"], loss=1.0, metrics={"accuracy": 1.0})
    report = build_report(test, scores, scores, spec()) | {"training": training_summary(metrics)}
    md = render_markdown(report)
    assert "NEFTune: noise alpha 5.0" in md and "`{prompt}?` 5" in md and "Replay: 4 general examples" in md
    assert "read from the cache for 6" in md and "0.2500" in md
