"""What the task metrics and their bootstrap intervals cost an evaluation report (no model involved).

For each task type, 200 test rows from the shared data sets (../shared/datasets: multi30k en->fr,
dialogsum, GSM8K; generated labels for sentiment) and four scored models (base, base 5-shot, champion,
candidate) whose outputs are the references on a share of the rows and a wrong text elsewhere: the seconds
of `evaluation.task_metrics` for the four models (what `evaluation.score_model` adds) and of `build_report`
(the paired bootstrap: 1000 resamples, two differences) from those scores, which carry their per-row
statistics (`build_report_s`), and from the same scores as read back from the score cache, whose per-row
statistics are computed again (`build_report_from_cache_s`; before the statistics were kept, every report
paid that). Each task type is measured twice in one process; the second pass has the libraries imported.

    .venv/bin/python benchmarks/metrics_cost.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sft_dagster.evaluation import ModelScores, build_report, task_metrics
from sft_dagster.spec import PipelineSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
ROWS = 200
LABELS = ["negative", "neutral", "positive"]


def data(kind: str, rng) -> tuple[list[str], list[str]]:
    if kind == "translation":
        return ((DATA / "multi30k/val.en").read_text().splitlines()[:ROWS],
                (DATA / "multi30k/val.fr").read_text().splitlines()[:ROWS])
    if kind in ("summarization", "qa"):
        name, prompt, answer = ("dialogsum/dev.jsonl", "dialogue", "summary") if kind == "summarization" else \
            ("gsm8k/test.jsonl", "question", "answer")
        rows = [json.loads(line) for line in (DATA / name).read_text().splitlines()[:ROWS]]
        return [r[prompt] for r in rows], [r[answer] for r in rows]
    return [f"review {i}" for i in range(ROWS)], list(rng.choice(LABELS, ROWS))


def measure(kind: str, rng) -> dict:
    prompts, refs = data(kind, rng)
    task = {"type": kind, **({"labels": LABELS} if kind == "sentiment" else {})}
    spec = PipelineSpec.model_validate({"name": "cost", "task": task, "sources": [{"path": "x"}],
                                        "evaluation": {"max_new_tokens": 64}})
    test = pd.DataFrame({"example_id": [f"{i:03d}" for i in range(ROWS)], "prompt": prompts, "response": refs,
                         "system": [None] * ROWS})
    models, scoring = {}, 0.0
    for name, right in (("base", 0.1), ("base_few_shot", 0.3), ("champion", 0.5), ("tuned", 0.6)):
        keep = rng.random(ROWS) < right
        # wrong: the source untranslated (translation), another row's reference (the others)
        outputs = [r if k else (prompts[i] if kind == "translation" else refs[(i + 1) % ROWS])
                   for i, (r, k) in enumerate(zip(refs, keep))]
        scores = ModelScores(predictions=outputs, raw_outputs=outputs, loss=1.0,
                             output_tokens=[len(o.split()) for o in outputs])
        start = time.perf_counter()
        scores.metrics = task_metrics(test, scores, spec)
        scoring += time.perf_counter() - start
        models[name] = scores
    seconds = {}
    for label, scored in (("build_report_from_cache_s", {n: ModelScores(**json.loads(json.dumps(vars(m))))
                                                          for n, m in models.items()}),
                          ("build_report_s", models)):
        start = time.perf_counter()
        report = build_report(test, scored["base"], scored["tuned"], spec, scored["champion"], "v1",
                              scored["base_few_shot"], {"k": 5})
        seconds[label] = round(time.perf_counter() - start, 2)
    return {"task": kind, "metrics": len(report["tuned"]), "score_4_models_s": round(scoring, 2), **seconds,
            "intervals_s": report["intervals"]["seconds"]}


def main() -> None:
    rng = np.random.default_rng(0)
    for attempt in ("first (imports)", "second"):
        for kind in ("sentiment", "translation", "summarization", "qa"):
            print(attempt, json.dumps(measure(kind, rng)))


if __name__ == "__main__":
    main()
