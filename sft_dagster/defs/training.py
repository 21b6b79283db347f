"""Training stages: the base model as a local directory, and the fine-tuned adapter.

Each training run lives in its own folder named by its lineage hash (`<pipeline>/training/<hash>/`),
so an adapter is never overwritten in place: a run that is killed leaves an incomplete folder that no
materialization points at, and its checkpoints let the next run with the same lineage resume. The
folder is complete once `lineage.json` is written, after the adapter was renamed into place.
"""


import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd

from .. import artefacts, atomic, formatting, models, prompt_model, training
from ..console import PREFLIGHT
from ..multitask import TASK_COLUMN
from ..schema import frame_hash, lineage_hash_of
from ..spec import TRAIN_ROWS
from ..tracking import StepLogger, TrackedRun
from ..training.k8s import device_kind as k8s_device_kind
from ..progress import Progress
from .common import JSON_IO, PipelineDefs, code_version, numbers, preview
from .guards import require_checks_passed
from .multitask import quarantine_assets, splits_asset
from .resources import ComputeResource, K8sTraining, MLflowTracking, SFTStorage
from .runs import reuse_or_run
from .shared import resolve_base_model

LINEAGE_FILE = "lineage.json"  # written last: its presence marks a complete training run
TRACKING_FILE = "mlflow_run.json"  # the MLflow run of a training run (when tracking is on)
TRAINING_RUNS_KEPT = 3


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the trained weights: an upgrade changes the lineage (retrains)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


def device_kind(device: str) -> str:
    """`cpu`, or the CUDA device's name: a different kind of hardware is a different lineage."""
    if device.startswith("cuda"):
        import torch

        return f"cuda:{torch.cuda.get_device_name(0)}"
    return device


def completed_run(run_dir: Path) -> dict | None:
    """The record of a finished training run in `run_dir`, or None when it never finished."""
    lineage_file, metrics_file = run_dir / LINEAGE_FILE, run_dir / "metrics.json"
    if not (lineage_file.exists() and metrics_file.exists()):
        return None
    metrics = json.loads(metrics_file.read_text())
    adapter_dir = run_dir / artefacts.folder_for(metrics.get("method"))
    if not adapter_dir.is_dir():
        return None
    tracking = run_dir / TRACKING_FILE
    return {"adapter_dir": str(adapter_dir), "lineage": json.loads(lineage_file.read_text()), "metrics": metrics,
            "mlflow": json.loads(tracking.read_text()) if tracking.exists() else None}


def input_data_versions(context: dg.AssetExecutionContext, keys: list[dg.AssetKey]) -> dict[str, str]:
    """The Dagster data version of each input's latest materialization (what this step loaded: the
    pipeline's pool lets no other run write them meanwhile)."""
    out = {}
    for key in keys:
        record = context.instance.get_latest_data_version_record(key)
        tags = record.asset_materialization.tags if record and record.asset_materialization else {}
        out[key.path[-1]] = (tags or {}).get("dagster/data_version", "unknown")
    return out


def prune_training_runs(training_dir: Path, keep: Path, n: int = TRAINING_RUNS_KEPT) -> list[Path]:
    """Remove all but the `n` most recently completed run folders (never `keep`); returns what was removed.
    Promoted adapters are copies in the registry, so nothing promoted is lost."""
    runs = sorted((d for d in training_dir.iterdir() if d.is_dir() and (d / LINEAGE_FILE).exists() and d != keep),
                  key=lambda d: (d / LINEAGE_FILE).stat().st_mtime, reverse=True) if training_dir.exists() else []
    removed = runs[max(0, n - 1):]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def training_inputs(spec, model_dir: Path) -> dict:
    """Content hashes of what else a run reads when the spec asks for it: a distillation teacher other
    than the base model, and replay files. Absent otherwise (a spec without them keeps its lineage)."""
    from ..training.distill import teacher_dir

    out = {}
    distillation = spec.training.distillation
    if distillation.weight > 0 and distillation.teacher != "base":
        out["distillation_teacher_hash"] = models.directory_hashes(teacher_dir(spec, model_dir))[0]
    for name, source in (("replay", spec.training.replay), ("distillation_replay", distillation.replay)):
        used = source.ratio > 0 if name == "replay" else distillation.weight > 0
        if used and source.source not in ("builtin", TRAIN_ROWS):  # the train rows are in training_data_hash
            out[f"{name}_file_hash"] = models.file_digest(spec.resolve(source.source))[:16]
    return out


