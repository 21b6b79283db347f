"""The code location: every spec in `assets/` (or $SFT_DAGSTER_SPECS) as its own asset group."""

from .defs import build_definitions

defs = build_definitions()
