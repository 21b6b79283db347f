"""Evaluation and promotion: base vs champion vs candidate on the test split, then the registry.

The evaluation report scores the base model, the currently promoted version (the champion) and the
candidate adapter on the same test rows; the blocking `beats_champion` check decides promotion
(`registry.promotion_decision`). `promoted_model` refuses an adapter the report was not made for.
"""


import time
from pathlib import Path

import dagster as dg
import pandas as pd

from .. import decoding, evaluation, formatting, judge, metrics, prompt_model, registry
from ..schema import frame_hash
from ..tracking import TrackedRun, log_evaluation
from .common import JSON_IO, PipelineDefs, code_version, rounded
from .guards import require_checks_passed
from .multitask import splits_asset
from .resources import ComputeResource, SFTStorage
from .runs import cached_report, promotion
from .shared import registry_dir

PROMOTION_CHECK = "beats_champion"
HISTORY_VERSIONS = 10  # promoted versions listed in every report (nightly drift, newest first)


def _champion(spec, storage: SFTStorage, base_model: dict, adapter: dict) -> tuple[dict | None, dict]:
    """The champion to compare with (None before the first promotion), and what the report says about it."""
    if spec.promotion.compare_with == "base":
        return None, {}
    current = registry.champion(registry_dir(spec, storage))
    if current is None:
        return None, {}
    if current["lineage"] == adapter["lineage"]:
        return None, {"candidate_is_champion": True, "champion_version": current["version"]}
    if registry.tuned_from(current["lineage"], adapter["lineage_hash"]):
        # A DPO/PPO policy tuned from this very adapter was promoted after it: the adapter is not challenging
        # its own successor (which would fail every nightly run, or flip the registry back and forth).
        return None, {"candidate_is_champion": True, "champion_version": current["version"],
                      "champion_tuned_from_candidate": current["lineage"].get("preference_method", "preference")}
    if current["base_model_hash"] != base_model["model_hash"]:
        return None, {"champion_version": current["version"],
                      "champion_error": f"{current['version']} was trained on base model {current['base_model_hash']}, "
                                        f"the candidate on {base_model['model_hash']}; they cannot be scored on the same "
                                        "base. Set promotion.compare_with: base to compare with the base model instead"}
    return current, {}


def build(p: PipelineDefs) -> None:
    spec, K = p.spec, p.key
    promotion_check = dg.AssetCheckSpec(
        PROMOTION_CHECK, asset=K("evaluation_report"), blocking=True,
        description=f"the candidate beats the current promoted model (the base model before the first promotion) on "
                    f"{spec.promotion.metric} by at least {spec.promotion.min_improvement}"
                    f"{' (the lower end of the 95% interval of its gain)' if spec.promotion.require_significant else ''}, "
                    "and is not worse on the primary metric")

    @dg.asset(**p.asset_args("evaluation_report", kinds={"pytorch", "markdown"}, code_version=code_version(evaluation, decoding, formatting, prompt_model, metrics, judge),
                             io_manager_key=JSON_IO, check_specs=[promotion_check],
                             ins={"dataset_splits": dg.AssetIn(splits_asset(p)), **p.ins("fine_tuned_adapter", "base_model")},
                             description="Base model vs champion vs candidate on the test split, and the promotion decision."))
    def evaluation_report(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                          fine_tuned_adapter: dict, dataset_splits: pd.DataFrame, base_model: dict):
        require_checks_passed(context, p.blocking_checks)
        report, inputs_hash, skipped = _scored_report(context, spec, storage, compute, fine_tuned_adapter,
                                                      dataset_splits, base_model)
        paths = p.paths(storage)
        # The latest report, where people look for it, with the promoted versions so far (not part of the
        # per-inputs copy: a promotion changes the history, not the scores).
        report = {**report, "history": registry.history(registry_dir(spec, storage), HISTORY_VERSIONS)}
        evaluation.write_report(paths.reports_dir, report)
        tracked = TrackedRun.from_record(fine_tuned_adapter.get("mlflow"))
        if tracked is not None and not skipped:
            log_evaluation(tracked, report, [paths.reports_dir / "evaluation.json", paths.reports_dir / "evaluation.md"])
        link = {"mlflow_run_id": tracked.run_id, **({"mlflow_run": dg.MetadataValue.url(tracked.url)} if tracked.url else {})} \
            if tracked is not None else {}
        yield dg.Output(report, data_version=dg.DataVersion(inputs_hash),
                        metadata=_report_metadata(spec, report, paths, inputs_hash, skipped) | link)
        metric, decision = spec.promotion.metric, report["promotion"]
        yield dg.AssetCheckResult(
            asset_key=K("evaluation_report"), check_name=PROMOTION_CHECK, passed=bool(decision["promote"]),
            description=decision["reason"],
            metadata=rounded({"base": report["base"].get(metric), "champion": (report.get("champion") or {}).get(metric),
                              "candidate": report["tuned"].get(metric), "compared_with": decision.get("compared_with"),
                              "gain_interval": decision.get("gain_interval")}))

    @dg.asset(**p.asset_args("promoted_model", kinds={"peft", "safetensors"}, code_version=code_version(registry),
                             io_manager_key=JSON_IO, ins=p.ins("evaluation_report", "fine_tuned_adapter"),
                             description="The adapter (or few-shot prompt model) copied with its model card into the "
                                         "registry: the new champion, only when the promotion gate passed for this "
                                         "very adapter."))
    def promoted_model(context: dg.AssetExecutionContext, storage: SFTStorage, evaluation_report: dict,
                       fine_tuned_adapter: dict) -> dg.Output[dict]:
        require_checks_passed(context, [*p.blocking_checks, p.check_key("evaluation_report", PROMOTION_CHECK)])
        judged, current = evaluation_report.get("adapter_lineage_hash"), fine_tuned_adapter["lineage_hash"]
        return promotion(spec, storage, model_dir=Path(fine_tuned_adapter["adapter_dir"]), report=evaluation_report,
                         decision=evaluation_report["promotion"], lineage=fine_tuned_adapter["lineage"],
                         lineage_hash=current,
                         stale=None if judged == current else
                         f"the evaluation report is for adapter {judged}, but the current fine_tuned_adapter is "
                         f"{current}; materialize {spec.name}/evaluation_report for it first")

    p.assets += [evaluation_report, promoted_model]


