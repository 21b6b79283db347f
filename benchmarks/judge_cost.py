"""The pairwise judge (sft_dagster/judge.py) with the embedded SmolLM2-135M-Instruct as judge, on CPU.

On the first ROWS English->French captions of multi30k (../shared/datasets/multi30k/val.{en,fr}), the
request "Translate to French: <caption>" and two answers: the reference translation and a bad one (the
caption untranslated, or the reference of another row). For each, judged in both orders:
- position bias: the share of pairs where the judge answers "A" in both orders (and "B" in both);
- the win rate of the reference over the bad answer (a judge that reads the answers puts it above 0.5),
  and the judge's mean probability of the reference over both orders (P(letter) normalised over A and B):
  whether a judge too position-biased to win any pair still leans the right way;
- the seconds per row of judging the candidate against base and champion (two pairs, both orders: four
  forward passes), against the seconds per row of one greedy generation of the same prompts
  (`evaluation.generate`, max_new_tokens 48): what a judge adds to an evaluation stage that generates
  for base, 5-shot base, champion and candidate.

    .venv/bin/python benchmarks/judge_cost.py
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import torch

from sft_dagster import evaluation, judge, models
from sft_dagster.spec import ModelSpec, TaskSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "multi30k"
ROWS = 40
BATCH = 8


def main() -> None:
    torch.set_num_threads(2)
    resolved = models.resolve_base_model(ModelSpec(), Path(".sft/model_cache"))
    en = (DATA / "val.en").read_text().splitlines()[:ROWS]
    fr = (DATA / "val.fr").read_text().splitlines()[:ROWS]
    task = TaskSpec(type="translation", prompt_template="Translate to French: {prompt}")
    requests = [task.prompt_template.format(prompt=p) for p in en]
    j = judge.Judge(resolved.path, {"model": resolved.model_hash}, "cpu", BATCH)
    j.model()  # loading apart
    out = {"rows": ROWS, "judge": resolved.source}
    for name, bad in (("untranslated", en), ("another_row", fr[1:] + fr[:1])):
        start = time.perf_counter()
        first = j.margins(requests, fr, bad)
        second = j.margins(requests, bad, fr)
        seconds = time.perf_counter() - start
        wins = judge.pairwise_wins(first, second)
        leaning = sum(1 / (1 + math.exp(-a)) + 1 / (1 + math.exp(b)) for a, b in zip(first, second)) / (2 * ROWS)
        out[name] = {"both_orders_A": sum(a > 0 and b > 0 for a, b in zip(first, second)) / ROWS,
                     "both_orders_B": sum(a < 0 and b < 0 for a, b in zip(first, second)) / ROWS,
                     "reference_win_rate": sum(wins) / ROWS, "reference_mean_probability": round(leaning, 4),
                     "wins_ties_losses": [wins.count(1.0), wins.count(0.5), wins.count(0.0)],
                     "seconds_per_pair_both_orders": round(seconds / ROWS, 3)}
    judged = sum(out[n]["seconds_per_pair_both_orders"] for n in ("untranslated", "another_row"))  # two pairs a row
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    rows = pd.DataFrame({"prompt": en, "system": [None] * ROWS})
    start = time.perf_counter()
    evaluation.generate(model, tokenizer, rows, task, 48, 16, "cpu")
    generation = (time.perf_counter() - start) / ROWS
    out["judge_seconds_per_row_vs_base_and_champion"] = round(judged, 3)
    out["generation_seconds_per_row_one_model"] = round(generation, 3)
    out["judge_vs_four_generations"] = round(judged / (4 * generation), 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
