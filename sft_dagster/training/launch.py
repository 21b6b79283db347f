"""Run training outside the Dagster process: a Pipes subprocess, or torchrun for several processes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import dagster as dg

from .. import artefacts, atomic
from ..spec import PipelineSpec


def worker_command(spec: PipelineSpec, spec_json: Path, model_dir: Path, train_path: Path, val_path: Path,
                   output_dir: Path, device: str, python: str | None = None, torchrun: str | None = None) -> list[str]:
    """The worker's command line; `python` / `torchrun` default to this environment's (a pod passes its own)."""
    args = ["--spec-json", str(spec_json), "--model-dir", str(model_dir), "--train", str(train_path),
            "--validation", str(val_path), "--output-dir", str(output_dir), "--device", device]
    n = spec.training.num_processes
    if n > 1:
        torchrun = torchrun or shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        return [torchrun, "--standalone", f"--nproc-per-node={n}", "-m", "sft_dagster.training.worker", *args]
    return [python or sys.executable, "-m", "sft_dagster.training.worker", *args]


def launch_training_pipes(context: dg.AssetExecutionContext, pipes_client: dg.PipesSubprocessClient, spec: PipelineSpec,
                          model_dir: Path, train_path: Path, val_path: Path, output_dir: Path, device: str = "auto",
                          env: dict[str, str] | None = None) -> dict:
    """Train in a child process (torchrun when num_processes > 1); logs stream back through Pipes.
    `env` is added to the child's environment (the MLflow run its steps are logged to)."""
    spec_json = write_spec_json(spec, output_dir)
    command = worker_command(spec, spec_json, model_dir, train_path, val_path, output_dir, device)
    context.log.info(f"launching: {' '.join(command)}")
    invocation = pipes_client.run(command=command, context=context, env=env)
    return worker_result(invocation, spec, output_dir)


def write_spec_json(spec: PipelineSpec, output_dir: Path) -> Path:
    """The resolved spec the worker reads, in the training run's folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    return atomic.write_json(output_dir / "spec.json", spec.model_dump(mode="json"))


def worker_result(invocation, spec: PipelineSpec, output_dir: Path) -> dict:
    """What the worker reported through Pipes (adapter, metrics, curve), else what it wrote to disk."""
    messages = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and "adapter_dir" in m]
    if messages:
        return messages[-1]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    adapter = output_dir / artefacts.folder_for(spec.training.adapter)
    return {"adapter_dir": str(adapter), "metrics": metrics}
