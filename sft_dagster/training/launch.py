"""Run training outside the Dagster process: a Pipes subprocess, or torchrun for several processes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import dagster as dg

from .. import atomic
from ..spec import PipelineSpec


def worker_command(spec: PipelineSpec, spec_json: Path, model_dir: Path, train_path: Path, val_path: Path,
                   output_dir: Path, device: str) -> list[str]:
    args = ["--spec-json", str(spec_json), "--model-dir", str(model_dir), "--train", str(train_path),
            "--validation", str(val_path), "--output-dir", str(output_dir), "--device", device]
    n = spec.training.num_processes
    if n > 1:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        return [torchrun, "--standalone", f"--nproc-per-node={n}", "-m", "sft_dagster.training.worker", *args]
    return [sys.executable, "-m", "sft_dagster.training.worker", *args]


def launch_training_pipes(context: dg.AssetExecutionContext, pipes_client: dg.PipesSubprocessClient, spec: PipelineSpec,
                          model_dir: Path, train_path: Path, val_path: Path, output_dir: Path, device: str = "auto",
                          env: dict[str, str] | None = None) -> dict:
    """Train in a child process (torchrun when num_processes > 1); logs stream back through Pipes.
    `env` is added to the child's environment (the MLflow run its steps are logged to)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    spec_json = output_dir / "spec.json"
    atomic.write_json(spec_json, spec.model_dump(mode="json"))
    command = worker_command(spec, spec_json, model_dir, train_path, val_path, output_dir, device)
    context.log.info(f"launching: {' '.join(command)}")
    invocation = pipes_client.run(command=command, context=context, env=env)
    messages = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and "adapter_dir" in m]
    if messages:
        return messages[-1]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    adapter = output_dir / ("model" if spec.training.method == "full" else "adapter")
    return {"adapter_dir": str(adapter), "metrics": metrics}
