"""The shared generation data sets as canonical frames, with planted response noise and its truth.

Used by `response_findings.py` (does each finding catch its kind?) and `gated_generation.py` (does
gating them train a better model?). Real data from ../shared/datasets (see its README for licences):

- translation: Multi30k task 1 validation captions, English -> French (`val.en`, `val.fr`); the
  wrong-language noise is the same caption's German translation (`val.de`), as a mixed-up export has it;
- summarization: DialogSum's dev dialogues and their human summaries;
- qa: GSM8K test questions and worked answers.

Noise (`sft_dagster.quality.noise.plant_response_noise`): misaligned (another row's response),
wrong_language (translation only), copy (an untranslated caption, a dialogue's first turn, the
question itself), truncated (cut at a word boundary at 30-70% of the words).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sft_dagster.quality.noise import plant_response_noise
from sft_dagster.schema import content_hash

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"

TASKS = {
    "translation": {"type": "translation", "response_language": "fr", "prompt_language": "en",
                    "prompt_template": "Translate this English sentence into French. Answer with the translation only.\n\n{prompt}"},
    "summarization": {"type": "summarization", "response_language": "en",
                      "prompt_template": "Summarize the dialogue in one or two sentences.\n\n{prompt}"},
    "qa": {"type": "qa", "response_language": "en",
           "prompt_template": "Solve the problem. Show your working, then give the final answer after ####.\n\n{prompt}"},
}
NOISE = {"translation": ("misaligned", "wrong_language", "copy", "truncated"),
         "summarization": ("misaligned", "copy", "truncated"),
         "qa": ("misaligned", "copy", "truncated")}


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n")


def clean_rows(task: str, data: Path = SHARED, limit: int | None = None) -> tuple[pd.DataFrame, list[str] | None]:
    """(prompt, response, source_line) of a data set, and the other-language responses where it has them."""
    other = None
    if task == "translation":
        en, fr, de = (_lines(data / "multi30k" / f"val.{x}") for x in ("en", "fr", "de"))
        frame, other = pd.DataFrame({"prompt": en, "response": fr}), de
    elif task == "summarization":
        rows = [json.loads(line) for line in _lines(data / "dialogsum" / "dev.jsonl")]
        frame = pd.DataFrame({"prompt": [r["dialogue"] for r in rows], "response": [r["summary"] for r in rows]})
    elif task == "qa":
        rows = [json.loads(line) for line in _lines(data / "gsm8k" / "test.jsonl")]
        frame = pd.DataFrame({"prompt": [r["question"] for r in rows], "response": [r["answer"] for r in rows]})
    else:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    frame["source_line"] = np.arange(1, len(frame) + 1)
    if limit is not None:
        frame, other = frame.head(limit), (other[:limit] if other else None)
    return frame.reset_index(drop=True), other


def as_examples(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Canonical example rows (the columns ingest gives), ids by content as ingest makes them."""
    hashes = [content_hash(None, p, r) for p, r in zip(frame["prompt"], frame["response"])]
    repeat = pd.Series(hashes).groupby(hashes).cumcount()
    ids = [h if k == 0 else f"{h}~{k}" for h, k in zip(hashes, repeat)]
    return pd.DataFrame({"example_id": ids, "content_hash": hashes, "prompt": frame["prompt"].astype(str).to_numpy(),
                         "response": frame["response"].astype(str).to_numpy(), "system": None, "history": None,
                         "source_file": source, "source_line": frame["source_line"].to_numpy(), "metadata": "{}",
                         "reviewed": False})


def noisy_examples(task: str, rate: float, seed: int, data: Path = SHARED, limit: int | None = None,
                   kinds: tuple[str, ...] | None = None) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    """(noisy examples, planted kind per row ("" = clean), the clean examples) for `rate` of each kind."""
    frame, other = clean_rows(task, data, limit)
    kinds = kinds or NOISE[task]
    noisy, planted = plant_response_noise(frame["prompt"].tolist(), frame["response"].tolist(),
                                          {k: rate for k in kinds}, seed=seed, other_language=other)
    examples = as_examples(frame.assign(response=noisy), f"{task}.jsonl")
    return examples, pd.Series(planted, index=examples.index, name="planted"), as_examples(frame, f"{task}.jsonl")


def write_report(path: Path | None, doc: dict) -> str:
    """The benchmark's JSON document, written to `path` (its folder made) when given; returned as text."""
    text = json.dumps(doc, indent=1, default=str)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text
