"""Data-quality gates: declarative suites (great-expectations + SFT checks) and cleanlab findings."""

from .checks import FAILED_CHECKS, CheckOutcome, blocking_failures, run_suite, with_failed_checks
from .label_issues import LabelIssueReport, find_label_issues
from .suite import Suite, SuiteError, load_suite

__all__ = ["FAILED_CHECKS", "CheckOutcome", "LabelIssueReport", "Suite", "SuiteError", "blocking_failures",
           "find_label_issues", "load_suite", "run_suite", "with_failed_checks"]
