"""The pairwise judge (sft_dagster/judge.py): win values from both orders on hand-made log-probabilities and
on the tiny model, its cache, and the win rate in the report, the markdown, MLflow and the model card."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sft_dagster import metrics
from sft_dagster.evaluation import ModelScores, build_report, evaluate, render_markdown
from sft_dagster.judge import Judge, pairwise_wins
from sft_dagster.spec import PipelineSpec

from preference_fixtures import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def margin(p_a: float, p_b: float) -> float:
    """The judge's margin from its next-token probabilities of "A" and "B"."""
    return math.log(p_a) - math.log(p_b)


def test_a_win_needs_the_candidate_preferred_in_both_orders_and_a_disagreement_is_a_tie():
    # (candidate as A, candidate as B): P("A"), P("B") of each order
    rows = [((0.7, 0.2), (0.1, 0.8)),  # the candidate preferred in both orders: a win
            ((0.3, 0.6), (0.9, 0.05)),  # the other answer preferred in both: a loss
            ((0.8, 0.1), (0.6, 0.3)),  # "A" in both orders (position bias): a tie
            ((0.2, 0.7), (0.4, 0.5)),  # "B" in both orders: a tie
            ((0.4, 0.4), (0.1, 0.8)),  # no preference in one order: a tie
            ((0.51, 0.49), (0.49, 0.51))]  # barely, but in both orders: a win
    first = [margin(*a) for a, _ in rows]
    second = [margin(*b) for _, b in rows]
    assert pairwise_wins(first, second) == [1.0, 0.0, 0.5, 0.5, 0.5, 1.0]
    assert pairwise_wins(second, first) == [0.0, 1.0, 0.5, 0.5, 0.5, 0.0]  # the other answer's view
    with pytest.raises(ValueError):
        pairwise_wins(first, second[:-1])


class LengthJudge(Judge):
    """A judge without a model that prefers the longer answer, whatever its position."""

    def __init__(self):
        self.asked: list[tuple[str, str]] = []

    def margins(self, requests, first, second):
        self.asked += list(zip(first, second))
        return [float(len(a) - len(b)) for a, b in zip(first, second)]


def test_wins_ask_both_orders_and_identical_answers_are_ties_without_asking():
    judge = LengthJudge()
    wins = judge.wins(["q"] * 4, ["a long answer", "short", "same", " tie "], ["short", "a long answer", "four", "tie"])
    assert wins == [1.0, 0.0, 0.5, 0.5]  # longer; shorter; as long; identical after stripping
    assert ("a long answer", "short") in judge.asked and ("short", "a long answer") in judge.asked
    assert ("tie", "tie") not in judge.asked and len(judge.asked) == 6  # 3 pairs x 2 orders


@pytest.fixture(scope="module")
def judge_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with larger random weights (another seed than test_evaluation's `varied_tiny_model`,
    whose judge has a position bias on every pair here), saved: its margins change with the answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    out = tmp_path_factory.mktemp("judge")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


REQUESTS = ["Classify the review: good", "Summarise: the product arrived on time", "Translate: the battery lasts long",
            "Classify the review: terrible quality", "Answer: is it okay?", "Style: the screen is bright"]
CANDIDATE = ["positive", "It arrived on time.", "la batterie dure longtemps", "negative", "yes, it is okay", "Bright screen!"]
OTHER = ["neutral answer", "The product broke after a day", "the battery lasts long", "positive", "no", "the screen"]


def test_the_tiny_judge_gives_win_values_from_its_own_log_probs_in_both_orders(judge_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    judge = Judge(judge_dir, {"model": "varied"}, batch_size=4, cache_dir=tmp_path)
    wins = judge.wins(REQUESTS, CANDIDATE, OTHER)
    assert set(wins) <= {0.0, 0.5, 1.0} and len(wins) == len(REQUESTS)
    assert judge.computed == 2 * len(REQUESTS)

    # Each prompt alone: no batch, no padding, no shared prefix.
    model = AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    (a_ids, b_ids) = judge._letter_ids()

    def plain(request: str, a: str, b: str) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([judge.prompt_ids(request, a, b)])).logits[0, -1], -1)
        return float(torch.logsumexp(logp[a_ids], -1) - torch.logsumexp(logp[b_ids], -1))

    first = [plain(*t) for t in zip(REQUESTS, CANDIDATE, OTHER)]
    second = [plain(*t) for t in zip(REQUESTS, OTHER, CANDIDATE)]
    assert judge.margins(REQUESTS, CANDIDATE, OTHER) == pytest.approx(first, abs=1e-4)
    assert judge.margins(REQUESTS, OTHER, CANDIDATE) == pytest.approx(second, abs=1e-4)
    assert wins == pairwise_wins(first, second)
    assert {0.0, 1.0} & set(wins)  # this judge decides some rows: the values are not all ties by construction

    # Identical answers: the two orders are one prompt with one margin, so they disagree: a tie.
    same = [plain(r, c, c) for r, c in zip(REQUESTS, CANDIDATE)]
    assert all(m != 0 for m in same) and pairwise_wins(same, same) == [0.5] * len(REQUESTS)
    assert judge.margins(REQUESTS, CANDIDATE, CANDIDATE) == pytest.approx(same, abs=1e-4)
    assert judge.wins(REQUESTS, CANDIDATE, CANDIDATE) == [0.5] * len(REQUESTS)

    # Cached per (judge, request, answer A, answer B): a new judge on the same cache runs nothing.
    again = Judge(judge_dir, {"model": "varied"}, cache_dir=tmp_path)
    assert again.wins(REQUESTS, CANDIDATE, OTHER) == wins and again.computed == 0 and again._model is None
    other_judge = Judge(judge_dir, {"model": "another"}, cache_dir=tmp_path)
    other_judge.wins(REQUESTS[:1], CANDIDATE[:1], OTHER[:1])
    assert other_judge.computed == 2


