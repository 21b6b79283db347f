"""Training as its own process: `python -m sft_dagster.training.worker`, alone or under torchrun.

Launched by the `fine_tuned_adapter` asset through Dagster Pipes (`PipesSubprocessClient`), it
streams its log lines and per-step metrics back to the asset's run; under `torchrun --nproc-per-node
N` every rank runs this module, gradients are summed across ranks (gloo on CPU, nccl on CUDA) and
rank 0 writes the checkpoints, the adapter and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import ExitStack
from pathlib import Path

import pandas as pd


def _pipes(stack: ExitStack):
    """The Dagster Pipes context when launched by Pipes (rank 0 only), else None."""
    if "DAGSTER_PIPES_CONTEXT" not in os.environ or int(os.environ.get("RANK", "0")) != 0:
        return None
    from dagster_pipes import open_dagster_pipes

    return stack.enter_context(open_dagster_pipes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec-json", required=True, help="the resolved pipeline spec as JSON")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--train", required=True, help="train split (Parquet)")
    parser.add_argument("--validation", required=True, help="validation split (Parquet)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from ..spec import parse_spec
    from ..tracking import step_logger_from_env
    from ..progress import Progress
    from .methods.sft import train

    spec = parse_spec(json.loads(Path(args.spec_json).read_text()), args.spec_json)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    with ExitStack() as stack:
        pipes = _pipes(stack)
        log = pipes.log.info if pipes else print
        steps = step_logger_from_env()  # MLflow, when the launcher passed a run (rank 0)
        progress = Progress(log, on_step=[steps] if steps else [])
        result = train(spec, Path(args.model_dir), pd.read_parquet(args.train), pd.read_parquet(args.validation),
                       Path(args.output_dir), device=args.device, log=log, on_metrics=progress)
        if steps:
            steps.flush()
        if pipes:
            pipes.report_custom_message({"adapter_dir": str(result.adapter_dir), "metrics": result.metrics,
                                         "curve": progress.curve})
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
