"""The base of every spec model: unknown keys are errors and values are frozen.

Its own module so that `spec.py` can build its `preference:` section from `preference/config.py`,
whose models share this base, without an import cycle.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
