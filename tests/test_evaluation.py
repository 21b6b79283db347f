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

from preference_fixtures import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny-model generation: a second thread only waits

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


def test_greedy_generation_runs_once_per_distinct_prompt(tiny_model_dir, monkeypatch):
    """Rows sharing a prompt (a test split with several reference replies per prompt) share one greedy
    generation, and every row gets the reply its prompt gets alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_dagster import evaluation
    from sft_dagster.evaluation import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows_generated = []
    original = evaluation.greedy

    def counting(model, prompts, *args, **kwargs):
        rows_generated.append(len(prompts))
        return original(model, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluation, "greedy", counting)
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


# -- Cheaper scoring, same results (issue #12) ------------------------------------------------------------------

SHOTS_AND_ROWS = pd.DataFrame({
    "example_id": [f"r{i}" for i in range(9)],
    "prompt": ["good", "bad one here", "so so", "broke after a day, terrible", "great screen", "okay I guess",
               "the battery lasts long and the screen is bright", "fine", "it works"],
    "response": [LABELS[i % 3] for i in range(9)], "system": [None] * 9,
})


@pytest.fixture(scope="module")
def varied_tiny_model(tiny_model_dir):
    """The tiny model with larger random weights: its greedy tokens change with the prompt and position
    (at the default scale every prompt gets the same newlines), so a wrong cache or order shows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _plain_generations(model, tokenizer, df, task, max_new_tokens):
    """One row at a time: no padding, no shared prefix, no batching."""
    import torch

    from sft_dagster.formatting import generation_prompt_ids
    from sft_dagster.schema import column_or_none

    out = []
    for p, s, h in zip(df["prompt"], df["system"], column_or_none(df, "history")):
        ids = generation_prompt_ids(tokenizer, p, s, task, h)
        row = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[0]
        out.append(tokenizer.decode(row[len(ids):], skip_special_tokens=True))
    return out


def test_batched_generation_after_a_shared_prefix_equals_plain_generation_in_row_order(varied_tiny_model):
    from sft_dagster.evaluation import SharedPrefix, generate, with_few_shot
    from sft_dagster.formatting import generation_prompt_ids

    model, tokenizer = varied_tiny_model
    task = spec().task
    zero_shot = SHOTS_AND_ROWS.iloc[3:]  # unsorted lengths: batches are formed by length, outputs come back in order
    few_shot = with_few_shot(zero_shot, SHOTS_AND_ROWS.head(3), task)
    prefixes = {}
    for name, df in {"zero-shot": zero_shot, "3-shot": few_shot}.items():
        prompts = [generation_prompt_ids(tokenizer, p, None, task, h) for p, h in zip(df["prompt"], df["history"]
                                                                                       if "history" in df else [None] * len(df))]
        prefixes[name] = len(SharedPrefix(model, prompts, "cpu", "fp32"))
        got = generate(model, tokenizer, df, task, 6, 4, "cpu")
        assert got == _plain_generations(model, tokenizer, df, task, 6), name
        assert len(set(got)) > len(got) // 2  # the check can tell rows apart
    assert 0 < prefixes["zero-shot"] < prefixes["3-shot"]  # the instruction, and then the shots, are shared


def test_response_loss_after_a_shared_prefix_equals_the_loss_row_by_row(varied_tiny_model):
    import torch

    from sft_dagster.evaluation import response_loss, with_few_shot
    from sft_dagster.formatting import build_messages, encode_example
    from sft_dagster.schema import column_or_none
    from sft_dagster.torchkit import collate, summed_response_loss

    model, tokenizer = varied_tiny_model
    task = spec().task
    # in the few-shot rows the shots' replies carry loss too: the shared prefix must stop before them
    for df in (SHOTS_AND_ROWS.iloc[3:], with_few_shot(SHOTS_AND_ROWS.iloc[3:], SHOTS_AND_ROWS.head(3), task)):
        total, count = 0.0, 0
        for p, r, h in zip(df["prompt"], df["response"], column_or_none(df, "history")):
            encoded = encode_example(tokenizer, build_messages(p, r, None, task, h), 512)
            with torch.no_grad():
                loss, n = summed_response_loss(model, collate([encoded], tokenizer.pad_token_id, "cpu"))
            total, count = total + float(loss), count + n
        assert response_loss(model, tokenizer, df, task, 512, 4, "cpu") == pytest.approx(total / count, rel=1e-5)
    for mode in (False, True):  # the scorer leaves the model in the mode it came in (eval: dropout stays off)
        model.train(mode)
        response_loss(model, tokenizer, SHOTS_AND_ROWS.head(2), task, 512, 4, "cpu")
        assert model.training == mode
    model.eval()


