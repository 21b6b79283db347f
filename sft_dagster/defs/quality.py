"""cleanlab: label issues, outliers and near duplicates, with the review queue and its blocking gates."""


import time

import dagster as dg
import pandas as pd

from .. import atomic, labels, quality
from ..quality import find_label_issues
from ..schema import frame_hash
from .common import PipelineDefs, code_version, outcome_to_check_result, preview
from .resources import SFTStorage
from .shared import review_queue_path

LABEL_GATE_CHECKS = [
    ("label_issue_rate", True, "Share of rows cleanlab flags as label issues is within the spec's threshold"),
    ("issue_types_evaluated", True, "Every expected cleanlab issue type was evaluated (a skipped type is a failure)"),
    ("class_imbalance", False, "Class balance (warning)"),
    ("non_iid", False, "Rows look independent and identically distributed (warning)"),
]


def build(p: PipelineDefs) -> None:
    spec, K = p.spec, p.key
    gate_specs = [dg.AssetCheckSpec(c, asset=K("label_issues"), blocking=b, description=d) for c, b, d in LABEL_GATE_CHECKS]
    p.blocking_checks += [p.check_key("label_issues", c) for c, b, _ in LABEL_GATE_CHECKS if b]

    @dg.asset(**p.asset_args("label_issues", kinds={"cleanlab", "scikitlearn"}, code_version=code_version(quality),
                             check_specs=gate_specs, ins=p.ins("labelled_examples"),
                             description="cleanlab's findings for every labelled row (label issues, outliers, near "
                                         "duplicates, suggested labels); the review queue is the flagged rows, worst first."))
    def label_issues(context: dg.AssetExecutionContext, storage: SFTStorage, labelled_examples: pd.DataFrame):
        start = time.perf_counter()
        report = find_label_issues(labelled_examples, spec.task, spec.quality.cleanlab, seed=spec.splits.seed)
        queue_csv = atomic.write_csv(review_queue_path(spec, storage), report.review_queue)
        metadata = {
            "dagster/row_count": len(report.flags),
            "review_queue_rows": len(report.review_queue),
            "review_queue_csv": dg.MetadataValue.path(str(queue_csv)),
            "summary": dg.MetadataValue.json(report.summary),
            "preview": preview(report.review_queue, ["example_id", "prompt", "given_label", "suggested_label", "issue_types", "severity"]),
            "seconds": round(time.perf_counter() - start, 3),
        }
        if spec.quality.audit_file:
            audit = pd.read_csv(spec.resolve(spec.quality.audit_file))
            metadata["audit"] = dg.MetadataValue.json(labels.label_issue_detection_scores(labelled_examples, report.flags, audit))
        yield dg.Output(report.flags, data_version=dg.DataVersion(frame_hash(report.flags)), metadata=metadata)
        outcomes = {o.name: o for o in report.gate_outcomes(spec.quality.cleanlab)}
        for check, _, _ in LABEL_GATE_CHECKS:
            if check in outcomes:
                yield outcome_to_check_result(outcomes[check], K("label_issues"))
            else:
                yield dg.AssetCheckResult(asset_key=K("label_issues"), check_name=check, passed=False,
                                          description=f"the label-issue report produced no {check} outcome")

    p.assets.append(label_issues)
