"""Data-quality suites: `data_checks/<name>.yaml`, validated when definitions load.

A suite lists checks; each is either a great-expectations expectation (by its GX name, snake_case or
CamelCase, with its arguments) or one of our SFT checks. Each is blocking (it stops training) or a
warning. Unknown names and bad arguments fail at load time with file, line and key, so
`dagster definitions validate` catches them before any run.

    checks:
      - name: prompt_not_null
        expectation: expect_column_values_to_not_be_null
        kwargs: {column: prompt}
        blocking: true
      - name: fits_max_length
        sft_check: token_length
        blocking: true
    include: [pii]        # other suites whose checks are added
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..spec import SUITE_NAME, _yaml_line
from .check_registry import CheckDef
from .sft_checks import SFT_CHECKS


class SuiteError(ValueError):
    """A suite file that cannot be used; the message names file, line and key."""


def gx_class_name(name: str) -> str:
    """`expect_column_values_to_not_be_null` -> `ExpectColumnValuesToNotBeNull`."""
    if "_" not in name and name[:1].isupper():
        return name
    return "".join(part.capitalize() for part in name.split("_"))


class CheckEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    description: str | None = None
    blocking: bool = True
    expectation: str | None = None
    sft_check: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> "CheckEntry":
        if (self.expectation is None) == (self.sft_check is None):
            raise ValueError("give exactly one of `expectation` or `sft_check`")
        if self.sft_check is not None:
            SFT_CHECKS[self.sft_check].parse(self.kwargs)  # raises on unknown names or bad arguments
        if self.expectation is not None:
            build_expectation(self)  # raises on unknown names or bad arguments
        return self

    def describe(self) -> str:
        if self.description:
            return self.description
        if self.sft_check:
            return SFT_CHECKS.description(self.sft_check)
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.expectation}({args})"


def build_expectation(entry: CheckEntry):
    import great_expectations as gx

    cls = getattr(gx.expectations, gx_class_name(entry.expectation), None)
    if cls is None:
        raise ValueError(f"unknown great-expectations expectation {entry.expectation!r}")
    try:
        return cls(**entry.kwargs, meta={"check_name": entry.name})
    except Exception as exc:  # GX raises pydantic (v1) validation errors
        message = re.sub(r"\s+", " ", str(exc))
        raise ValueError(f"bad arguments for {entry.expectation}: {message}") from None


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    checks: list[CheckEntry] = Field(default_factory=list)
    include: list[str] = Field(default_factory=list)
    source: Path | None = Field(default=None, exclude=True)

    def check_names(self) -> list[CheckDef]:
        return [CheckDef(c.name, c.blocking, c.describe()) for c in self.checks]


def load_suite(name: str, checks_dir: Path, _seen: tuple[str, ...] = ()) -> Suite:
    """Load `checks_dir/<name>.yaml` and the suites it includes; check names must be unique."""
    if not isinstance(name, str) or not SUITE_NAME.fullmatch(name):
        where = f"{Path(checks_dir) / (_seen[-1] + '.yaml')}: include" if _seen else "quality.suite"
        raise SuiteError(f"{where}: {name!r} is not a suite name: suites are files data_checks/<name>.yaml, "
                         "named by letters, digits, _ and - (no paths)")
    if name in _seen:
        raise SuiteError(f"suite include cycle: {' -> '.join([*_seen, name])}")
    path = Path(checks_dir) / f"{name}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in Path(checks_dir).glob("*.yaml"))
        raise SuiteError(f"{path}: no such data-quality suite {name!r}; available: {available}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SuiteError(f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML") from None
    try:
        suite = Suite.model_validate({"name": name, **data})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = err["loc"]
            line = _yaml_line(text, loc)
            problems.append(f"{path}:{line or '?'}: {'.'.join(map(str, loc))}: {err['msg'].removeprefix('Value error, ')}")
        raise SuiteError("invalid data-quality suite\n  " + "\n  ".join(problems)) from None
    checks = list(suite.checks)
    for included in suite.include:
        checks += load_suite(included, checks_dir, (*_seen, name)).checks
    names = [c.name for c in checks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SuiteError(f"{path}: checks: duplicate check names {duplicates} (after includes)")
    return suite.model_copy(update={"checks": checks, "source": path})