def test_generation_and_loss_in_one_pass_equal_the_two_passes(varied_tiny_model, monkeypatch):
    from sft_dagster import evaluation
    from sft_dagster.evaluation import generate, generate_with_loss, response_loss, with_few_shot
    from sft_dagster.spec import TaskSpec

    model, tokenizer = varied_tiny_model
    chat = TaskSpec(type="instruction")
    replies = ["positive", "not good at all, it broke", "so so", "fine", "it works well enough for me", "bad"]
    rows = SHOTS_AND_ROWS.iloc[3:].assign(response=replies)  # replies of 2 to 9 tokens
    # one pass (the loss reuses generation's prompt cache); few-shot history carries loss: two passes
    for df, max_new_tokens in ((rows, 5), (rows, 1), (with_few_shot(rows, SHOTS_AND_ROWS.head(2), chat), 5)):
        separate = []  # which calls took the second pass
        monkeypatch.setattr(evaluation, "response_loss", lambda *a, **k: separate.append(1) or response_loss(*a, **k))
        got, loss = generate_with_loss(model, tokenizer, df, chat, max_new_tokens, 512, 4, "cpu")
        monkeypatch.undo()
        assert len(separate) == ("history" in df)
        assert got == generate(model, tokenizer, df, chat, max_new_tokens, 4, "cpu")
        assert loss == pytest.approx(response_loss(model, tokenizer, df, chat, 512, 4, "cpu"), rel=1e-5)


def test_base_model_scores_are_reused_by_the_next_run(tiny_model_dir, tmp_path, monkeypatch):
    """A new candidate reuses the base model's scores; new test rows reuse its retention scores, and only
    the new rows are generated (the scores are those of a run without any cache)."""
    from sft_dagster import evaluation

    calls = {"score_model": 0, "score_retention": 0}
    for name in calls:
        real = getattr(evaluation, name)
        monkeypatch.setattr(evaluation, name, lambda *a, _real=real, _name=name, **k: calls.__setitem__(_name, calls[_name] + 1)
                            or _real(*a, **k))
    rows = lambda n, o: pd.DataFrame({"example_id": [f"e{i}" for i in range(o, o + n)],  # noqa: E731
                                      "prompt": [f"good item {i}" for i in range(o, o + n)],
                                      "response": [LABELS[i % 3] for i in range(o, o + n)], "system": [None] * n})
    s = spec(max_new_tokens=2, few_shot_k=2, retention_examples=9)
    run = lambda test, adapter_id: evaluation.evaluate(s, tiny_model_dir, tiny_model_dir, test, device="cpu",  # noqa: E731
                                                       method="full", adapter_id=adapter_id, cache_dir=tmp_path,
                                                       train=rows(10, 100))
    first = run(rows(4, 0), "a1")
    assert calls == {"score_model": 3, "score_retention": 2}  # base zero-shot, base 2-shot, candidate; retention x2
    run(rows(4, 0), "a2")  # a new candidate, the same test rows
    assert calls == {"score_model": 4, "score_retention": 3}
    nightly = run(rows(5, 0), "a3")  # new test rows: the base is scored on them again, its retention is not
    assert calls == {"score_model": 7, "score_retention": 4}
    # ... and generates only the new row (issue #21); per model, the seconds of loading and of each part
    assert first["generated_rows"] == {"base": {"zero_shot": 4, "few_shot": 4, "retention": 9},
                                       "tuned": {"zero_shot": 4, "retention": 9}}
    assert nightly["generated_rows"] == {"base": {"zero_shot": 1, "few_shot": 1, "retention": 0},
                                         "tuned": {"zero_shot": 5, "retention": 9}}
    seconds = first["seconds_by_part"]
    assert set(seconds["base"]) == {"load", "zero_shot", "few_shot", "retention"} and seconds["report"] >= 0
    assert set(seconds["tuned"]) == {"load", "zero_shot", "retention"}
    assert all(v >= 0 for part in ("base", "tuned") for v in seconds[part].values())
    md = evaluation.render_markdown(first)
    assert "## Evaluation cost" in md and "| test rows (generation and loss) |" in md
    fresh = evaluation.evaluate(s, tiny_model_dir, tiny_model_dir, rows(5, 0), device="cpu", method="full",
                                adapter_id="a4", train=rows(10, 100))  # nothing cached
    for model in ("base", "base_few_shot", "tuned"):
        assert nightly[model] == pytest.approx(fresh[model], rel=1e-6), model
    assert nightly["samples"] == fresh["samples"]


