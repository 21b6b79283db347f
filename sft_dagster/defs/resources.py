"""Resources: where artefacts live, what hardware trains, and how asset values are stored."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd

from .. import atomic
from ..storage import PipelinePaths, default_storage_root


class SFTStorage(dg.ConfigurableResource):
    """All artefacts (tables, adapters, reports, registry, model cache) under one root."""

    root: str = str(default_storage_root())

    def paths(self, pipeline: str) -> PipelinePaths:
        return PipelinePaths(Path(self.root).resolve(), pipeline)


class ComputeResource(dg.ConfigurableResource):
    """The device training and evaluation use: `auto` picks CUDA when present."""

    device: str = "auto"

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


class _PipelineIOManager(dg.ConfigurableIOManager):
    """Values at <root>/<pipeline>/<folder>/<asset><suffix>, written atomically."""

    root: str = str(default_storage_root())

    def _path(self, key: dg.AssetKey, folder: str, suffix: str) -> Path:
        pipeline, *rest = key.path
        return PipelinePaths(Path(self.root).resolve(), pipeline).dir / folder / ("__".join(rest) + suffix)

    def _existing(self, context: dg.InputContext, folder: str, suffix: str) -> Path:
        path = self._path(context.asset_key, folder, suffix)
        if not path.exists():
            raise FileNotFoundError(
                f"{context.asset_key.to_user_string()} has never been materialized (no {path}); materialize it "
                "first (a blocking check upstream of it may have stopped an earlier run)")
        return path


class ParquetIOManager(_PipelineIOManager):
    """DataFrames as Parquet (pyarrow) at <root>/<pipeline>/tables/<asset>.parquet."""

    def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
        path = atomic.write_parquet(self._path(context.asset_key, "tables", ".parquet"), obj)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        return pd.read_parquet(self._existing(context, "tables", ".parquet"), engine="pyarrow")


class JsonIOManager(_PipelineIOManager):
    """Records of model artefacts (where a model is, its hashes, lineage, metrics, a report) as JSON at
    <root>/<pipeline>/records/<asset>.json; the artefacts themselves stay in their own folders."""

    def handle_output(self, context: dg.OutputContext, obj: dict) -> None:
        path = atomic.write_json(self._path(context.asset_key, "records", ".json"), obj)
        context.add_output_metadata({"record": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> dict:
        return json.loads(self._existing(context, "records", ".json").read_text())
