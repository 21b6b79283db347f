"""Where a pipeline's artefacts live: one folder per pipeline under one storage root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STORAGE_ROOT = ".sft"


def default_storage_root() -> Path:
    return Path(os.environ.get("SFT_DAGSTER_STORAGE", DEFAULT_STORAGE_ROOT)).resolve()


@dataclass(frozen=True)
class PipelinePaths:
    root: Path
    pipeline: str

    @property
    def dir(self) -> Path:
        return self.root / self.pipeline

    def table(self, name: str) -> Path:
        return self.dir / "tables" / f"{name}.parquet"

    @property
    def labels_dir(self) -> Path:
        return self.dir / "labels"

    @property
    def default_corrections_file(self) -> Path:
        return self.labels_dir / "corrections.csv"

    @property
    def preference_dir(self) -> Path:
        return self.dir / "preference"

    @property
    def default_candidates_file(self) -> Path:
        return self.preference_dir / "candidates.parquet"

    @property
    def default_rankings_file(self) -> Path:
        return self.preference_dir / "rankings.jsonl"

    @property
    def quality_dir(self) -> Path:
        return self.dir / "quality"

    @property
    def splits_dir(self) -> Path:
        return self.dir / "splits"

    @property
    def training_dir(self) -> Path:
        return self.dir / "training"

    @property
    def reports_dir(self) -> Path:
        return self.dir / "reports"

    @property
    def student_dir(self) -> Path:
        """The `student:` section's artefacts: merged teachers, answer caches, training runs, reports."""
        return self.dir / "student"

    @property
    def model_cache(self) -> Path:
        return self.root / "models"

    @property
    def registry_dir(self) -> Path:
        return self.root / "registry" / self.pipeline