def model_output(resolved: models.ResolvedModel) -> dg.Output[dict]:
    """A resolved model as an asset value: its record, its content hashes as the data version."""
    record = resolved.to_metadata()
    return dg.Output(record, data_version=dg.DataVersion(f"{resolved.model_hash}-{resolved.tokenizer_hash}"),
                     metadata={**record, "path": dg.MetadataValue.path(str(resolved.path))})


def adapter_lineage(context: dg.AssetExecutionContext, spec, model: dict, train_df: pd.DataFrame, val_df: pd.DataFrame,
                    device: str) -> dict:
    """Everything that shapes a trained adapter: its data, the model it starts from (a `base_model`-like
    record), the spec, the code, library versions and the kind of hardware."""
    columns = ["example_id", "prompt", "response", "system", "split"] + [
        c for c in ("history", TASK_COLUMN) if c in train_df]
    lineage = {
        "training_data_hash": frame_hash(pd.concat([train_df, val_df])[columns]),
        "base_model_hash": model["model_hash"],
        "tokenizer_hash": model["tokenizer_hash"],
        "spec_fingerprint": spec.fingerprint(),
        "code_version": context.assets_def.code_versions_by_key[context.asset_key],
        "method": spec.training.adapter,
        "base_model": model["source"],
        "libraries": library_versions(),
        "device": k8s_device_kind(spec) if spec.training.launcher == "k8s" else device_kind(device),
    }
    return lineage | training_inputs(spec, Path(model["path"]))


