"""Shared helpers of the preference tests."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sft_dagster.preference.columns import candidate_id_of, prompt_id_of


@pytest.fixture()
def one_torch_thread():
    """Tiny-model tests run single-threaded: their matrices are so small that a second intra-op thread
    only adds synchronisation, which on this shared 2-core machine under load cost 40 ms per linear
    layer call against 0.2 ms with one thread (measured; docs/preference.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_candidates(prompts: dict[str, list[str]]) -> pd.DataFrame:
    rows = []
    for prompt, replies in prompts.items():
        pid = prompt_id_of(prompt)
        for i, reply in enumerate(replies):
            rows.append({"prompt_id": pid, "candidate_id": candidate_id_of(pid, reply), "prompt": prompt,
                         "system": None, "history": None, "response": reply, "sample_index": i})
    return pd.DataFrame(rows)


def record(c: pd.DataFrame, prompt: str, order: list[int], author: str = "ana", kind: str = "full") -> dict:
    """A ranking record of `prompt`'s candidates in `order` (indices into its candidates)."""
    ids = c[c["prompt"] == prompt]["candidate_id"].tolist()
    return {"prompt_id": prompt_id_of(prompt), "kind": kind, "ranking": [[ids[i]] for i in order], "author": author,
            "timestamp": "2026-11-24T10:00:00+00:00", "note": "", "source": "test"}
