"""Resources: where artefacts live and what hardware trains."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd

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


class ParquetIOManager(dg.ConfigurableIOManager):
    """DataFrames as Parquet (pyarrow) at <root>/<pipeline>/tables/<asset>.parquet."""

    root: str = str(default_storage_root())

    def _path(self, key: dg.AssetKey) -> Path:
        pipeline, *rest = key.path
        return PipelinePaths(Path(self.root).resolve(), pipeline).table("__".join(rest))

    def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
        path = self._path(context.asset_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".parquet.tmp")
        obj.to_parquet(tmp, engine="pyarrow", index=False)
        tmp.replace(path)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        return pd.read_parquet(self._path(context.asset_key), engine="pyarrow")
