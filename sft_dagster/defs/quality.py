"""cleanlab: label issues, outliers and near duplicates, with the review queue and its blocking gates;
for generation tasks also the response findings (quality/response_issues.py) and their gates."""


import json
import time

import dagster as dg
import pandas as pd

from .. import atomic, labels, langid, quality
from ..quality import duplicates, find_label_issues
from ..quality.label_issues import LABEL_GATE_CHECKS, LABEL_TASK_ONLY, label_issue_preflight, with_response_issues
from ..quality.response_issues import RESPONSE_GATE_CHECKS, needs_base_model, response_issue_report, response_preflight
from ..console import LABEL_PREFLIGHT
from ..quality.check_registry import CheckDef
from ..schema import frame_hash
from .common import PipelineDefs, check_specs, code_version, outcome_to_check_result, severity
from .resources import SFTStorage
from .shared import resolve_base_model, review_queue_path


def gate_checks(spec) -> list[CheckDef]:
    """The cleanlab gates that apply to the spec's task; a generation task's response-finding gates."""
    cleanlab = [c for c in LABEL_GATE_CHECKS if spec.task.is_label_task or c.name not in LABEL_TASK_ONLY]
    return cleanlab if spec.task.is_label_task else cleanlab + RESPONSE_GATE_CHECKS


def build(p: PipelineDefs) -> None:
    spec, K = p.spec, p.key
    gates = gate_checks(spec)
    gate_specs = check_specs(K("label_issues"), gates)
    p.blocking_checks += [s.key for s in gate_specs if s.blocking]

    uses_llm = spec.quality.cleanlab.enabled and "llm" in spec.quality.cleanlab.views
    uses_fit = needs_base_model(spec.task, spec.quality.response)  # the `misaligned` response finding

    @dg.asset(**p.asset_args("label_issues", kinds={"cleanlab", "scikitlearn"}, code_version=code_version(quality, langid),
                             check_specs=gate_specs, ins=p.ins("labelled_examples"),
                             deps=[K("base_model")] if uses_llm or uses_fit else [],
                             description="cleanlab's findings for every labelled row (label issues, outliers, near "
                                         "duplicates, suggested labels); the review queue is the flagged rows, worst first."))
    def label_issues(context: dg.AssetExecutionContext, storage: SFTStorage, labelled_examples: pd.DataFrame):
        cfg = spec.quality.cleanlab
        model_dir = resolve_base_model(spec, storage).path if uses_llm or uses_fit else None  # llm view, misaligned
        plan = None
        fit_cache = p.paths(storage).quality_dir / "response_fit"
        if cfg.enabled:
            plan = label_issue_preflight(labelled_examples, spec.task, cfg, model_dir=model_dir, seed=spec.splits.seed)
        # generation tasks: the misaligned finding's scoring, estimated beside the label views
        plan = response_preflight(plan, labelled_examples, spec.task, spec.quality.response, model_dir, fit_cache)
        if plan is not None:
            context.log.info(f"{LABEL_PREFLIGHT}{json.dumps(plan, default=str)}")
        start = time.perf_counter()
        report = find_label_issues(labelled_examples, spec.task, cfg, seed=spec.splits.seed, model_dir=model_dir)
        if not spec.task.is_label_task:  # response findings: misaligned, wrong language, copies ...
            response = response_issue_report(labelled_examples, spec.task, spec.quality.response, model_dir=model_dir,
                                             cache_dir=fit_cache)
            report = with_response_issues(report, labelled_examples, response)
        queue = report.review_queue
        if spec.task.is_label_task:  # duplicates whose labels disagree wait for a person in the same queue
            queue = duplicates.with_label_conflicts(queue, labelled_examples, report.flags)
        queue_csv = atomic.write_csv(review_queue_path(spec, storage), queue)
        conflicts = queue["conflict_labels"].notna() if "conflict_labels" in queue else pd.Series(False, index=queue.index)
        metadata = {
            "dagster/row_count": len(report.flags),
            "review_queue_rows": len(queue),
            "label_conflict_rows": int(conflicts.sum()),
            "review_queue_csv": dg.MetadataValue.path(str(queue_csv)),
            "summary": dg.MetadataValue.json(report.summary),
            "status": report.summary.get("status", "run"),
            # How deep to review: estimated precision of the queue's top N label issues (docs/data-quality.md).
            "estimated_precision_top": dg.MetadataValue.json(report.summary.get("estimated_precision_top") or {}),
            "review_depth_for_precision": dg.MetadataValue.json(report.summary.get("review_depth_for_precision") or {}),
            "preview": p.preview(queue, ["example_id", "prompt", "given_label", "suggested_label", "suggested_confidence",
                                         "estimated_precision_at_rank", "issue_types", "severity", "response_issue_reason"]),
            "seconds": round(time.perf_counter() - start, 3),
            **({"preflight": dg.MetadataValue.json(json.loads(json.dumps(plan, default=str)))} if plan else {}),
        }
        if "response" in report.summary:  # generation tasks: the response findings, by kind
            metadata["response_issues"] = dg.MetadataValue.json(
                {k: report.summary["response"].get(k) for k in ("issue_count", "issue_rate", "warning_count", "by_kind",
                                                                "estimated_precision_top")})
        if spec.quality.audit_file:
            audit = pd.read_csv(spec.resolve(spec.quality.audit_file))
            metadata["audit"] = dg.MetadataValue.json(labels.label_issue_detection_scores(labelled_examples, report.flags, audit))
        yield dg.Output(report.flags, data_version=dg.DataVersion(frame_hash(report.flags)), metadata=metadata)
        outcomes = {o.name: o for o in report.gate_outcomes(spec.quality.cleanlab)}
        if "response" in report.summary:
            outcomes |= {o.name: o for o in response.gate_outcomes(spec.quality.response)}
        for check, blocking, _ in gates:
            if check in outcomes:
                yield outcome_to_check_result(outcomes[check], K("label_issues"), previews=spec.quality.previews,
                                              failing_ids_file=queue_csv, blocking=blocking)
            else:
                yield dg.AssetCheckResult(asset_key=K("label_issues"), check_name=check, passed=False,
                                          severity=severity(blocking),
                                          description=f"the label-issue report produced no {check} outcome")

    p.assets.append(label_issues)