def trained_adapter(context: dg.AssetExecutionContext, spec, lineage: dict, training_dir: Path, model_dir: Path,
                    train_df: pd.DataFrame, val_df: pd.DataFrame, device: str, resources: dict,
                    data_version_keys: list[dg.AssetKey], run_name: str, prompt: dict | None = None) -> dg.Output[dict]:
    """Train `spec` in the folder named by the lineage's hash under `training_dir`, or keep the adapter of
    the completed run with that lineage; the adapter's record as an asset value.

    `resources`: storage, compute, mlflow, pipes_subprocess_client, k8s_training. `run_name`: the MLflow
    run's name prefix. `prompt`: a few-shot prompt model (`prompt_model.build_prompt`) written instead of
    training, completed and reused like a training run."""
    storage, mlflow = resources["storage"], resources["mlflow"]
    lineage_hash = lineage_hash_of(lineage)
    run_dir = training_dir / lineage_hash
    method = prompt_model.METHOD if prompt is not None else spec.training.adapter

    def run() -> dict:
        """Write the prompt or train, then complete the run (its lineage written last)."""
        if prompt is not None:
            prompt_model.write(run_dir, prompt)
            metrics = {"method": method, "train_rows": len(train_df), "min_rows_to_train": spec.training.min_rows_to_train,
                       "k": prompt["k"], "few_shot_seed": prompt["seed"]}
            atomic.write_json(run_dir / "metrics.json", metrics)
        else:
            params = {"lineage": lineage, "lineage_hash": lineage_hash,
                      "data_versions": input_data_versions(context, data_version_keys)}
            tags = {"pipeline": spec.name, "lineage_hash": lineage_hash, "method": spec.training.adapter,
                    "dagster_run_id": context.run_id}
            launchers = {"pipes": resources["pipes_subprocess_client"], "k8s": resources["k8s_training"],
                         "storage_root": storage.root}
            metrics = _train(context, spec, resources["compute"], launchers, model_dir, train_df, val_df, run_dir, device,
                             start_tracking=lambda train_spec: mlflow.start_run(
                                 storage.root, spec.name, f"{run_name}-{lineage_hash[:8]}",
                                 {"training": train_spec.training.model_dump(mode="json"), **params}, tags))
        atomic.write_json(run_dir / LINEAGE_FILE, lineage, sort_keys=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the run is complete: resume state is spent
        pruned = prune_training_runs(training_dir, run_dir)
        if pruned:
            context.log.info(f"removed {len(pruned)} older training run folder(s): {[d.name for d in pruned]}")
        return {**completed_run(run_dir), "metrics": metrics}

    done, skipped = reuse_or_run(context, run_dir, completed_run, run, "prompt" if prompt is not None else "adapter")
    metrics = done["metrics"]
    record = {"adapter_dir": done["adapter_dir"], "lineage_hash": lineage_hash, "lineage": lineage,
              "method": method, "metrics": metrics}
    if prompt is not None:
        context.add_output_metadata({"few_shot_examples": preview(
            pd.DataFrame(prompt_model.read(Path(done["adapter_dir"]))["examples"]), enabled=spec.quality.previews)})
    elif spec.training.export_merged and not artefacts.is_whole_model(spec.training.adapter):
        record["merged_model_dir"] = str(run_dir / "merged")
    link = {}
    if done["mlflow"]:
        record["mlflow"] = done["mlflow"]
        link = {"mlflow_run_id": done["mlflow"]["run_id"]}
        if done["mlflow"].get("url"):
            link["mlflow_run"] = dg.MetadataValue.url(done["mlflow"]["url"])
    return dg.Output(record, data_version=dg.DataVersion(lineage_hash), metadata={
        "lineage_hash": lineage_hash, "adapter_dir": dg.MetadataValue.path(done["adapter_dir"]),
        "skipped_training": skipped, "method": method, "lineage": dg.MetadataValue.json(lineage),
        "metrics": dg.MetadataValue.json(metrics), **numbers(metrics), **link,
    })


def build(p: PipelineDefs) -> None:
    spec, K = p.spec, p.key

    @dg.asset(**p.asset_args("base_model", kinds={"transformers", "safetensors"}, code_version=code_version(models),
                             io_manager_key=JSON_IO, description="The spec's base model as a local safetensors directory."))
    def base_model(context: dg.AssetExecutionContext, storage: SFTStorage) -> dg.Output[dict]:
        return model_output(resolve_base_model(spec, storage))

    threshold = spec.training.min_rows_to_train
    description = f"{spec.training.adapter} fine-tune of the base model on the train split." + (
        f" With fewer than {threshold} train rows (training.min_rows_to_train), a few-shot prompt of the base "
        "model instead." if threshold is not None else "")

    @dg.asset(**p.asset_args("fine_tuned_adapter", kinds={"pytorch", "peft"},
                             code_version=code_version(training, formatting), io_manager_key=JSON_IO,
                             ins={"dataset_splits": dg.AssetIn(splits_asset(p)), **p.ins("base_model")},
                             deps=quarantine_assets(p), description=description))
    def fine_tuned_adapter(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                           mlflow: MLflowTracking, pipes_subprocess_client: dg.PipesSubprocessClient,
                           k8s_training: K8sTraining, dataset_splits: pd.DataFrame, base_model: dict) -> dg.Output[dict]:
        require_checks_passed(context, p.blocking_checks)
        train_df = dataset_splits[dataset_splits["split"] == "train"].reset_index(drop=True)
        val_df = dataset_splits[dataset_splits["split"] == "validation"].reset_index(drop=True)
        device = compute.resolved_device()
        resources = {"storage": storage, "compute": compute, "mlflow": mlflow,
                     "pipes_subprocess_client": pipes_subprocess_client, "k8s_training": k8s_training}
        prompt = None
        if prompt_model.applies(spec, len(train_df)):  # too few rows to train: the few-shot prompt is the model
            prompt = prompt_model.build_prompt(spec, train_df, base_model)
            lineage = prompt_model.lineage(prompt, code_version(prompt_model))
            context.log.info(f"the train split has {len(train_df)} rows, fewer than training.min_rows_to_train "
                             f"{threshold}: no training; the model is a {prompt['k']}-shot prompt of the base model "
                             f"(method {prompt_model.METHOD}, examples {lineage['example_ids']})")
        else:
            lineage = adapter_lineage(context, spec, base_model, train_df, val_df, device)
        return trained_adapter(context, spec, lineage, p.paths(storage).training_dir, Path(base_model["path"]),
                               train_df, val_df, device, resources, [K("dataset_splits"), K("base_model")], spec.name,
                               prompt=prompt)

    p.assets += [base_model, fine_tuned_adapter]


def _train(context, spec, compute, launchers: dict, model_dir: Path, train_df: pd.DataFrame,
           val_df: pd.DataFrame, run_dir: Path, device: str, start_tracking=lambda train_spec: None) -> dict:
    """Pre-flight, optional hyperparameter search, then the training run itself (in process or launched),
    tracked in MLflow when `start_tracking(spec actually trained)` returns a run."""
    if spec.training.launcher != "k8s":  # a pod's hardware is not this process's: no timed step here
        plan = training.preflight(spec, model_dir, train_df, device=device, tasks=spec.task_specs() if spec.tasks else None)
        context.log.info(f"{PREFLIGHT}{json.dumps(plan)}")
        context.add_output_metadata({"preflight": dg.MetadataValue.json(plan)})
    train_spec = spec
    if spec.training.search.strategy != "none":
        from ..training.search import search_hyperparameters, with_overrides

        best, trials = search_hyperparameters(spec, model_dir, train_df, val_df, run_dir / "search", device=device,
                                              log=context.log.info)
        train_spec = with_overrides(spec, best)
        context.add_output_metadata({"search_best": dg.MetadataValue.json(best),
                                     "search_trials": preview(pd.DataFrame(trials), n=100)})
    tracked: TrackedRun | None = start_tracking(train_spec)
    if tracked is not None:
        atomic.write_json(run_dir / TRACKING_FILE, tracked.to_record())
        context.log.info(f"MLflow run {tracked.run_id}: {tracked.url or tracked.tracking_uri}")
    try:
        if spec.training.launcher in ("subprocess", "k8s") or spec.training.num_processes > 1:
            from ..training.k8s import launch_training_k8s
            from ..training.launch import launch_training_pipes

            # The worker reads exactly the rows this asset was given, from the run's own folder.
            train_path = atomic.write_parquet(run_dir / "data" / "train.parquet", train_df)
            val_path = atomic.write_parquet(run_dir / "data" / "validation.parquet", val_df)
            env = tracked.env() if tracked else None
            if spec.training.launcher == "k8s":
                result = launch_training_k8s(context, launchers["k8s"], train_spec, model_dir, train_path, val_path,
                                             run_dir, launchers["storage_root"], env=env)
            else:
                result = launch_training_pipes(context, launchers["pipes"], train_spec, model_dir, train_path,
                                               val_path, run_dir, device=device, env=env)
            adapter_dir, metrics = Path(result["adapter_dir"]), result["metrics"]
            curve = result.get("curve", [])
        else:
            steps = StepLogger(tracked) if tracked else None
            progress = Progress(context.log.info, on_step=[steps] if steps else [])
            result = training.train(train_spec, model_dir, train_df, val_df, run_dir, device=device,
                                    log=context.log.info, on_metrics=progress,
                                    tasks=spec.task_specs() if spec.tasks else None)
            if steps:
                steps.flush()
            adapter_dir, metrics, curve = result.adapter_dir, result.metrics, progress.curve
    except BaseException:
        if tracked is not None:
            tracked.finish("FAILED")
        raise
    if tracked is not None:
        tracked.log_metrics({f"summary.{k}": v for k, v in metrics.items()})
        tracked.finish()
    if curve:  # the curve a person reads on the asset's page (every logged step and every evaluation)
        context.add_output_metadata({"loss_curve": dg.MetadataValue.md(pd.DataFrame(curve).to_markdown(index=False))})
    if spec.training.export_merged and not artefacts.is_whole_model(spec.training.adapter):
        merged = artefacts.merge_adapter(model_dir, adapter_dir, run_dir / "merged")
        context.add_output_metadata({"merged_model_dir": dg.MetadataValue.path(str(merged))})
    return metrics