def _scored_report(context, spec, storage: SFTStorage, compute: ComputeResource, adapter: dict,
                   dataset_splits: pd.DataFrame, base_model: dict) -> tuple[dict, str, bool]:
    """Base, champion and candidate scored on the test split, with the promotion decision; kept while
    the adapter, champion, test split and settings are unchanged. (report, inputs_hash, skipped)."""
    paths = storage.paths(spec.name)
    test_df = dataset_splits[dataset_splits["split"] == "test"].reset_index(drop=True)
    champion, champion_note = _champion(spec, storage, base_model, adapter)
    judge_model = (judge.resolve(spec.evaluation.judge, paths.model_cache, spec.base_dir)
                   if spec.evaluation.judge is not None else None)
    code = context.assets_def.code_versions_by_key[context.asset_key]
    inputs = {"adapter": adapter["lineage_hash"], "test": frame_hash(test_df),
              "evaluation": spec.evaluation.model_dump(mode="json"),
              "promotion": spec.promotion.model_dump(mode="json"), "code_version": code,
              # A candidate that became the champion keeps the report that promoted it.
              "champion": champion["lineage"] if champion else champion_note.get("champion_error"),
              **({"judge": [judge_model.model_hash, judge_model.tokenizer_hash]} if judge_model is not None else {})}

    def score(inputs_hash: str) -> dict:
        start = time.perf_counter()
        report = evaluation.evaluate_tasks(
            spec, Path(base_model["path"]), Path(adapter["adapter_dir"]), dataset_splits,
            device=compute.resolved_device(), method=adapter["method"], adapter_id=adapter["lineage_hash"],
            champion=champion, judge=judge_model, cache_dir=paths.reports_dir / "scores",
            cache_key={"base_model": base_model["model_hash"], "tokenizer": base_model["tokenizer_hash"], "code": code})
        report |= champion_note | {"training": evaluation.training_summary(adapter.get("metrics") or {}),
                                   "adapter_lineage_hash": adapter["lineage_hash"],
                                   "seconds": round(time.perf_counter() - start, 1)}
        report["promotion"] = registry.promotion_decision(report, spec.promotion.metric, spec.promotion.min_improvement,
                                                          spec.promotion.max_forgetting, spec.promotion.require_significant)
        if report.get("tasks"):  # one adapter serves every task: each must pass on its own metric
            report["promotion"] = registry.all_tasks_decision(report, spec.promotion.min_improvement,
                                                              spec.promotion.require_significant)
        return report

    return cached_report(context, paths.reports_dir, "evaluation.json", inputs, score, read=evaluation.read_report,
                         write=evaluation.write_report,
                         unchanged="adapter, champion and test split unchanged since the last evaluation")


def _report_metadata(spec, report: dict, paths, inputs_hash: str, skipped: bool) -> dict:
    """What the evaluation report's materialization shows: the scores, the decision, where time went."""
    metric, decision = spec.promotion.metric, report["promotion"]
    judged = {f"win_rate_vs_{name}": found["value"]
              for name, found in (report.get("win_rate") or {}).get("versus", {}).items()}
    if report.get("win_rate"):  # the judge's verdicts with their intervals, wins, ties and losses
        judged["win_rate"] = dg.MetadataValue.json(report["win_rate"])
    return rounded({
        "report": dg.MetadataValue.md(evaluation.render_markdown(report)),
        "report_path": dg.MetadataValue.path(str(paths.reports_dir / "evaluation.md")),
        f"base_{metric}": report["base"].get(metric),
        f"champion_{metric}": (report.get("champion") or {}).get(metric),
        f"candidate_{metric}": report["tuned"].get(metric),
        "champion_version": report.get("champion_version"),
        "candidate_method": report.get("candidate_method"),
        f"base_few_shot_{metric}": (report.get("base_few_shot") or {}).get(metric),
        "forgetting": ((report.get("retention") or {}).get("models", {}).get("tuned") or {}).get("forgetting"),
        f"{metric}_gain_interval": decision.get("gain_interval"),
        "metrics_with_intervals": dg.MetadataValue.json(evaluation.metrics_with_intervals(report)),
        "promote": decision["promote"], "decision": decision["reason"],
        "n_test": report["n_test"], "seconds": report.get("seconds"), "inputs_hash": inputs_hash,
        # where the seconds went (per model: loading, test rows, k-shot, retention) and the rows generated
        "seconds_by_part": dg.MetadataValue.json(report.get("seconds_by_part") or {}),
        "generated_rows": dg.MetadataValue.json(report.get("generated_rows") or {}),
        "adapter_lineage_hash": report["adapter_lineage_hash"], "skipped_evaluation": skipped,
        "promoted_versions": dg.MetadataValue.json(report["history"]), **judged,
    })
