"""PII detection: libphonenumber for phones, Luhn + issuer prefix for cards; masking keeps values out of metadata."""

from __future__ import annotations

import pandas as pd
import pytest

from sft_dagster.quality import load_suite, run_suite
from sft_dagster.quality.pii import find_pii, mask_pii, pii_kinds

from test_quality_checks import ROOT, TASK, frame  # noqa: E402

PLANTED = {
    "email": ["ana.lopez+shop@example.co.uk", "j.doe@mail.example.com"],
    "phone": ["(415) 555-2671", "+44 20 7946 0958", "650-253-0000", "+1 202 555 0143", "020 7946 0958"],
    "card_number": ["4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005"],
}


@pytest.mark.parametrize("kind, value", [(k, v) for k, vs in PLANTED.items() for v in vs])
def test_planted_values_are_found_and_masked(kind, value):
    text = f"Hi, it's me again: {value}. Thanks!"
    found = find_pii(text)
    assert [(f.kind, text[f.start:f.end]) for f in found] == [(kind, value)]
    assert mask_pii(text) == f"Hi, it's me again: [{kind}]. Thanks!"


@pytest.mark.parametrize("text", [
    "Natalia sold 48 clips in April. 48 / 2 = 24. 48 + 24 = 72 #### 72",
    "She had 16 - 3 - 4 = 9 eggs left, sold at $2 each: 9 * 2 = $18 #### 18",
    "The total is 1200 + 3400 + 5600 + 7800 = 18000 dollars",
    "Order 1234567812345678 was shipped in 2024",  # 16 digits, Luhn-invalid, no issuer prefix
    "from 2019-2023 the price went from 15.99 to 19.99",
    "I was charged 20.00 twice on 12/03/2024, reference 00012345",
])
def test_arithmetic_dates_and_ids_are_not_pii(text):
    assert find_pii(text) == []


def test_the_check_reports_kinds_and_masked_text_never_the_values():
    rows = [(f"review {i} is fine", TASK.labels[i % 3]) for i in range(10)]
    rows += [("call me on (415) 555-2671 or mail ana@example.com", "neutral"),
             ("She had 16 - 3 - 4 = 9 eggs", "neutral")]
    out = {o.name: o for o in run_suite(frame(rows), load_suite("pii", ROOT / "data_checks"), task=TASK)}["no_pii"]
    assert out.failing_ids == ["id10"]
    assert out.metadata["by_kind"] == {"email": 1, "phone": 1}
    shown = out.failing_rows.to_csv()
    assert "email,phone" in shown and "[phone]" in shown and "[email]" in shown
    assert "555-2671" not in shown and "ana@example.com" not in shown
    assert "prompt" not in out.failing_rows.columns


def test_regions_choose_national_formats():
    text = "ring 030 901820 tomorrow"  # a Berlin number in German national format
    assert find_pii(text) == []
    assert [f.kind for f in find_pii(text, ["DE"])] == ["phone"]
    assert mask_pii(pd.NA) is pd.NA  # non-text passes through


def test_previews_mask_pii_before_cutting_cells_and_handle_missing_values():
    from sft_dagster.defs.common import preview

    long_prefix = "x" * 70
    df = pd.DataFrame({"prompt": [f"{long_prefix} write to ana.lopez@example.com", None], "n": [1.5, float("nan")]})
    shown = preview(df).value
    assert "ana.lopez" not in shown and "example.com" not in shown
    assert f"{long_prefix} write" in shown
    assert preview(df.head(0)).value == "_no rows_"
    assert "off" in preview(df, enabled=False).value and "write" not in preview(df, enabled=False).value


def test_a_large_scan_in_worker_processes_equals_the_scan_in_process():
    """pii_kinds splits many texts over spawned workers: the same kinds, in the same order, as one process
    (here forced from 9 texts on, with 2 workers and an uneven last chunk)."""
    texts = ["call +44 20 7946 0958 now", "order 123456789 arrived", "mail me at a.b@example.com",
             "card 4111 1111 1111 1111", "", "2 + 2 = 4", "ring (212) 555-0143 or x@y.org", "nothing here",
             "Tel 020 7946 0958"] * 3
    serial = pii_kinds(texts, workers=1)
    assert serial[:4] == ["phone", "", "email", "card_number"] and serial[6] == "email,phone"
    assert pii_kinds(texts, workers=2, min_texts=9) == serial
