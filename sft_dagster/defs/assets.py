"""One spec -> one asset group: the SFT lifecycle as Dagster assets and checks.

Assets are thin: each calls one pure stage (ingest, labels, quality, curation, splits, models,
training, evaluation, registry) and turns its result into metadata for the UI. DataFrames travel as
Parquet through `ParquetIOManager`; model artefacts are folders under the pipeline's storage dir.
"""


import hashlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pandas as pd

from .. import curation, evaluation, ingest, labels, models, quality, registry, splits, training
from ..formatting import token_lengths
from ..quality import find_label_issues, load_suite, run_suite
from ..schema import frame_hash
from ..spec import PipelineSpec
from ..storage import PipelinePaths
from .guards import require_checks_passed
from .resources import ComputeResource, SFTStorage

PREVIEW_ROWS = 10


def code_version(*modules) -> str:
    """Hash of the stage's source: editing a stage makes its assets stale in the UI."""
    h = hashlib.sha256()
    for module in modules:
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()[:12]


def preview(df: pd.DataFrame, columns: list[str] | None = None, n: int = PREVIEW_ROWS) -> dg.MetadataValue:
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    shown = df[cols].head(n).astype(str).apply(lambda s: s.str.slice(0, 80))
    return dg.MetadataValue.md(shown.to_markdown(index=False) if len(shown) else "_no rows_")


def write_table(path: Path, df: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df.to_parquet(tmp, engine="pyarrow", index=False)
    tmp.replace(path)
    return path


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path, engine="pyarrow")


def corrections_path(spec: PipelineSpec, paths: PipelinePaths) -> Path:
    return spec.resolve(spec.labels.corrections_file) if spec.labels.corrections_file else paths.default_corrections_file


