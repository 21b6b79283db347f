"""The base of every spec model: unknown keys are errors and values are frozen.

Its own module: every section model of the `spec` package (`spec/preference.py` among them) shares it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
