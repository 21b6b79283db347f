"""Data stages: sources -> raw examples, the corrections file, labelled examples, and the suite's checks."""


import time

import dagster as dg
import pandas as pd

from .. import formatting, ingest, labels, quality
from ..quality import run_suite
from ..schema import frame_hash
from .common import PipelineDefs, check_specs, code_version, jsonable, outcome_to_check_result
from .resources import SFTStorage
from .shared import corrections_path, file_version, tokenizer_for


def suite_outcomes(p: PipelineDefs, suite, df: pd.DataFrame, storage: SFTStorage, out_dir=None):
    """The spec's data-quality suite on `df`, token lengths measured in the base model's tokenizer."""
    tokenizer = tokenizer_for(p.spec, storage)
    lengths = formatting.token_lengths(tokenizer, df, p.spec.task)
    return run_suite(df, suite, task=p.spec.task, token_lengths=lengths, max_length=p.spec.model.max_length,
                     out_dir=out_dir, special_tokens=list(tokenizer.all_special_tokens))


def build(p: PipelineDefs) -> None:
    _build_ingest(p)
    _build_corrections(p)
    _build_labels(p)


def _build_ingest(p: PipelineDefs) -> None:
    spec = p.spec

    @dg.multi_asset(
        name=f"{spec.name}__ingest", pool=p.pool,
        outs={
            "raw_examples": p.out("raw_examples", kinds={"pandas", "parquet"}, code_version=code_version(ingest),
                                  description="The spec's sources read into canonical examples."),
            "ingest_quarantine": p.out("ingest_quarantine", kinds={"pandas", "parquet"}, code_version=code_version(ingest),
                                       description="Source rows that could not be read into examples, with file, line and reason."),
        },
    )
    def raw_examples(context: dg.AssetExecutionContext):
        start = time.perf_counter()
        examples, quarantined, stats = ingest.ingest(spec)
        for warning in stats["warnings"]:  # e.g. an empty file, skipped
            context.log.warning(warning)
        yield dg.Output(
            examples, output_name="raw_examples", data_version=dg.DataVersion(frame_hash(examples)),
            metadata={
                "dagster/row_count": len(examples),
                "rows_read": stats["rows_read"],
                "rows_quarantined": stats["rows_quarantined"],
                "files": dg.MetadataValue.json(stats["files"]),
                "warnings": dg.MetadataValue.json(stats["warnings"]),
                "preview": p.preview(examples, ["example_id", "prompt", "response", "source_line"]),
                "seconds": round(time.perf_counter() - start, 3),
            },
        )
        yield dg.Output(quarantined, output_name="ingest_quarantine", data_version=dg.DataVersion(frame_hash(quarantined)),
                        metadata={"dagster/row_count": len(quarantined),
                                  "preview": p.preview(quarantined, ["reason", "source_file", "source_line"])})

    p.assets.append(raw_examples)


def _build_corrections(p: PipelineDefs) -> None:
    spec = p.spec

    @dg.asset(**p.asset_args("label_corrections", kinds={"csv"}, code_version=code_version(labels),
                             description="The corrections file data engineers maintain; its content hash is its data version."))
    def label_corrections(context: dg.AssetExecutionContext, storage: SFTStorage) -> dg.Output[pd.DataFrame]:
        path = corrections_path(spec, storage)
        corrections = labels.read_corrections(path)
        return dg.Output(
            corrections,
            data_version=dg.DataVersion(file_version(path)),
            metadata={
                "path": dg.MetadataValue.path(str(path)),
                "exists": path.exists(),
                "decisions": len(corrections),
                "by_action": dg.MetadataValue.json({k: int(v) for k, v in corrections["action"].value_counts().items()}),
            },
        )

    p.assets.append(label_corrections)


def _build_labels(p: PipelineDefs) -> None:
    spec, K, suite = p.spec, p.key, p.suite
    # The suite as checks on the labelled examples (blocking ones stop training), run with the labels: each
    # row carries the blocking checks it failed (`failed_blocking_checks`), which curation quarantines.
    suite_specs = check_specs(K("labelled_examples"), suite.check_names())
    p.blocking_checks += [s.key for s in suite_specs if s.blocking]

    @dg.multi_asset(
        name=f"{spec.name}__labels", pool=p.pool, ins=p.ins("raw_examples", "label_corrections"),
        deps=[K("base_model")], check_specs=suite_specs,  # the suite measures token lengths in its tokenizer
        outs={
            "labelled_examples": p.out("labelled_examples", kinds={"pandas", "parquet"}, code_version=code_version(labels),
                                       description="Raw examples with the corrections file applied, and each label's provenance."),
            "labels_quarantine": p.out("labels_quarantine", kinds={"pandas", "parquet"}, code_version=code_version(labels),
                                       description="Rows a data engineer dropped in the corrections file."),
        },
    )
    def labelled_examples(context: dg.AssetExecutionContext, storage: SFTStorage, raw_examples: pd.DataFrame,
                          label_corrections: pd.DataFrame):
        labelled, quarantined, stats = labels.apply_corrections(
            raw_examples, label_corrections, spec.task.labels if spec.task.is_label_task else None,
            source=str(corrections_path(spec, storage)),
        )
        out_dir = p.paths(storage).quality_dir / "labelled_examples"
        outcomes = suite_outcomes(p, suite, labelled, storage, out_dir)
        labelled = quality.with_failed_checks(labelled, outcomes)
        yield dg.Output(
            labelled, output_name="labelled_examples", data_version=dg.DataVersion(frame_hash(labelled)),
            metadata={"dagster/row_count": len(labelled), "rows_in": len(raw_examples), **jsonable(stats),
                      "preview": p.preview(labelled, ["example_id", "prompt", "response", "label_source"])},
        )
        yield dg.Output(quarantined, output_name="labels_quarantine", data_version=dg.DataVersion(frame_hash(quarantined)),
                        metadata={"dagster/row_count": len(quarantined),
                                  "preview": p.preview(quarantined, ["example_id", "reason"])})
        for outcome in outcomes:
            yield outcome_to_check_result(outcome, K("labelled_examples"), previews=spec.quality.previews,
                                          failing_ids_file=out_dir / f"{outcome.name}.csv")

    p.assets.append(labelled_examples)