def file_version(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "absent"


def previous_metadata(context: dg.AssetExecutionContext) -> dict:
    event = context.instance.get_latest_materialization_event(context.asset_key)
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def jsonable(metadata: dict) -> dict:
    """Nested dicts/lists become JSON metadata; scalars stay scalars."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, (dict, list)):
            out[key] = dg.MetadataValue.json(value)
        elif value is None:
            out[key] = dg.MetadataValue.null()
        else:
            out[key] = value
    return out


def outcome_to_check_result(outcome, asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    metadata = jsonable(dict(outcome.metadata))
    metadata["failing_rows_count"] = len(outcome.failing_ids)
    if getattr(outcome, "failing_rows", None) is not None and len(outcome.failing_rows):
        metadata["failing_rows"] = preview(outcome.failing_rows, n=20)
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=outcome.name,
        passed=bool(outcome.passed),
        severity=dg.AssetCheckSeverity.ERROR if outcome.blocking else dg.AssetCheckSeverity.WARN,
        description=outcome.description,
        metadata=metadata,
    )


@dataclass
class PipelineDefs:
    spec: PipelineSpec
    assets: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    blocking_checks: list[dg.AssetCheckKey] = field(default_factory=list)

    def key(self, name: str) -> dg.AssetKey:
        return dg.AssetKey([self.spec.name, name])


LABEL_GATE_CHECKS = [
    ("label_issue_rate", True, "Share of rows cleanlab flags as label issues is within the spec's threshold"),
    ("issue_types_evaluated", True, "Every expected cleanlab issue type was evaluated (a skipped type is a failure)"),
    ("class_imbalance", False, "Class balance (warning)"),
    ("non_iid", False, "Rows look independent and identically distributed (warning)"),
]


def build_pipeline_assets(spec: PipelineSpec, checks_dir: Path) -> PipelineDefs:
    name, group = spec.name, spec.name
    defs = PipelineDefs(spec)
    K = defs.key
    suite = load_suite(spec.quality.suite, checks_dir)
    tags = {"pipeline": name}

    def tokenizer_for(paths: PipelinePaths):
        from transformers import AutoTokenizer

        # The base_model asset records the resolved directory; without it (a run that selected only
        # data stages), resolve it here: resolution is cached, so both give the same directory.
        record = paths.dir / "base_model.json"
        if record.exists():
            model_dir = json.loads(record.read_text())["path"]
        else:
            model_dir = models.resolve_base_model(spec.model, paths.model_cache, spec.base_dir).path
        return AutoTokenizer.from_pretrained(model_dir)

    def suite_outcomes(df: pd.DataFrame, paths: PipelinePaths, out_dir: Path | None):
        tokenizer = tokenizer_for(paths)
        lengths = token_lengths(tokenizer, df, spec.task)
        return run_suite(df, suite, task=spec.task, token_lengths=lengths, max_length=spec.model.max_length, out_dir=out_dir,
                         special_tokens=list(tokenizer.all_special_tokens))

    # 1. raw examples --------------------------------------------------------------------------
    @dg.asset(key=K("raw_examples"), group_name=group, kinds={"pandas", "parquet"}, tags=tags,
              code_version=code_version(ingest), description="The spec's sources read into canonical examples.")
    def raw_examples(context: dg.AssetExecutionContext, storage: SFTStorage) -> dg.Output[pd.DataFrame]:
        start = time.perf_counter()
        examples, quarantined, stats = ingest.ingest(spec)
        write_table(storage.paths(name).table("quarantine_ingest"), quarantined)
        return dg.Output(
            examples,
            data_version=dg.DataVersion(frame_hash(examples)),
            metadata={
                "dagster/row_count": len(examples),
                "rows_read": stats["rows_read"],
                "rows_quarantined": stats["rows_quarantined"],
                "files": dg.MetadataValue.json(stats["files"]),
                "quarantine_preview": preview(quarantined, ["reason", "source_file", "source_line"]),
                "preview": preview(examples, ["example_id", "prompt", "response", "source_line"]),
                "seconds": round(time.perf_counter() - start, 3),
            },
        )

    # 2. corrections file (maintained by data engineers) ---------------------------------------
    @dg.asset(key=K("label_corrections"), group_name=group, kinds={"csv"}, tags=tags, code_version=code_version(labels),
              description="The corrections file data engineers maintain; its content hash is its data version.")
    def label_corrections(context: dg.AssetExecutionContext, storage: SFTStorage) -> dg.Output[pd.DataFrame]:
        path = corrections_path(spec, storage.paths(name))
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

    # 3. labelled examples -----------------------------------------------------------------------
    @dg.asset(key=K("labelled_examples"), group_name=group, kinds={"pandas", "parquet"}, tags=tags,
              code_version=code_version(labels),
              ins={"raw_examples": dg.AssetIn(K("raw_examples")), "label_corrections": dg.AssetIn(K("label_corrections"))},
              description="Raw examples with the corrections file applied, and each label's provenance.")
    def labelled_examples(context: dg.AssetExecutionContext, storage: SFTStorage, raw_examples: pd.DataFrame,
                          label_corrections: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        paths = storage.paths(name)
        labelled, quarantined, stats = labels.apply_corrections(
            raw_examples, label_corrections, spec.task.labels if spec.task.is_label_task else None,
            source=str(corrections_path(spec, paths)),
        )
        write_table(paths.table("quarantine_labels"), quarantined)
        return dg.Output(
            labelled,
            data_version=dg.DataVersion(frame_hash(labelled)),
            metadata={"dagster/row_count": len(labelled), "rows_in": len(raw_examples), **jsonable(stats),
                      "preview": preview(labelled, ["example_id", "prompt", "response", "label_source"])},
        )

    # 3b. the data-quality suite as blocking checks on the labelled examples -----------------------
    suite_specs = [
        dg.AssetCheckSpec(check, asset=K("labelled_examples"), blocking=blocking, description=description,
                          additional_deps=[K("base_model")])
        for check, blocking, description in suite.check_names()
    ]
    defs.blocking_checks += [dg.AssetCheckKey(K("labelled_examples"), s.name) for s in suite_specs if s.blocking]

    @dg.multi_asset_check(name=f"{name}_data_quality_suite", specs=suite_specs,
                          ins={"labelled": dg.AssetIn(K("labelled_examples"))},
                          description=f"data_checks/{spec.quality.suite}.yaml run with great-expectations and SFT checks")
    def data_quality_suite(context: dg.AssetCheckExecutionContext, storage: SFTStorage, labelled: pd.DataFrame):
        paths = storage.paths(name)
        for outcome in suite_outcomes(labelled, paths, paths.quality_dir / "labelled_examples"):
            yield outcome_to_check_result(outcome, K("labelled_examples"))

    # 4. label issues (cleanlab) ----------------------------------------------------------------
    gate_specs = [dg.AssetCheckSpec(c, asset=K("label_issues"), blocking=b, description=d) for c, b, d in LABEL_GATE_CHECKS]
    defs.blocking_checks += [dg.AssetCheckKey(K("label_issues"), c) for c, b, _ in LABEL_GATE_CHECKS if b]

    @dg.asset(key=K("label_issues"), group_name=group, kinds={"cleanlab", "scikitlearn"}, tags=tags,
              code_version=code_version(quality), check_specs=gate_specs,
              ins={"labelled_examples": dg.AssetIn(K("labelled_examples"))},
              description="cleanlab review queue: likely label errors, outliers and near duplicates, worst first.")
    def label_issues(context: dg.AssetExecutionContext, storage: SFTStorage, labelled_examples: pd.DataFrame):
        paths = storage.paths(name)
        start = time.perf_counter()
        report = find_label_issues(labelled_examples, spec.task, spec.quality.cleanlab, seed=spec.splits.seed)
        queue_csv = corrections_path(spec, paths).parent / "review_queue.csv"
        queue_csv.parent.mkdir(parents=True, exist_ok=True)
        report.review_queue.to_csv(queue_csv, index=False)
        write_table(paths.table("label_flags"), report.flags)
        metadata = {
            "dagster/row_count": len(report.review_queue),
            "review_queue_csv": dg.MetadataValue.path(str(queue_csv)),
            "summary": dg.MetadataValue.json(report.summary),
            "preview": preview(report.review_queue, ["example_id", "prompt", "given_label", "suggested_label", "issue_types", "severity"]),
            "seconds": round(time.perf_counter() - start, 3),
        }
        if spec.quality.audit_file:
            metadata["audit"] = dg.MetadataValue.json(audit_label_issues(spec, labelled_examples, report.flags))
        yield dg.Output(report.review_queue, data_version=dg.DataVersion(frame_hash(report.flags)), metadata=metadata)
        outcomes = {o.name: o for o in report.gate_outcomes(spec.quality.cleanlab)}
        for check, _, _ in LABEL_GATE_CHECKS:
            if check in outcomes:
                yield outcome_to_check_result(outcomes[check], K("label_issues"))
            else:
                yield dg.AssetCheckResult(asset_key=K("label_issues"), check_name=check, passed=False,
                                          description=f"the label-issue report produced no {check} outcome")

    # 5. curated examples + quarantine --------------------------------------------------------------
    curated_checks = [dg.AssetCheckSpec("no_blocking_failures_left", asset=K("curated_examples"), blocking=True,
                                        description="No curated row fails a blocking check; rows in = kept + quarantined")]
    defs.blocking_checks.append(dg.AssetCheckKey(K("curated_examples"), "no_blocking_failures_left"))

    @dg.asset(key=K("curated_examples"), group_name=group, kinds={"pandas", "parquet"}, tags=tags,
              code_version=code_version(curation), check_specs=curated_checks,
              ins={"labelled_examples": dg.AssetIn(K("labelled_examples")), "label_issues": dg.AssetIn(K("label_issues"))},
              description="What training may use, after the spec's curation policy.")
    def curated_examples(context: dg.AssetExecutionContext, storage: SFTStorage, labelled_examples: pd.DataFrame,
                         label_issues: pd.DataFrame):
        paths = storage.paths(name)
        outcomes = suite_outcomes(labelled_examples, paths, None)
        failing = {o.name: o.failing_ids for o in outcomes if o.blocking and o.failing_ids}
        flags = read_table(paths.table("label_flags"))
        curated, quarantined, stats = curation.curate(labelled_examples, failing, flags, spec.quality.policy, spec.splits)
        write_table(paths.table("quarantine_curation"), quarantined)
        yield dg.Output(curated, data_version=dg.DataVersion(frame_hash(curated)),
                        metadata={"dagster/row_count": len(curated), **jsonable(stats),
                                  "quarantine_preview": preview(quarantined, ["example_id", "reason"])})
        leftover = {o.name: len(o.failing_ids) for o in suite_outcomes(curated, paths, None) if o.blocking and o.failing_ids}
        balanced = stats["rows_in"] == stats["rows_kept"] + stats["rows_quarantined"]
        yield dg.AssetCheckResult(
            asset_key=K("curated_examples"), check_name="no_blocking_failures_left", passed=not leftover and balanced,
            metadata={"failing_rows_by_check": dg.MetadataValue.json(leftover), "rows_balanced": balanced},
        )

    @dg.asset(key=K("quarantine"), group_name=group, kinds={"pandas", "parquet"}, tags=tags,
              deps=[K("raw_examples"), K("labelled_examples"), K("curated_examples")],
              check_specs=[dg.AssetCheckSpec("rows_accounted_for", asset=K("quarantine"), blocking=True,
                                             description="rows read = rows curated + rows quarantined")],
              description="Every row removed anywhere in the pipeline, with its stage and reason.")
    def quarantine(context: dg.AssetExecutionContext, storage: SFTStorage):
        paths = storage.paths(name)
        parts = [read_table(paths.table(f"quarantine_{stage}")) for stage in ("ingest", "labels", "curation")]
        combined = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else parts[0]
        raw_meta = context.instance.get_latest_materialization_event(K("raw_examples")).asset_materialization.metadata
        rows_read = raw_meta["rows_read"].value
        curated_rows = len(read_table(paths.table("curated_examples")))
        yield dg.Output(combined, metadata={
            "dagster/row_count": len(combined),
            "by_stage": dg.MetadataValue.json({k: int(v) for k, v in combined["stage"].value_counts().items()}),
            "preview": preview(combined, ["stage", "reason", "source_file", "source_line"], n=20),
        })
        yield dg.AssetCheckResult(
            asset_key=K("quarantine"), check_name="rows_accounted_for", passed=rows_read == curated_rows + len(combined),
            metadata={"rows_read": rows_read, "rows_curated": curated_rows, "rows_quarantined": len(combined)},
        )

    # 6. splits -----------------------------------------------------------------------------------
    split_checks = [dg.AssetCheckSpec("no_leakage_across_splits", asset=K("dataset_splits"), blocking=True,
                                      description="No prompt appears in more than one split; train is not empty")]
    defs.blocking_checks.append(dg.AssetCheckKey(K("dataset_splits"), "no_leakage_across_splits"))

    @dg.asset(key=K("dataset_splits"), group_name=group, kinds={"pandas", "parquet"}, tags=tags,
              code_version=code_version(splits), check_specs=split_checks,
              ins={"curated_examples": dg.AssetIn(K("curated_examples"))},
              description="Deterministic train / validation / test splits (hash of the prompt).")
    def dataset_splits(context: dg.AssetExecutionContext, storage: SFTStorage, curated_examples: pd.DataFrame):
        paths = storage.paths(name)
        summary = splits.split_summary(curated_examples, "response" if spec.task.is_label_task else None)
        for split in splits.SPLITS:
            write_table(paths.dir / "splits" / f"{split}.parquet", curated_examples[curated_examples["split"] == split])
        yield dg.Output(curated_examples, data_version=dg.DataVersion(frame_hash(curated_examples)),
                        metadata={"dagster/row_count": len(curated_examples), "summary": dg.MetadataValue.json(summary),
                                  "splits_dir": dg.MetadataValue.path(str(paths.dir / "splits"))})
        keys = curated_examples["prompt"].map(splits.split_key)
        leaking = curated_examples.groupby(keys)["split"].nunique()
        leaking = leaking[leaking > 1]
        yield dg.AssetCheckResult(
            asset_key=K("dataset_splits"), check_name="no_leakage_across_splits",
            passed=leaking.empty and summary["rows"]["train"] > 0,
            metadata={"leaking_prompts": len(leaking), "train_rows": summary["rows"]["train"]},
        )

    # 7. base model -----------------------------------------------------------------------------
    @dg.asset(key=K("base_model"), group_name=group, kinds={"transformers", "safetensors"}, tags=tags,
              code_version=code_version(models), description="The spec's base model as a local safetensors directory.")
    def base_model(context: dg.AssetExecutionContext, storage: SFTStorage) -> dg.MaterializeResult:
        paths = storage.paths(name)
        resolved = models.resolve_base_model(spec.model, paths.model_cache, spec.base_dir)
        paths.dir.mkdir(parents=True, exist_ok=True)
        (paths.dir / "base_model.json").write_text(json.dumps(resolved.to_metadata(), indent=2))
        return dg.MaterializeResult(
            data_version=dg.DataVersion(f"{resolved.model_hash}-{resolved.tokenizer_hash}"),
            metadata={**resolved.to_metadata(), "path": dg.MetadataValue.path(str(resolved.path))},
        )

    # 8. fine-tuned adapter -----------------------------------------------------------------------
    @dg.asset(key=K("fine_tuned_adapter"), group_name=group, kinds={"pytorch", "peft"}, tags=tags,
              code_version=code_version(training), deps=[K("dataset_splits"), K("base_model")],
              description=f"{spec.training.method} fine-tune of the base model on the train split.")
    def fine_tuned_adapter(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                           pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
        require_checks_passed(context, defs.blocking_checks)
        paths = storage.paths(name)
        resolved = json.loads((paths.dir / "base_model.json").read_text())
        train_path, val_path = paths.dir / "splits" / "train.parquet", paths.dir / "splits" / "validation.parquet"
        train_df, val_df = read_table(train_path), read_table(val_path)
        lineage = {
            "training_data_hash": frame_hash(pd.concat([train_df, val_df])[
                ["example_id", "prompt", "response", "system", "split"] + (["history"] if "history" in train_df else [])]),
            "base_model_hash": resolved["model_hash"],
            "tokenizer_hash": resolved["tokenizer_hash"],
            "spec_fingerprint": spec.fingerprint(),
            "code_version": context.assets_def.code_versions_by_key[context.asset_key],
            "method": spec.training.method,
            "base_model": resolved["source"],
        }
        lineage_hash = lineage_hash_of(lineage)
        output_dir = paths.training_dir
        previous = previous_metadata(context)
        if previous.get("lineage_hash") == lineage_hash and Path(previous.get("adapter_dir", "")).exists():
            context.log.info("inputs unchanged since the last training run: keeping the existing adapter")
            return dg.MaterializeResult(data_version=dg.DataVersion(lineage_hash),
                                        metadata={"lineage_hash": lineage_hash, "adapter_dir": previous["adapter_dir"],
                                                  "skipped_training": True, "lineage": dg.MetadataValue.json(lineage)})
        plan = training.preflight(spec, Path(resolved["path"]), train_df)
        context.log.info(f"pre-flight: {json.dumps(plan)}")
        context.add_asset_metadata({"preflight": dg.MetadataValue.json(plan)})
        device = compute.resolved_device()
        train_spec = spec
        if spec.training.search.strategy != "none":
            from ..training.search import search_hyperparameters, with_overrides

            best, trials = search_hyperparameters(spec, Path(resolved["path"]), train_df, val_df,
                                                  output_dir / "search", device=device, log=context.log.info)
            train_spec = with_overrides(spec, best)
            context.add_asset_metadata({"search_best": dg.MetadataValue.json(best),
                                        "search_trials": preview(pd.DataFrame(trials), n=100)})
        if spec.training.launcher == "subprocess" or spec.training.num_processes > 1:
            from ..training.launch import launch_training_pipes

            result = launch_training_pipes(context, pipes_subprocess_client, train_spec, Path(resolved["path"]),
                                           train_path, val_path, output_dir, device=device)
            adapter_dir, metrics = Path(result["adapter_dir"]), result["metrics"]
        else:
            result = training.train(train_spec, Path(resolved["path"]), train_df, val_df, output_dir, device=device,
                                    log=context.log.info)
            adapter_dir, metrics = result.adapter_dir, result.metrics
        (Path(adapter_dir) / "sft_dagster_lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True))
        if spec.training.export_merged and spec.training.method != "full":
            merged = training.merge_adapter(Path(resolved["path"]), Path(adapter_dir), output_dir / "merged")
            context.add_asset_metadata({"merged_model_dir": dg.MetadataValue.path(str(merged))})
        return dg.MaterializeResult(
            data_version=dg.DataVersion(lineage_hash),
            metadata={"lineage_hash": lineage_hash, "adapter_dir": dg.MetadataValue.path(str(adapter_dir)),
                      "skipped_training": False, "lineage": dg.MetadataValue.json(lineage),
                      "metrics": dg.MetadataValue.json(metrics),
                      **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}},
        )

    # 9. evaluation report + promotion gate ------------------------------------------------------------
    promotion_check = dg.AssetCheckSpec("beats_base_model", asset=K("evaluation_report"), blocking=True,
                                        description=f"fine-tuned {spec.promotion.metric} beats the base model by "
                                                    f"at least {spec.promotion.min_improvement}")

    @dg.asset(key=K("evaluation_report"), group_name=group, kinds={"pytorch", "markdown"}, tags=tags,
              code_version=code_version(evaluation), deps=[K("fine_tuned_adapter"), K("dataset_splits")],
              check_specs=[promotion_check], description="Base vs fine-tuned model on the test split.")
    def evaluation_report(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource):
        require_checks_passed(context, defs.blocking_checks)
        paths = storage.paths(name)
        resolved = json.loads((paths.dir / "base_model.json").read_text())
        adapter_meta = context.instance.get_latest_materialization_event(K("fine_tuned_adapter")).asset_materialization.metadata
        adapter_dir = Path(adapter_meta["adapter_dir"].value)
        test_df = read_table(paths.dir / "splits" / "test.parquet")
        inputs_hash = lineage_hash_of({"adapter": adapter_meta["lineage_hash"].value, "test": frame_hash(test_df),
                                       "evaluation": spec.evaluation.model_dump(mode="json"),
                                       "code_version": context.assets_def.code_versions_by_key[context.asset_key]})
        report_json = paths.reports_dir / "evaluation.json"
        previous = previous_metadata(context)
        if previous.get("inputs_hash") == inputs_hash and report_json.exists():
            context.log.info("adapter and test split unchanged since the last evaluation: keeping its report")
            report = json.loads(report_json.read_text())
            skipped = True
        else:
            start = time.perf_counter()
            report = evaluation.evaluate(spec, Path(resolved["path"]), adapter_dir, test_df, device=compute.resolved_device())
            report["adapter_lineage_hash"] = adapter_meta["lineage_hash"].value
            report["seconds"] = round(time.perf_counter() - start, 1)
            skipped = False
        paths.reports_dir.mkdir(parents=True, exist_ok=True)
        markdown = evaluation.render_markdown(report)
        report_json.write_text(json.dumps(report, indent=2, default=str))
        (paths.reports_dir / "evaluation.md").write_text(markdown)
        metric = spec.promotion.metric
        yield dg.MaterializeResult(
            data_version=dg.DataVersion(inputs_hash),
            metadata={"report": dg.MetadataValue.md(markdown), "report_path": dg.MetadataValue.path(str(paths.reports_dir / "evaluation.md")),
                      f"base_{metric}": report["base"].get(metric), f"tuned_{metric}": report["tuned"].get(metric),
                      "n_test": report["n_test"], "seconds": report["seconds"], "inputs_hash": inputs_hash,
                      "skipped_evaluation": skipped},
        )
        ok, decision = registry.promotion_decision(report, metric, spec.promotion.min_improvement)
        yield dg.AssetCheckResult(asset_key=K("evaluation_report"), check_name="beats_base_model", passed=ok,
                                  description=decision,
                                  metadata={"base": report["base"].get(metric), "tuned": report["tuned"].get(metric)})

    # 10. promoted model ----------------------------------------------------------------------------
    @dg.asset(key=K("promoted_model"), group_name=group, kinds={"peft", "safetensors"}, tags=tags,
              code_version=code_version(registry), deps=[K("evaluation_report")],
              description="The adapter copied with its model card into the registry, only when the gate passes.")
    def promoted_model(context: dg.AssetExecutionContext, storage: SFTStorage) -> dg.MaterializeResult:
        require_checks_passed(context, [*defs.blocking_checks, dg.AssetCheckKey(K("evaluation_report"), "beats_base_model")])
        paths = storage.paths(name)
        report = json.loads((paths.reports_dir / "evaluation.json").read_text())
        adapter_meta = context.instance.get_latest_materialization_event(K("fine_tuned_adapter")).asset_materialization.metadata
        adapter_dir = Path(adapter_meta["adapter_dir"].value)
        lineage = json.loads((adapter_dir / "sft_dagster_lineage.json").read_text())
        _, decision = registry.promotion_decision(report, spec.promotion.metric, spec.promotion.min_improvement)
        registry_dir = spec.resolve(spec.promotion.registry) / name if spec.promotion.registry else paths.registry_dir
        version_dir = registry.promote(adapter_dir, registry_dir, report, lineage, decision)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version_dir.name + "-" + lineage_hash_of(lineage)),
            metadata={"version": version_dir.name, "path": dg.MetadataValue.path(str(version_dir)),
                      "model_card": dg.MetadataValue.md((version_dir / "MODEL_CARD.md").read_text())},
        )

    defs.assets = [raw_examples, label_corrections, labelled_examples, label_issues, curated_examples, quarantine,
                   dataset_splits, base_model, fine_tuned_adapter, evaluation_report, promoted_model]
    defs.checks = [data_quality_suite]
    return defs


def lineage_hash_of(lineage: dict) -> str:
    return hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]


def audit_label_issues(spec: PipelineSpec, labelled: pd.DataFrame, flags: pd.DataFrame) -> dict:
    audit = pd.read_csv(spec.resolve(spec.quality.audit_file))
    return labels.label_issue_detection_scores(labelled, flags, audit)
