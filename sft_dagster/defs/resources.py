"""Resources: where artefacts live, what hardware trains, and how asset values are stored."""

from __future__ import annotations

import json
import os
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
        from ..torchkit import pick_device  # torch is imported on first use, not with the definitions

        return pick_device(self.device)


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


class MLflowTracking(dg.ConfigurableResource):
    """Experiment tracking (`sft_dagster/tracking.py`): where training and evaluation log their MLflow runs.

    `tracking_uri` unset: `$MLFLOW_TRACKING_URI`, else SQLite under the storage root (no server).
    `ui_url` is where people open the MLflow UI, for the links in asset metadata: by default the
    tracking server when the URI is http(s), else `make mlflow`'s http://127.0.0.1:5000.
    """

    enabled: bool = True
    tracking_uri: str | None = None
    ui_url: str | None = None
    experiment_prefix: str = ""  # the experiment of pipeline P is `<prefix>P`

    def uri(self, storage_root: str | Path) -> str:
        from ..tracking import URI_ENV, default_tracking_uri

        return self.tracking_uri or os.environ.get(URI_ENV) or default_tracking_uri(storage_root)

    def link_base(self, storage_root: str | Path) -> str:
        from ..tracking import DEFAULT_UI_URL

        uri = self.uri(storage_root)
        return self.ui_url or (uri if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL)

    def start_run(self, storage_root: str | Path, pipeline: str, run_name: str, params: dict, tags: dict):
        """A new MLflow run in the pipeline's experiment, or None when tracking is off."""
        if not self.enabled:
            return None
        from ..tracking import default_artifact_root, start_run

        uri = self.uri(storage_root)
        local = not uri.startswith(("http://", "https://", "databricks"))
        return start_run(uri, f"{self.experiment_prefix}{pipeline}", run_name, params, tags,
                         artifact_root=default_artifact_root(storage_root) if local else None,
                         ui_url=self.link_base(storage_root))


class K8sTraining(dg.ConfigurableResource):
    """Where `training.launcher: k8s` runs a training pod (`training/k8s.py`); the deployment's side.

    Defaults come from the environment of the code location (`deploy/k8s/`): the image holds this
    project and the CUDA build of torch; the claim is the PersistentVolumeClaim of the storage root.
    """

    image: str = os.environ.get("SFT_DAGSTER_IMAGE", "sft-dagster:latest")
    namespace: str = os.environ.get("SFT_DAGSTER_NAMESPACE", "default")
    storage_claim: str = os.environ.get("SFT_DAGSTER_STORAGE_CLAIM", "sft-storage")
    service_account: str | None = os.environ.get("SFT_DAGSTER_TRAINING_SERVICE_ACCOUNT", "sft-training")
    image_pull_policy: str = "IfNotPresent"
    env_from_secrets: list[str] = []  # Secrets whose keys become the pod's env (e.g. MLflow server credentials)
    load_incluster_config: bool | None = None  # None: in-cluster when running in a pod, else the kubeconfig
    kubeconfig_file: str | None = None
