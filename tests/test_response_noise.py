"""Planted response noise (benchmarks' ground truth): each kind does what it says, on disjoint rows."""

import pytest

from sft_dagster.quality.noise import plant_response_noise


def _rows(n: int):
    prompts = [f"#Person1#: question number {i} about topic {i % 7}?\n#Person2#: answer {i}." for i in range(n)]
    responses = [f"Person2 answers question {i} about topic {i % 7} in some words." for i in range(n)]
    german = [f"Person2 beantwortet Frage {i} zum Thema {i % 7}." for i in range(n)]
    return prompts, responses, german


def test_each_kind_planted_on_its_own_rows_with_its_own_damage():
    prompts, responses, german = _rows(200)
    rates = {"misaligned": 0.05, "wrong_language": 0.05, "copy": 0.05, "truncated": 0.05}
    noisy, kinds = plant_response_noise(prompts, responses, rates, seed=3, other_language=german)
    assert {k: kinds.count(k) for k in rates} == {k: 10 for k in rates}
    assert kinds.count("") == 160
    for i, kind in enumerate(kinds):
        if kind == "":
            assert noisy[i] == responses[i]
        elif kind == "misaligned":
            assert noisy[i] in responses and noisy[i] != responses[i]
        elif kind == "wrong_language":
            assert noisy[i] == german[i]
        elif kind == "copy":
            assert noisy[i] == prompts[i].split("\n")[0]  # a dialogue's first turn
        else:
            words = responses[i].split()
            cut = noisy[i].split()
            assert 1 <= len(cut) < len(words) and words[:len(cut)] == cut
    again, same = plant_response_noise(prompts, responses, rates, seed=3, other_language=german)
    assert (again, same) == (noisy, kinds)  # seeded


def test_bad_noise_requests_fail_clearly():
    prompts, responses, _ = _rows(10)
    with pytest.raises(ValueError, match="unknown response noise kinds"):
        plant_response_noise(prompts, responses, {"swapped": 0.1})
    with pytest.raises(ValueError, match="needs other_language"):
        plant_response_noise(prompts, responses, {"wrong_language": 0.1})
    with pytest.raises(ValueError, match="eligible"):
        plant_response_noise(prompts, responses, {"copy": 0.6, "truncated": 0.6})
