"""Task metrics (sft_dagster/metrics/) against known values, and their paired bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sft_dagster import metrics
from sft_dagster.metrics.qa import final_answer, normalise_answer, token_f1
from sft_dagster.metrics.registry import Resample

# sacrebleu's README ("Using SacreBLEU from Python"): two reference streams for three system sentences.
README_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
README_REFS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
               ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]


def rows(task: str, outputs: list[str], references: list, **kw) -> metrics.Rows:
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    return metrics.Rows(task=task, outputs=outputs, references=refs, **kw)


def per_row(streams: list[list[str]]) -> list[list[str]]:
    """sacrebleu's reference streams as each row's list of references (empty ones left out)."""
    return [[r for r in refs if r] for refs in zip(*streams)]


def test_sacrebleu_readme_values_and_signatures():
    scored = metrics.statistics(rows("translation", README_SYS, per_row(README_REFS)))
    assert round(scored["bleu"].value(), 2) == 48.53  # README: BLEU = 48.53 82.4/50.0/45.5/37.5
    assert round(scored["chrf"].value(), 2) == 59.73  # README: chrF2 = 59.73
    assert scored["bleu"].signature.startswith("nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert scored["chrf"].signature.startswith("nrefs:2|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    # README, "Variable Number of References": the first sentence's first reference removed -> 29.44, nrefs:var
    variable = metrics.statistics(rows("translation", README_SYS, per_row([["", *README_REFS[0][1:]], README_REFS[1]])))
    assert round(variable["bleu"].value(), 2) == 29.44 and "nrefs:var" in variable["bleu"].signature
    # one reference stream only: not the README's number (the two streams are what makes it 48.53)
    assert round(metrics.statistics(rows("translation", README_SYS, README_REFS[0]))["bleu"].value(), 2) == 45.07


def test_corpus_metrics_equal_sacrebleus_public_corpus_score_and_resample_at_corpus_level():
    """The per-row statistics (sacrebleu's private `_extract_corpus_statistics`) summed give the public
    `corpus_score`, on the corpus and on a resample of it: a sacrebleu change to them fails here."""
    from sacrebleu.metrics import BLEU, CHRF, TER

    hyps = ["a cat sat on the mat", "the dog barks loudly at night", "", "green ideas sleep furiously", "hello there"]
    refs = [["the cat sat on the mat", "a cat is on the mat"], ["the dog barked at night"], ["nothing"],
            ["colorless green ideas sleep furiously"], ["hi there", "hello", "hello there friend"]]
    scored = metrics.statistics(rows("translation", hyps, refs))
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(3)]
    drawn = [0, 0, 1, 3, 4, 4, 4]  # a resample: row 0 twice, row 1 once, row 2 never, ...
    sample = Resample(indices=np.array([drawn]), counts=np.array([[2.0, 1, 0, 1, 3]]))
    for name, scorer in (("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())):
        assert scored[name].value() == pytest.approx(scorer.corpus_score(hyps, streams).score, abs=1e-9)
        again = type(scorer)().corpus_score([hyps[i] for i in drawn], [[s[i] for i in drawn] for s in streams]).score
        assert scored[name].resampled(sample)[0] == pytest.approx(again, abs=1e-9)
    sentence_mean = np.mean([BLEU(effective_order=True).sentence_score(h, r).score for h, r in zip(hyps, refs)])
    assert abs(scored["bleu"].value() - sentence_mean) > 1  # corpus BLEU is not the mean of sentence BLEUs


def test_rouge_hand_computed_with_stemming_sentences_and_several_references():
    # ref: the polic kill the gunman (5 tokens); pred: the gunman was kill by polic (6): unigram overlap 4
    # (the, polic, kill, gunman): P 4/6, R 4/5, F 8/11; LCS 2 (e.g. "the gunman"): F 2*(2/6)(2/5)/(2/6+2/5) = 4/11
    scored = metrics.score(rows("summarization", ["the gunman was killed by police"], ["The police killed the gunman"]))
    assert scored["rouge1"] == pytest.approx(8 / 11) and scored["rougeL"] == pytest.approx(4 / 11)
    assert scored["rouge2"] == pytest.approx(2 * (1 / 5) * (1 / 4) / (1 / 5 + 1 / 4))  # "the gunman" of 5 and 4 bigrams
    # stemming: kill = killed; unigrams 4 of pred 4, ref 5 -> F 8/9 (without stemming 2/3)
    assert metrics.score(rows("summarization", ["police kill the gunman"], ["The police killed the gunman"]))["rouge1"] \
        == pytest.approx(8 / 9)
    # rougeLsum splits sentences: swapped sentences are a perfect summary-level match; one LCS over the text is 3/6
    swapped = metrics.score(rows("summarization", ["The dog ran. The cat sat."], ["The cat sat. The dog ran."]))
    assert swapped["rougeLsum"] == pytest.approx(1.0) and swapped["rougeL"] == pytest.approx(0.5)
    # several references: the best one per row
    best = metrics.score(rows("summarization", ["the cat sat"], [["completely different words", "the cat sat"]]))
    assert best["rouge1"] == pytest.approx(1.0)


def test_squad_exact_match_and_token_f1_hand_cases():
    # "the Eiffel Tower in Paris" -> eiffel tower in paris (4 tokens) vs eiffel tower (2): P 2/4, R 1 -> F 2/3
    assert token_f1("the Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("Paris", "") == 0.0 and token_f1("London", "Paris") == 0.0
    scored = metrics.score(rows("qa", ["the Eiffel Tower in Paris", "Paris.", "An apple", "Rome"],
                                ["Eiffel Tower", "paris", "apple", ["Milan", "rome"]]))
    assert scored["exact_match"] == pytest.approx(3 / 4)  # punctuation, case and articles do not count
    assert scored["token_f1"] == pytest.approx((2 / 3 + 1 + 1 + 1) / 4)


def test_final_answer_extractor():
    assert final_answer("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert final_answer("#### 42\n\nQuestion: and then?") == "42"  # a generation that goes on after its answer
    assert final_answer("The answer is 18.") == "18"
    assert final_answer("first 5 then 12 then -3") == "-3"
    assert final_answer("It costs $1,234.50 in all") == "$1,234.50"
    assert final_answer("no number here") == "no number here"
    outputs = ["So she pays 5 * 3 = 15 dollars. The answer is 15.", "#### 1,000", "#### 72.0", "#### 8", "I think 4"]
    refs = ["She pays 15.\n#### 15", "#### 1000", "#### 72", "#### 9", "#### 5"]
    assert metrics.score(rows("qa", outputs, refs))["exact_match"] == pytest.approx(3 / 5)


def test_exact_match_keeps_every_match_of_the_earlier_rule():
    """GSM8K exact match as before: every pair `normalise_answer` calls equal is still a match."""
    pairs = [("2 + 2 = 4\n#### 4", " 4. "), ("Paris", "paris"), ("#### 18 apples", "#### 18 apples"),
             ("18 apples", "#### 18 apples"), ("#### a b\nc", "#### a b c"), ("x #### 7", "7")]
    for output, ref in pairs:
        assert normalise_answer(output) == normalise_answer(ref)
        assert metrics.score(rows("qa", [output], [ref]))["exact_match"] == 1.0, (output, ref)


def test_label_metrics_equal_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    labels = ["negative", "neutral", "positive", "never"]
    rng = np.random.default_rng(3)
    expected = list(rng.choice(labels[:3], 60))
    predicted = list(rng.choice([*labels[:3], metrics.INVALID], 60))
    scored = metrics.score(rows("sentiment", predicted, expected, predictions=predicted, labels=labels))
    assert list(scored) == ["accuracy", "macro_f1", "invalid_rate"]
    assert scored["accuracy"] == pytest.approx(accuracy_score(expected, predicted), abs=1e-15)
    assert scored["macro_f1"] == pytest.approx(f1_score(expected, predicted, labels=labels, average="macro",
                                                        zero_division=0), abs=1e-15)
    assert scored["invalid_rate"] == pytest.approx(np.mean([p == metrics.INVALID for p in predicted]))


def test_text_stats():
    outputs = ["one two three four", "", "the cat the cat the cat", "a b c d e f g h"]
    scored = metrics.score(rows("instruction", outputs, ["one two", "x y", "a cat", "a b c d"],
                                output_tokens=[4, 0, 16, 16], max_new_tokens=16))
    assert scored["words_mean"] == pytest.approx((4 + 0 + 6 + 8) / 4) and scored["words_p50"] == pytest.approx(5.0)
    assert scored["length_ratio"] == pytest.approx(18 / 10)
    assert scored["empty_rate"] == 0.25 and scored["cutoff_rate"] == 0.5
    # bigrams: 3 of 3 distinct; "the cat the cat the cat": 2 distinct of 5; 7 of 7 (the empty output has none)
    assert scored["distinct_2"] == pytest.approx((1 + 2 / 5 + 1) / 3)
    assert "cutoff_rate" not in metrics.score(rows("instruction", outputs, ["r"] * 4))  # no token counts: left out
    assert metrics.score(rows("qa", [""], ["x"]))["distinct_2"] is None  # no output of two words


def test_every_task_type_has_one_primary_metric_it_produces():
    from typing import get_args

    from sft_dagster.spec import TaskType

    for task in get_args(TaskType):
        assert metrics.metrics_for(task)[0] == metrics.primary_metric(task)
    assert {t: metrics.primary_metric(t) for t in ("sentiment", "translation", "summarization", "qa", "instruction")} \
        == {"sentiment": "accuracy", "translation": "chrf", "summarization": "rougeLsum", "qa": "exact_match",
            "instruction": "rougeL"}


def _interval(values, **kw):
    outputs = ["yes" if v else "no" for v in values]
    stats = {"m": metrics.statistics(rows("qa", outputs, ["yes"] * len(values)))}
    return metrics.paired_intervals(stats, {}, **kw)["models"]["m"]["exact_match"]


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_rows():
    rng = np.random.default_rng(0)
    small, large = rng.random(40) < 0.6, rng.random(400) < 0.6
    for values in (small, large):
        low, high = _interval(values)
        assert low < values.mean() < high
    assert (_interval(large)[1] - _interval(large)[0]) < 0.5 * (_interval(small)[1] - _interval(small)[0])
    assert _interval(large) == _interval(large)  # seeded: the same interval every time
    assert _interval(large, seed=1) != _interval(large)


def test_corpus_metric_interval_narrows_with_more_rows():
    rng = np.random.default_rng(1)
    vocab = "the a cat dog sat ran on under mat house big small".split()
    refs = [" ".join(rng.choice(vocab, 8)) for _ in range(300)]
    outs = [" ".join(w if rng.random() < 0.6 else rng.choice(vocab) for w in r.split()) for r in refs]
    widths = []
    for n in (30, 300):
        stats = {"m": metrics.statistics(rows("translation", outs[:n], refs[:n]))}
        low, high = metrics.paired_intervals(stats, {})["models"]["m"]["chrf"]
        assert low < stats["m"]["chrf"].value() < high
        widths.append(high - low)
    assert widths[1] < 0.5 * widths[0]


def test_paired_difference_is_tighter_than_the_models_intervals():
    """The candidate is the champion with 12 of 200 wrong answers fixed: each model's interval overlaps the
    other's, the paired difference's does not include 0."""
    rng = np.random.default_rng(2)
    champion = rng.random(200) < 0.5
    fixed = rng.choice(np.flatnonzero(~champion), 12, replace=False)
    candidate = champion.copy()
    candidate[fixed] = True
    stats = {name: metrics.statistics(rows("qa", ["yes" if v else "no" for v in values], ["yes"] * 200))
             for name, values in (("champion", champion), ("tuned", candidate))}
    out = metrics.paired_intervals(stats, {"tuned_minus_champion": ("tuned", "champion")})
    (c_low, c_high), (t_low, t_high) = out["models"]["champion"]["exact_match"], out["models"]["tuned"]["exact_match"]
    assert t_low < c_high  # unpaired, the two intervals overlap
    difference = out["differences"]["tuned_minus_champion"]["exact_match"]
    assert difference["value"] == pytest.approx(12 / 200) and 0 < difference["interval"][0] <= 12 / 200
    assert metrics.gain_interval(out, "tuned_minus_champion", "exact_match") == difference["interval"]


def test_gain_interval_of_a_lower_is_better_metric_is_negated():
    intervals = {"differences": {"tuned_minus_base": {"ter": {"value": -5.0, "interval": [-8.0, -2.0]}}}}
    assert metrics.gain_interval(intervals, "tuned_minus_base", "ter") == [2.0, 8.0]
    assert metrics.gain_interval(intervals, "tuned_minus_base", "chrf") is None


def test_report_carries_intervals_signatures_and_references(tmp_path):
    from sft_dagster.evaluation import ModelScores, build_report, metrics_with_intervals, references, render_markdown
    from sft_dagster.spec import PipelineSpec

    spec = PipelineSpec.model_validate({"name": "t", "task": {"type": "translation"}, "sources": [{"path": "x"}]})
    refs = ["le chat est sur le tapis", "un chien court dans le parc", "une femme lit un livre"] * 10
    test = pd.DataFrame({"example_id": [f"r{i}" for i in range(30)], "prompt": ["p"] * 30, "response": refs,
                         "system": [None] * 30,
                         "metadata": ['{"references": ["le chat est sur la natte"]}'] + ["{}"] * 29})
    assert references(test)[0] == ["le chat est sur le tapis", "le chat est sur la natte"]

    def scores(outputs):
        return ModelScores(predictions=outputs, raw_outputs=outputs, loss=1.0, output_tokens=[5] * 30,
                           metrics=metrics.score(metrics.Rows("translation", outputs, references(test),
                                                              output_tokens=[5] * 30, max_new_tokens=16)))

    report = build_report(test, scores(["the cat"] * 30), scores(refs[:15] + ["le chat"] * 15), spec)
    assert report["intervals"]["compared_with"] == "tuned_minus_base"
    low, high = report["intervals"]["models"]["tuned"]["chrf"]
    assert low <= report["tuned"]["chrf"] <= high
    assert report["metric_info"]["chrf"]["signature"].startswith("nrefs:var|")  # one row has two references
    assert report["references"]["rows_with_several_references"] == 1
    table = metrics_with_intervals(report)
    assert table["chrf"]["difference"]["low"] > 0 and table["chrf"]["tuned"]["value"] == report["tuned"]["chrf"]
    md = render_markdown(report)
    assert "## 95% intervals" in md and "| chrf |" in md and "nrefs:var" in md
    from sft_dagster.registry import model_card, promotion_decision

    card = model_card("t", "v1", report, {"method": "lora"}, promotion_decision(report, "chrf", 0.0))
    d = report["intervals"]["differences"]["tuned_minus_base"]["chrf"]
    assert "## Metrics (95% intervals)" in card
    assert f"+{d['value']:.4f} [{d['interval'][0]:.4f}, {d['interval'][1]:.4f}]" in card