def generation_spec(judge: dict | None = None, **evaluation) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "j", "task": {"type": "instruction"}, "sources": [{"path": "x"}],
                                        "evaluation": {"num_samples": 1, "judge": {"model": "tiny", **(judge or {})},
                                                       **evaluation}})


def scored(outputs: list[str]) -> ModelScores:
    return ModelScores(predictions=outputs, raw_outputs=outputs, loss=1.0,
                       metrics=metrics.score(metrics.Rows("instruction", outputs, [[r] for r in REFS])))


REFS = [f"answer number {i}" for i in range(8)]


def test_report_markdown_mlflow_and_model_card_carry_the_win_rate():
    from sft_dagster.metrics.bootstrap import resample
    from sft_dagster.registry import model_card
    from sft_dagster.tracking import log_evaluation

    test = pd.DataFrame({"example_id": [f"e{i}" for i in range(8)], "prompt": [f"question {i}" for i in range(8)],
                         "response": REFS, "system": [None] * 8})
    base, champion, tuned = scored(["x"] * 8), scored(REFS[:4] + ["x"] * 4), scored(REFS)
    versus_base = [1, 1, 1, 0.5, 1, 0, 1, 0.5]
    judged = {"judge": "tiny", "n": 8, "wins": {"base": versus_base, "champion": [0.5] * 8}, "computed": 16,
              "seconds": 0.25}
    report = build_report(test, base, tuned, generation_spec(), champion, "v2", judged=judged)
    found = report["win_rate"]["versus"]
    assert found["base"]["value"] == pytest.approx(0.75) and (found["base"]["wins"], found["base"]["ties"],
                                                              found["base"]["losses"]) == (5, 2, 1)
    # the metrics' resamples of the rows, the win values' mean on each, the 2.5th and 97.5th percentiles
    sample = resample(8)
    expected = np.percentile(np.asarray(versus_base)[sample.indices].mean(axis=1), [2.5, 97.5])
    assert found["base"]["interval"] == pytest.approx(list(expected))
    assert found["champion"]["value"] == 0.5 and found["champion"]["interval"] == [0.5, 0.5]

    md = render_markdown(report)
    low, high = found["base"]["interval"]
    assert "## Win rate (judge `tiny`)" in md
    assert f"| base | 0.7500 [{low:.4f}, {high:.4f}] | 5 | 2 | 1 |" in md
    assert "| champion v2 | 0.5000 [0.5000, 0.5000] | 0 | 8 | 0 |" in md

    class Run:
        logged: dict = {}

        def log_metrics(self, values):
            self.logged.update(values)

        def log_artifact(self, path, artifact_path=None):
            pass

    logged = log_evaluation(Run(), report, [])
    assert logged["eval.win_rate.tuned_vs_base"] == 0.75 and logged["eval.win_rate.tuned_vs_base.low"] == low
    assert logged["eval.win_rate.tuned_vs_champion.high"] == 0.5
    card = model_card("j", "v3", report, {"method": "lora"}, {"reason": "ok"})
    assert "## Win rate (judge `tiny`)" in card and "| champion v2 | 0.5000" in card

    plain = build_report(test, base, tuned, generation_spec())
    assert "win_rate" not in plain and "Win rate" not in render_markdown(plain)


def test_evaluate_judges_the_candidate_on_the_first_rows_and_reuses_the_judges_cache(tiny_model_dir, judge_dir,
                                                                                         tmp_path):
    from sft_dagster.models import ResolvedModel

    spec = generation_spec({"max_examples": 3}, max_new_tokens=3, few_shot_k=0, retention_examples=0)
    test = pd.DataFrame({"example_id": [f"e{i}" for i in range(4)], "prompt": REQUESTS[:4], "response": REFS[:4],
                         "system": [None] * 4})
    judge = ResolvedModel(path=judge_dir, model_hash="h", tokenizer_hash="t", source="varied tiny")
    run = lambda: evaluate(spec, tiny_model_dir, judge_dir, test, device="cpu", method="full",  # noqa: E731
                           adapter_id="a1", cache_dir=tmp_path, judge=judge)
    report = run()
    win_rate = report["win_rate"]
    assert win_rate["judge"] == "varied tiny" and win_rate["n"] == 3 and set(win_rate["versus"]) == {"base"}
    assert sum(win_rate["versus"]["base"][k] for k in ("wins", "ties", "losses")) == 3
    assert "judge" in report["seconds_by_part"] and list((tmp_path / "judge").glob("*.json"))
    assert win_rate["computed"] > 0  # the candidate (other weights) answers otherwise than the base model
    again = run()["win_rate"]  # the scores and the judge's margins from their caches
    assert again["computed"] == 0 and again["versus"] == win_rate["versus"]
