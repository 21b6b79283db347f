"""Scoring: label normalisation, metrics, slices, the corrected view and the Markdown report."""

from __future__ import annotations

import pandas as pd

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