def test_generation_task_scores_its_metrics_and_finds_cut_off_outputs(varied_tiny_model):
    """A translation task gets chrF/BLEU/TER and the text statistics; the share of outputs cut off at
    max_new_tokens (token counts from re-tokenizing the output) agrees with generation's own tokens."""
    import torch

    from sft_dagster.formatting import generation_prompt_ids

    model, tokenizer = varied_tiny_model
    s = PipelineSpec.model_validate({"name": "g", "task": {"type": "translation"}, "sources": [{"path": "x"}],
                                     "evaluation": {"max_new_tokens": 6}})
    test = pd.DataFrame({"example_id": list("abcdefgh"), "system": [None] * 8, "response": ["le chat"] * 8,
                         "prompt": ["good", "bad one", "so so", "the product arrived", "battery lasts long",
                                    "terrible quality", "It is okay", "classify the review"]})
    scores = score_model(model, tokenizer, test, s, "cpu")
    assert list(scores.metrics)[:3] == ["chrf", "bleu", "ter"] and "accuracy" not in scores.metrics
    assert {"words_mean", "empty_rate", "cutoff_rate", "distinct_2", "loss", "perplexity"} <= set(scores.metrics)
    cut = []
    for prompt in test["prompt"]:
        ids = generation_prompt_ids(tokenizer, prompt, None, s.task, None)
        row = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[0, len(ids):]
        cut.append(tokenizer.eos_token_id not in row.tolist())
    assert [n >= 6 for n in scores.output_tokens] == cut
    assert scores.metrics["cutoff_rate"] == pytest.approx(sum(cut) / len(cut))


# -- Faster evaluation, same outputs (issue #21) ------------------------------------------------------------------

def test_greedy_loop_with_rows_leaving_and_joining_equals_model_generate(varied_tiny_model, monkeypatch):
    """Rows that end at different steps leave the batch and waiting rows take their places (after a
    shared prefix, and after a long few-shot one); every row's tokens are `model.generate`'s for its
    prompt alone, token for token. An end token the model often picks makes the rows end at different
    steps; padding no row attends to is dropped as soon as there is any."""
    import torch

    from sft_dagster import decoding
    from sft_dagster.evaluation import _prompt_ids, with_few_shot

    model, tokenizer = varied_tiny_model
    task = spec().task
    monkeypatch.setattr(decoding._Batch, "DROP", 1)
    monkeypatch.setattr(decoding, "PROMPT_ROWS", 2)  # joining rows start two at a time
    calls = {"join": 0, "drop": 0}
    for cls, name in ((decoding._Batch, "join"), (decoding._Buffer, "drop")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *a, _real=real, _name=name, **k: calls.__setitem__(_name, calls[_name] + 1)
                            or _real(*a, **k))
    for df in (SHOTS_AND_ROWS, with_few_shot(SHOTS_AND_ROWS.iloc[3:], SHOTS_AND_ROWS.head(3), task)):
        prompts = _prompt_ids(tokenizer, df, task)

        def alone(ids, eos):  # the mask given: generate would otherwise mask the prompt's pad tokens (<|im_end|>)
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos)[0, len(ids):].tolist()
            return out[: out.index(eos) + 1] if eos in out else out

        free = [alone(p, tokenizer.eos_token_id) for p in prompts]
        ends = lambda t: {g.index(t) + 1 if t in g else 10 for g in free}  # noqa: E731
        common = max({t for g in free for t in g}, key=lambda t: len(ends(t)))  # the end token ending rows most variously
        expected = [alone(p, common) for p in prompts]
        assert len({len(e) for e in expected}) >= 3  # rows end at different steps (or run to the 10-token cap)
        for batch_size, refill in ((3, 1), (4, 2), (len(prompts), None)):
            got, _ = decoding.greedy(model, prompts, 10, batch_size, "cpu", "fp32", tokenizer.pad_token_id, common,
                                     refill=refill)
            assert got == expected, (batch_size, refill)
    assert calls["join"] > 0 and calls["drop"] > 0  # rows joined a running batch; unused padding was dropped


