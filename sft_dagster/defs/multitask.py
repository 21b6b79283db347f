"""Multi-task specs (`tasks:`): each further task's data pipeline, and the mix one adapter trains on.

Every task keeps its own data stages (ingest, labels, data-quality suite, cleanlab, curation,
quarantine accounting, splits) as a single-task pipeline would, under `<pipeline>__<task>/...`; their
blocking checks join the pipeline's, so a failing gate on any task blocks training, evaluation and
promotion. `task_mix` samples the tasks' train rows into one train set (sft_dagster/multitask.py) and
keeps each task's validation and test rows whole. A single-task spec gets none of these assets.
"""

import dagster as dg
import pandas as pd

from .. import multitask
from ..quality import load_suite
from ..schema import frame_hash
from ..spec import MAIN_TASK
from ..splits import in_split_order
from .common import PipelineDefs, code_version
from .guards import require_checks_passed


def build_task_pipelines(p: PipelineDefs, checks_dir, data_stages) -> None:
    """The data sub-pipeline of each further task; its assets, checks and blocking gates join `p`'s."""
    for entry in p.spec.tasks:
        sub_spec = p.spec.task_pipeline(entry.name)
        sub = PipelineDefs(spec=sub_spec, suite=load_suite(sub_spec.quality.suite, checks_dir), group=p.spec.name)
        for stage in data_stages:
            stage.build(sub)
        p.assets += sub.assets
        p.checks += sub.checks
        p.blocking_checks += sub.blocking_checks
        p.task_pipelines[entry.name] = sub


def splits_asset(p: PipelineDefs) -> dg.AssetKey:
    """What training and evaluation read: the mix for a multi-task spec, else the pipeline's splits."""
    return p.key("task_mix") if p.spec.tasks else p.key("dataset_splits")


def quarantine_assets(p: PipelineDefs) -> list[dg.AssetKey]:
    return [p.key("quarantine"), *(sub.key("quarantine") for sub in p.task_pipelines.values())]


def build(p: PipelineDefs) -> None:
    spec = p.spec
    if not spec.tasks:
        return
    pipelines = {MAIN_TASK: p, **p.task_pipelines}

    # Each task's splits as an input, named by the task's position (task names need not be identifiers).
    inputs = {f"task_{i}": name for i, name in enumerate(pipelines)}

    @dg.asset(**p.asset_args("task_mix", kinds={"pandas"}, code_version=code_version(multitask),
                             ins={arg: dg.AssetIn(pipelines[name].key("dataset_splits")) for arg, name in inputs.items()},
                             description=f"The train rows of {len(pipelines)} tasks sampled into one train set "
                                         f"({spec.mixing.strategy}); every task's validation and test rows kept."))
    def task_mix(context: dg.AssetExecutionContext, **task_splits: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        # Every task's gates (they are all in p.blocking_checks) before any task's splits are used: a
        # task's splits may be from an earlier run whose gates have failed since.
        require_checks_passed(context, p.blocking_checks)
        splits = {name: in_split_order(task_splits[arg]) for arg, name in inputs.items()}
        mixed = multitask.mix_splits(splits, spec.mixing_weights(), spec.mixing.seed, spec.mixing.strategy,
                                     spec.mixing.temperature)
        counts = mixed.groupby([multitask.TASK_COLUMN, "split"]).size().unstack(fill_value=0)
        available = {t: int((df["split"] == "train").sum()) for t, df in splits.items()}
        return dg.Output(mixed, data_version=dg.DataVersion(frame_hash(mixed)), metadata={
            "dagster/row_count": len(mixed), "rows_by_task": dg.MetadataValue.md(counts.to_markdown()),
            "train_rows_available": dg.MetadataValue.json(available),
            "mixing": dg.MetadataValue.json(spec.mixing.model_dump() | {"weights": spec.mixing_weights()}),
        })

    p.assets.append(task_mix)
