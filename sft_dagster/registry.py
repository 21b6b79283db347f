"""A folder-based model registry: promoted adapters with their model card and lineage.

Layout: `<registry>/<pipeline>/v<N>/{adapter files, MODEL_CARD.md, lineage.json, evaluation.json}` and
`<registry>/<pipeline>/LATEST` naming the newest version. A version is written to a temp folder and
renamed into place, so a reader never sees a half-copied model.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path


def promotion_decision(report: dict, metric: str, min_improvement: float) -> tuple[bool, str]:
    """Does the fine-tuned model beat the base model by the required margin?"""
    if metric not in report["tuned"] or metric not in report["base"]:
        return False, f"metric {metric!r} is not in the evaluation report (has {sorted(report['tuned'])})"
    base, tuned = report["base"][metric], report["tuned"][metric]
    lower_is_better = metric in ("loss", "perplexity")
    gain = (base - tuned) if lower_is_better else (tuned - base)
    ok = gain >= min_improvement
    verb = "beats" if ok else "does not beat"
    return ok, f"fine-tuned {metric} {tuned:.4f} {verb} base {base:.4f} by the required {min_improvement:+.4f} (gain {gain:+.4f})"


def _versions(pipeline_dir: Path) -> list[int]:
    return sorted(int(p.name[1:]) for p in pipeline_dir.glob("v*") if p.is_dir() and p.name[1:].isdigit())


def latest_version(pipeline_dir: Path) -> Path | None:
    pointer = pipeline_dir / "LATEST"
    if pointer.exists():
        return pipeline_dir / pointer.read_text().strip()
    return None


def model_card(pipeline: str, version: str, report: dict, lineage: dict, decision: str) -> str:
    metric = report["primary_metric"]
    return "\n".join(
        [
            f"# {pipeline} {version}",
            "",
            f"Fine-tuned with sft_dagster ({lineage.get('method', '?')}) from `{lineage.get('base_model', '?')}`.",
            "",
            f"- Task: {report['task']}",
            f"- Test rows: {report['n_test']}",
            f"- {metric}: base {report['base'][metric]:.4f}, fine-tuned {report['tuned'][metric]:.4f}",
            f"- Promotion: {decision}",
            f"- Promoted at: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
            "",
            "## Lineage",
            "",
            "```json",
            json.dumps(lineage, indent=2, sort_keys=True),
            "```",
            "",
            "## Use",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "base = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)",
            f"model = PeftModel.from_pretrained(base, '{pipeline}/{version}')",
            "```",
            "",
        ]
    )


def promote(adapter_dir: Path, registry_dir: Path, report: dict, lineage: dict, decision: str) -> Path:
    """Copy the adapter into the next registry version and point LATEST at it."""
    registry_dir.mkdir(parents=True, exist_ok=True)
    existing = _versions(registry_dir)
    # Promoting the same adapter twice (same lineage) is a no-op: return the existing version.
    if (current := latest_version(registry_dir)) is not None and (current / "lineage.json").exists():
        if json.loads((current / "lineage.json").read_text()) == lineage:
            return current
    version = f"v{(existing[-1] + 1) if existing else 1}"
    tmp = registry_dir / f".{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter_dir, tmp)
    (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True))
    (tmp / "evaluation.json").write_text(json.dumps(report, indent=2, default=str))
    (tmp / "MODEL_CARD.md").write_text(model_card(registry_dir.name, version, report, lineage, decision))
    os.replace(tmp, registry_dir / version)
    pointer_tmp = registry_dir / ".LATEST.tmp"
    pointer_tmp.write_text(version + "\n")
    os.replace(pointer_tmp, registry_dir / "LATEST")
    return registry_dir / version
