"""Data-quality gates: declarative suites (great-expectations + SFT checks) and cleanlab findings."""

from .checks import CheckOutcome, run_suite
from .label_issues import LabelIssueReport, find_label_issues
from .suite import Suite, SuiteError, load_suite

__all__ = ["CheckOutcome", "LabelIssueReport", "Suite", "SuiteError", "find_label_issues", "load_suite", "run_suite"]
