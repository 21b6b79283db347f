"""One way to declare a check, whatever runs it.

- `CheckDef` (name, blocking, description) is what the Dagster layer turns into an `AssetCheckSpec`:
  a suite's checks (`Suite.check_names`), the cleanlab and response-finding gates, the pair gates.
- `CheckRegistry.register` adds a check implementation under its name, with its description and the
  pydantic model of the arguments it takes. Suites validate `kwargs` against that model when they
  load (unknown or bad arguments fail naming file, line and key), and `run` calls the function.

A new SFT check is one registered function (`quality/sft_checks.py`) and its line in a suite YAML.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

FAILING_ROWS_SHOWN = 20


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    blocking: bool
    description: str
    metadata: dict = field(default_factory=dict)
    failing_ids: list[str] = field(default_factory=list)
    failing_rows: pd.DataFrame = field(default_factory=pd.DataFrame)


class CheckDef(NamedTuple):
    """A check as a Dagster asset check declares it."""

    name: str
    blocking: bool
    description: str


class SuiteEntry(Protocol):
    """What a registered check reads of the suite line that runs it (`suite.CheckEntry`; the suite module
    imports the checks, so they name this shape rather than import it back)."""

    name: str
    blocking: bool
    sft_check: str | None
    kwargs: dict[str, Any]

    def describe(self) -> str: ...


class NoArgs(BaseModel):
    """The arguments of a check that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class RegisteredCheck:
    name: str
    description: str
    args: type[BaseModel]
    run: Callable[..., CheckOutcome]

    def parse(self, kwargs: dict[str, Any]) -> BaseModel:
        """The check's arguments; a ValueError saying which are unknown or bad."""
        accepted = sorted(self.args.model_fields)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"bad arguments for {self.name}: unknown {unknown}; accepted: {accepted}")
        try:
            return self.args.model_validate(kwargs)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))} {e['msg'].removeprefix('Value error, ')}"
                                 for e in exc.errors())
            raise ValueError(f"bad arguments for {self.name}: {problems}") from None


class CheckRegistry:
    """Checks of one kind by name (`kind` names them in errors, e.g. "sft_check")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._checks: dict[str, RegisteredCheck] = {}

    def register(self, name: str, description: str, args: type[BaseModel] = NoArgs):
        """Decorator: `fn` runs the check `name`; `args` is the model of its `kwargs`."""
        def add(fn: Callable[..., CheckOutcome]) -> Callable[..., CheckOutcome]:
            if name in self._checks:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._checks[name] = RegisteredCheck(name, description, args, fn)
            return fn
        return add

    def __contains__(self, name: object) -> bool:
        return name in self._checks

    def __getitem__(self, name: str) -> RegisteredCheck:
        if name not in self._checks:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self._checks)}")
        return self._checks[name]

    def names(self) -> list[str]:
        """In the order they were registered."""
        return list(self._checks)

    def definitions(self, blocking: Callable[[str], bool]) -> list[CheckDef]:
        """Every registered check as an asset check declares it; `blocking(name)` from the config."""
        return [CheckDef(c.name, blocking(c.name), c.description) for c in self._checks.values()]

    def description(self, name: str) -> str:
        return self[name].description
