"""Curation: what training may use, the quarantine of everything removed anywhere, and the splits."""


import dagster as dg
import pandas as pd

from .. import atomic, curation, quality, splits
from ..quality import leakage
from ..schema import frame_hash
from .common import PipelineDefs, code_version, jsonable, outcome_to_check_result
from .data import suite_outcomes
from .resources import SFTStorage

LEAKAGE_CHECK = "no_leakage_across_splits"
LEAKAGE_DESCRIPTION = ("No validation/test row nearly repeats a train row (cleanlab's near-duplicate sets, or TF-IDF "
                       f"cosine similarity of the prompts >= {leakage.LEAKAGE_SIMILARITY}); train is not empty")


def build(p: PipelineDefs) -> None:
    _build_curation(p)
    _build_quarantine(p)
    _build_splits(p)


def _build_curation(p: PipelineDefs) -> None:
    spec, K = p.spec, p.key
    curated_check = dg.AssetCheckSpec("no_blocking_failures_left", asset=K("curated_examples"), blocking=True,
                                      description="No curated row fails a blocking check; rows in = kept + quarantined")
    p.blocking_checks.append(curated_check.key)

    @dg.multi_asset(
        name=f"{spec.name}__curation", pool=p.pool, ins=p.ins("labelled_examples", "label_issues"), check_specs=[curated_check],
        outs={
            "curated_examples": p.out("curated_examples", kinds={"pandas", "parquet"}, code_version=code_version(curation),
                                      description="What training may use, after the spec's curation policy."),
            "curation_quarantine": p.out("curation_quarantine", kinds={"pandas", "parquet"}, code_version=code_version(curation),
                                         description="Rows curation removed (duplicates, failed blocking checks, "
                                                     "cleanlab findings under the policy), each with its reason."),
        },
    )
    def curated_examples(context: dg.AssetExecutionContext, storage: SFTStorage, labelled_examples: pd.DataFrame,
                         label_issues: pd.DataFrame):
        # The suite ran with the labels: each row names the blocking checks it failed.
        failing = quality.blocking_failures(labelled_examples, [c.name for c in p.suite.checks])
        labelled = labelled_examples.drop(columns=quality.FAILED_CHECKS)
        curated, quarantined, stats = curation.curate(labelled, failing, label_issues, spec.quality.policy, spec.splits,
                                                          label_task=spec.task.is_label_task)
        yield dg.Output(curated, output_name="curated_examples", data_version=dg.DataVersion(frame_hash(curated)),
                        metadata={"dagster/row_count": len(curated), **jsonable(stats)})
        yield dg.Output(quarantined, output_name="curation_quarantine", data_version=dg.DataVersion(frame_hash(quarantined)),
                        metadata={"dagster/row_count": len(quarantined), "preview": p.preview(quarantined, ["example_id", "reason"])})
        # The suite once more, on what curation kept: the output itself must pass every blocking check.
        leftover = {o.name: len(o.failing_ids) for o in suite_outcomes(p, p.suite, curated, storage) if o.blocking and o.failing_ids}
        balanced = stats["rows_in"] == stats["rows_kept"] + stats["rows_quarantined"]
        yield dg.AssetCheckResult(
            asset_key=K("curated_examples"), check_name="no_blocking_failures_left", passed=not leftover and balanced,
            metadata={"failing_rows_by_check": dg.MetadataValue.json(leftover), "rows_balanced": balanced},
        )

    p.assets.append(curated_examples)


def _build_quarantine(p: PipelineDefs) -> None:
    K = p.key
    accounted = dg.AssetCheckSpec("rows_accounted_for", asset=K("quarantine"), blocking=True,
                                  description="rows read = rows curated + rows quarantined, over every stage")
    p.blocking_checks.append(accounted.key)

    @dg.asset(**p.asset_args("quarantine", kinds={"pandas", "parquet"}, check_specs=[accounted],
                             ins=p.ins("raw_examples", "ingest_quarantine", "labels_quarantine", "curation_quarantine",
                                       "curated_examples"),
                             description="Every row removed anywhere in the pipeline, with its stage and reason."))
    def quarantine(context: dg.AssetExecutionContext, raw_examples: pd.DataFrame, ingest_quarantine: pd.DataFrame,
                   labels_quarantine: pd.DataFrame, curation_quarantine: pd.DataFrame, curated_examples: pd.DataFrame):
        parts = [ingest_quarantine, labels_quarantine, curation_quarantine]
        combined = pd.concat([q for q in parts if len(q)], ignore_index=True) if any(len(q) for q in parts) else parts[0]
        rows_read = len(raw_examples) + len(ingest_quarantine)
        yield dg.Output(combined, data_version=dg.DataVersion(frame_hash(combined)), metadata={
            "dagster/row_count": len(combined),
            "by_stage": dg.MetadataValue.json({k: int(v) for k, v in combined["stage"].value_counts().items()}),
            "preview": p.preview(combined, ["stage", "reason", "source_file", "source_line"], n=20),
        })
        yield dg.AssetCheckResult(
            asset_key=K("quarantine"), check_name="rows_accounted_for",
            passed=rows_read == len(curated_examples) + len(combined),
            metadata={"rows_read": rows_read, "rows_curated": len(curated_examples), "rows_quarantined": len(combined)},
        )

    p.assets.append(quarantine)


def _build_splits(p: PipelineDefs) -> None:
    spec, K = p.spec, p.key

    @dg.asset(**p.asset_args("dataset_splits", kinds={"pandas", "parquet"}, code_version=code_version(splits),
                             ins=p.ins("curated_examples"),
                             description="Deterministic train / validation / test splits (hash of the prompt)."))
    def dataset_splits(context: dg.AssetExecutionContext, storage: SFTStorage, curated_examples: pd.DataFrame):
        split_dir = p.paths(storage).splits_dir
        summary = splits.split_summary(curated_examples, "response" if spec.task.is_label_task else None)
        for split in splits.SPLITS:  # exported for people and for training in a separate process
            atomic.write_parquet(split_dir / f"{split}.parquet", curated_examples[curated_examples["split"] == split])
        return dg.Output(curated_examples, data_version=dg.DataVersion(frame_hash(curated_examples)),
                         metadata={"dagster/row_count": len(curated_examples), "summary": dg.MetadataValue.json(summary),
                                   "splits_dir": dg.MetadataValue.path(str(split_dir))})

    @dg.asset_check(asset=K("dataset_splits"), name=LEAKAGE_CHECK, blocking=True, pool=p.pool,
                    additional_ins={"label_issues": dg.AssetIn(K("label_issues"))}, description=LEAKAGE_DESCRIPTION)
    def no_leakage_across_splits(context: dg.AssetCheckExecutionContext, dataset_splits: pd.DataFrame,
                                 label_issues: pd.DataFrame) -> dg.AssetCheckResult:
        outcome = leakage.check_split_neighbours(LEAKAGE_CHECK, dataset_splits, label_issues, description=LEAKAGE_DESCRIPTION)
        return outcome_to_check_result(outcome, K("dataset_splits"), previews=spec.quality.previews)

    p.blocking_checks.append(p.check_key("dataset_splits", LEAKAGE_CHECK))
    p.assets.append(dataset_splits)
    p.checks.append(no_leakage_across_splits)
