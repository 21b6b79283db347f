"""Data-quality gates: declarative suites (great-expectations + SFT checks) and cleanlab findings."""

from .checks import CheckOutcome, blocking_failures, findings_frame, run_suite
from .label_issues import LabelIssueReport, find_label_issues
from .suite import Suite, SuiteError, load_suite

__all__ = ["CheckOutcome", "LabelIssueReport", "Suite", "SuiteError", "blocking_failures", "find_label_issues", "findings_frame",
           "load_suite", "run_suite"]
