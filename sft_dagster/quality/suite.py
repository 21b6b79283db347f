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

SFT_CHECKS = {
    "token_length": "prompt + response fit the training max_length in the base model's tokenizer (nothing is truncated silently)",
    "empty_text": "no empty or whitespace-only text in `columns`",
    "control_tokens": "no chat control tokens (e.g. <|im_start|>) inside the data",
    "label_in_set": "every label is one of the task's labels",
    "class_balance": "the rarest label has at least `min_share` of the rows, or `min_share_of_uniform` x 1/K for K labels",
    "exact_duplicates": "at most `max_rate` of rows repeat an earlier row exactly",
    "near_duplicates": "at most `max_rate` of rows repeat an earlier row up to case, punctuation and spacing",
    "split_leakage": "no validation/test prompt also appears (normalised) in an earlier split",
    "pii": "no e-mail addresses, phone numbers (libphonenumber, national formats of `regions`) or Luhn-valid card numbers",
}
ROW_LEVEL_SFT_CHECKS = {"token_length", "empty_text", "control_tokens", "label_in_set", "exact_duplicates",
                        "near_duplicates", "split_leakage", "pii"}
# Arguments each SFT check accepts (unknown ones fail at load time, like GX's).
SFT_CHECK_KWARGS = {
    "token_length": {"mostly"},
    "empty_text": {"columns", "mostly"},
    "control_tokens": {"columns", "mostly", "tokens", "tokenizer_special_tokens"},
    "label_in_set": {"mostly"},
    "class_balance": {"min_share", "min_share_of_uniform"},
    "exact_duplicates": {"max_rate"},
    "near_duplicates": {"columns", "max_rate", "ignore_digits"},
    "split_leakage": {"column", "ignore_digits", "mostly"},
    "pii": {"columns", "mostly", "regions"},
}


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
            if self.sft_check not in SFT_CHECKS:
                raise ValueError(f"unknown sft_check {self.sft_check!r}; known: {sorted(SFT_CHECKS)}")
            unknown = sorted(set(self.kwargs) - SFT_CHECK_KWARGS[self.sft_check])
            if unknown:
                raise ValueError(f"bad arguments for {self.sft_check}: unknown {unknown}; "
                                 f"accepted: {sorted(SFT_CHECK_KWARGS[self.sft_check])}")
            _check_sft_values(self.sft_check, self.kwargs)
        if self.expectation is not None:
            build_expectation(self)  # raises on unknown names or bad arguments
        return self

    def describe(self) -> str:
        if self.description:
            return self.description
        if self.sft_check:
            return SFT_CHECKS[self.sft_check]
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.expectation}({args})"


def _check_sft_values(kind: str, kwargs: dict[str, Any]) -> None:
    for key in ("mostly", "max_rate", "min_share", "min_share_of_uniform"):
        if key in kwargs:
            value = kwargs[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"bad arguments for {kind}: {key} must be a number in [0, 1], got {value!r}")
    for key in ("columns", "tokens", "regions"):
        if key in kwargs and (not isinstance(kwargs[key], list) or not kwargs[key]
                              or not all(isinstance(v, str) and v for v in kwargs[key])):
            raise ValueError(f"bad arguments for {kind}: {key} must be a non-empty list of strings")
    for key in ("ignore_digits", "tokenizer_special_tokens"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise ValueError(f"bad arguments for {kind}: {key} must be true or false")
    if "column" in kwargs and not isinstance(kwargs["column"], str):
        raise ValueError(f"bad arguments for {kind}: column must be a column name")


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

    def check_names(self) -> list[tuple[str, bool, str]]:
        return [(c.name, c.blocking, c.describe()) for c in self.checks]


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
