"""No function over 80 lines where the issue asks for small steps (the training loop and its methods)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80
CHECKED = ["sft_dagster/training", "sft_dagster/torchkit.py"]


def long_functions(path: Path, limit: int = MAX_LINES) -> list[str]:
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    found = []
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{file.relative_to(path.parent)}:{node.lineno}: {node.name} has {lines} lines")
    return found


@pytest.mark.parametrize("where", CHECKED)
def test_no_function_is_over_80_lines(where):
    assert long_functions(ROOT / where) == []


def test_a_long_function_is_found(tmp_path):
    (tmp_path / "m.py").write_text("def short():\n    pass\n\n\ndef long():\n" + "    x = 1\n" * 80)
    assert long_functions(tmp_path / "m.py") == ["m.py:5: long has 81 lines"]