def test_greedy_loss_per_row_equals_the_separate_loss_pass(varied_tiny_model):
    """Each row's reply loss from the generation pass (taken before the row joins the batch) is its loss
    scored on its own."""
    import torch

    from sft_dagster import decoding
    from sft_dagster.evaluation import _encoded, _prompt_ids, _reply_after
    from sft_dagster.torchkit import collate, summed_response_loss

    model, tokenizer = varied_tiny_model
    rows = SHOTS_AND_ROWS.assign(response=["positive", "not good at all", "so so", "fine", "it works well enough",
                                           "bad", "neutral", "positive", "great screen"])
    task = spec().task
    prompts, encoded = _prompt_ids(tokenizer, rows, task), _encoded(tokenizer, rows, task, 512)
    replies = [_reply_after(p, e) for p, e in zip(prompts, encoded)]
    _, losses = decoding.greedy(model, prompts, 5, 3, "cpu", "fp32", tokenizer.pad_token_id, tokenizer.eos_token_id,
                                replies=replies, refill=1)
    for (loss, n), e in zip(losses, encoded):
        with torch.no_grad():
            alone, count = summed_response_loss(model, collate([e], tokenizer.pad_token_id, "cpu"))
        assert n == count and loss == pytest.approx(float(alone), rel=1e-5)


def test_row_store_generates_only_rows_it_does_not_hold(varied_tiny_model, tmp_path, monkeypatch):
    """The second pass over the same rows runs no model; a changed row and a new row are the only ones
    generated, and every output and the loss are those of a pass without the store."""
    from sft_dagster import evaluation
    from sft_dagster.evaluation import RowStore, generate_with_loss

    model, tokenizer = varied_tiny_model
    task = spec().task
    forwards, generated = [], []
    original_forward, original_greedy = model.forward, evaluation.greedy
    monkeypatch.setattr(model, "forward", lambda *a, **k: forwards.append(1) or original_forward(*a, **k))
    monkeypatch.setattr(evaluation, "greedy", lambda m, prompts, *a, **k: generated.append(len(prompts))
                        or original_greedy(m, prompts, *a, **k))
    first = SHOTS_AND_ROWS.head(6)
    run = lambda df, store=None: generate_with_loss(model, tokenizer, df, task, 5, 512, 4, "cpu",  # noqa: E731
                                                    store=store if store is None else RowStore(tmp_path, {"model": "m"}))

    def same(got, expected):
        assert got[0] == expected[0] and got[1] == pytest.approx(expected[1], rel=1e-6)

    stored = run(first, True)
    assert generated == [6]
    forwards.clear()
    generated.clear()
    same(run(first, True), stored)
    assert generated == [] and forwards == []  # every row read back: no model call at all
    same(stored, run(first))
    second = pd.concat([first.head(5), SHOTS_AND_ROWS.iloc[[6]]]).reset_index(drop=True)
    second.loc[2, "prompt"] = "so so, really"
    generated.clear()
    got = run(second, True)
    assert generated == [2]  # the changed row and the new one
    same(got, run(second))
    assert RowStore(tmp_path, {"model": "another"}).rows == {}  # another model has its own rows


def test_the_reports_intervals_reuse_the_per_row_statistics_score_model_computed(varied_tiny_model, monkeypatch):
    """score_model's statistics ride on its metrics (not in their JSON): the report computes none again for
    fresh scores, and computes them once for scores read back from the cache, with the same intervals."""
    from sft_dagster import metrics

    model, tokenizer = varied_tiny_model
    s = PipelineSpec.model_validate({"name": "g", "task": {"type": "translation"}, "sources": [{"path": "x"}],
                                     "evaluation": {"max_new_tokens": 4}})
    test = pd.DataFrame({"example_id": list("abcdef"), "system": [None] * 6, "response": ["le chat", "un chien"] * 3,
                         "prompt": ["good", "bad one", "so so", "the product arrived", "battery lasts long", "It is okay"]})
    base = score_model(model, tokenizer, test, s, "cpu", with_loss=False)
    tuned = score_model(model, tokenizer, test.assign(prompt=test["prompt"] + " now"), s, "cpu", with_loss=False)
    calls = []
    original = metrics.statistics
    monkeypatch.setattr(metrics, "statistics", lambda rows: calls.append(rows) or original(rows))
    fresh = build_report(test, base, tuned, s)
    assert calls == []
    assert json.loads(json.dumps(fresh["tuned"])) == fresh["tuned"] and type(fresh["tuned"]) is dict
    read_back = {name: ModelScores(**json.loads(json.dumps(vars(scores)))) for name, scores in (("base", base), ("tuned", tuned))}
    assert type(read_back["base"].metrics) is dict  # the statistics are not in the cached JSON
    again = build_report(test, read_back["base"], read_back["tuned"], s)
    assert len(calls) == 2 and again["intervals"]["models"] == fresh["intervals"]["models"]
    assert again["intervals"]["differences"] == fresh["intervals"]["differences"]
    other = test.assign(response=["une souris"] * 6)  # other references: the kept statistics are not theirs
    calls.clear()
    build_report(other, base, tuned, s)
    assert len(calls) == 2
