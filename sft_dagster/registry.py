"""A folder-based model registry: promoted adapters (or few-shot prompt models: `prompt.json` and the
base model reference, sft_dagster/prompt_model.py) with their model card, lineage and evaluation.

Layout: `<registry>/<pipeline>/v<N>/{adapter files, MODEL_CARD.md, lineage.json, evaluation.json,
promotion.json}` and
`<registry>/<pipeline>/LATEST` naming the current version: the **champion** every new candidate must
beat. A version is built under a temp name and renamed into place, and LATEST is replaced atomically,
so a reader never sees a half-copied model or a pointer to one.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from . import atomic, metrics
from .judge import markdown_lines as win_rate_lines
from .prompt_model import METHOD as FEW_SHOT
from .prompt_model import PROMPT_FILE
from .schema import lineage_hash_of

def _gain(metric: str, candidate: float, reference: float) -> float:
    """The candidate's gain over the reference: positive is better (TER, loss and the like: lower is better)."""
    return (reference - candidate) if metrics.lower_is_better(metric) else (candidate - reference)


def all_tasks_decision(report: dict, min_improvement: float, require_significant: bool = False) -> dict:
    """A multi-task report's decision: the main task's (`report["promotion"]`, with forgetting) and every
    further task's on its own primary metric; the adapter is promoted only when all pass."""
    main = report["promotion"]
    decisions = {"main": main} | {
        name: promotion_decision(task_report, task_report["primary_metric"], min_improvement,
                                 require_significant=require_significant)
        for name, task_report in report["tasks"].items() if name != "main"}
    blocked = [f"{name}: {d['reason']}" for name, d in decisions.items() if not d["promote"]]
    return main | {"promote": not blocked, "tasks": decisions,
                   "reason": ("every task passes: " + main["reason"]) if not blocked else "; ".join(blocked)}


def promotion_decision(report: dict, metric: str, min_improvement: float, max_forgetting: float | None = None,
                       require_significant: bool = False) -> dict:
    """Champion / challenger: may the candidate (`tuned`) replace the current promoted model?

    With a champion in the report, the candidate must beat it on `metric` by `min_improvement` and must
    not be worse on the report's primary metric; before the first promotion the reference is the base
    model. With `max_forgetting`, it must also keep answering the general prompts the base model answers
    right (report["retention"]): forgetting above the limit blocks promotion. A candidate that *is* the champion (same lineage) needs no promotion and passes.
    A negative `min_improvement` is an allowed drop (the candidate may be at most that much worse), and
    the reason says so. With `require_significant`, the lower end of the 95% interval of the gain (the
    report's paired bootstrap of the candidate's difference from the same reference) must be above
    `min_improvement` as well; a report without that interval is not promoted.
    Returns `{"promote", "reason", "compared_with", "metric", "candidate", "reference", "gain", ...}`.
    """
    tuned = report["tuned"]
    champion = report.get("champion")
    if report.get("candidate_is_champion"):
        what = (f"the current champion {report.get('champion_version')} is the {report['champion_tuned_from_candidate']} "
                "policy tuned from this candidate" if report.get("champion_tuned_from_candidate") else
                f"the candidate is the current champion {report.get('champion_version')} (same lineage)")
        return {"promote": True, "compared_with": f"champion {report.get('champion_version')}", "metric": metric,
                "reason": f"{what}: nothing new to promote"}
    if report.get("champion_error"):
        return {"promote": False, "compared_with": "champion", "metric": metric,
                "reason": f"the current champion could not be scored: {report['champion_error']}"}
    reference_name = f"champion {report.get('champion_version')}" if champion else "base model"
    reference = champion if champion else report["base"]
    if metric not in tuned or metric not in reference:
        return {"promote": False, "compared_with": reference_name, "metric": metric,
                "reason": f"metric {metric!r} is not in the evaluation report (has {sorted(tuned)})"}
    if tuned[metric] is None or reference[metric] is None:  # e.g. distinct-2 of outputs under two words
        return {"promote": False, "compared_with": reference_name, "metric": metric,
                "reason": f"metric {metric!r} has no value for the {'candidate' if tuned[metric] is None else reference_name}"}
    gain = _gain(metric, tuned[metric], reference[metric])
    decision = {"compared_with": reference_name, "metric": metric, "candidate": tuned[metric],
                "reference": reference[metric], "gain": gain, "required_gain": min_improvement}
    reasons = []
    ok = gain >= min_improvement - 1e-12
    if min_improvement < 0:  # a tolerance (the preference promotion's max_task_metric_drop), not a required gain
        reasons.append(f"candidate {metric} {tuned[metric]:.4f} {'is within' if ok else 'falls outside'} the allowed "
                       f"drop of {-min_improvement:.4f} from {reference_name} {reference[metric]:.4f} (change {gain:+.4f})")
    else:
        reasons.append(f"candidate {metric} {tuned[metric]:.4f} {'beats' if ok else 'does not beat'} {reference_name} "
                       f"{reference[metric]:.4f} by the required {min_improvement:+.4f} (gain {gain:+.4f})")
    ok = _significant(report, metric, "tuned_minus_champion" if champion else "tuned_minus_base", min_improvement,
                      decision, reasons, require_significant) and ok
    primary = report.get("primary_metric")
    if champion and primary and primary != metric and primary in tuned and primary in champion:
        primary_gain = _gain(primary, tuned[primary], champion[primary])
        decision["primary_metric_gain"] = primary_gain
        if primary_gain < 0:
            ok = False
            reasons.append(f"and it is worse on the primary metric {primary} ({tuned[primary]:.4f} vs {champion[primary]:.4f})")
    retention = (report.get("retention") or {}).get("models", {}).get("tuned")
    if retention is not None:
        decision["forgetting"] = retention["forgetting"]
        if max_forgetting is not None and retention["forgetting"] > max_forgetting:
            ok = False
            reasons.append(f"and it forgets {retention['forgetting']:.1%} of the general prompts the base model answers "
                           f"right (promotion.max_forgetting {max_forgetting:.1%})")
    return decision | {"promote": ok, "reason": "; ".join(reasons)}


def _significant(report: dict, metric: str, difference: str, min_improvement: float, decision: dict,
                 reasons: list[str], required: bool) -> bool:
    """Whether the interval of the candidate's gain on `metric` is above `min_improvement`. The interval goes
    into `decision` whenever the report has it; only when `required` does it decide (and is in `reasons`)."""
    interval = metrics.gain_interval(report.get("intervals"), difference, metric)
    if interval is not None:
        decision["gain_interval"] = interval
    if not required:
        return True
    if interval is None:
        reasons.append(f"and the report has no interval of the {metric} gain, which promotion.require_significant needs")
        return False
    level = (report.get("intervals") or {}).get("confidence", 0.95)
    cleared = interval[0] > min_improvement  # strictly: a lower end of 0 is no evidence of a gain
    reasons.append(f"{'and' if cleared else 'but'} the {level:.0%} interval of the gain [{interval[0]:+.4f}, "
                   f"{interval[1]:+.4f}] {'clears' if cleared else 'does not clear'} {min_improvement:+.4f} "
                   "(promotion.require_significant)")
    return cleared


def _versions(pipeline_dir: Path) -> list[int]:
    return sorted(int(p.name[1:]) for p in pipeline_dir.glob("v*") if p.is_dir() and p.name[1:].isdigit())


def latest_version(pipeline_dir: Path) -> Path | None:
    pointer = pipeline_dir / "LATEST"
    if pointer.exists():
        return pipeline_dir / pointer.read_text().strip()
    return None


def tuned_from(lineage: dict, adapter_lineage_hash: str) -> bool:
    """Whether the promoted model with this lineage is a preference-tuned policy (DPO, PPO) trained from the
    SFT adapter with that lineage hash (its lineage's `sft_adapter`)."""
    return lineage.get("sft_adapter") == adapter_lineage_hash


def champion(pipeline_dir: Path) -> dict | None:
    """The currently promoted version (LATEST) as `{"version", "adapter_dir", "method", "lineage_hash", ...}`;
    `method` is the lineage's (`lora`, `qlora`, `full`, or `few_shot` for a prompt model), so evaluation loads
    or prompts it as what it is."""
    current = latest_version(pipeline_dir)
    if current is None or not (current / "lineage.json").exists():
        return None
    lineage = json.loads((current / "lineage.json").read_text())
    return {"version": current.name, "adapter_dir": str(current), "method": lineage.get("method", "lora"),
            "lineage": lineage, "lineage_hash": lineage_hash_of(lineage), "base_model_hash": lineage.get("base_model_hash")}


def history(pipeline_dir: Path, n: int) -> list[dict]:
    """The last `n` promoted versions, newest first: version, when it was promoted, the candidate's
    metrics in the report that promoted it, and whether it is the current champion. A drift over
    nights shows here without opening the experiment tracker."""
    current = latest_version(pipeline_dir)
    out = []
    for number in reversed(_versions(pipeline_dir)[-n:] if n > 0 else []):
        version_dir = pipeline_dir / f"v{number}"
        report_file, promotion_file = version_dir / "evaluation.json", version_dir / "promotion.json"
        if not report_file.exists():
            continue
        report = json.loads(report_file.read_text())
        promotion = json.loads(promotion_file.read_text()) if promotion_file.exists() else {}
        promoted_at = promotion.get("promoted_at") or datetime.fromtimestamp(
            report_file.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        out.append({"version": version_dir.name, "promoted_at": promoted_at, "n_test": report.get("n_test"),
                    "champion": current is not None and current.name == version_dir.name,
                    "metrics": {k: v for k, v in (report.get("tuned") or {}).items() if isinstance(v, (int, float))}})
    return out


def _use(pipeline: str, version: str, lineage: dict) -> list[str]:
    """The model card's "Use" code: a PEFT adapter on the base model, or a few-shot prompt model's
    messages (its examples as earlier turns, as the evaluation scored it) for the base model itself."""
    if lineage.get("method") != FEW_SHOT:
        return ["from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "base = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)",
                f"model = PeftModel.from_pretrained(base, '{pipeline}/{version}')"]
    return [
        "import json",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        (f"# BASE_MODEL_DIR: the base model {lineage.get('base_model', '?')!r} (weights hash "
         f"{lineage.get('base_model_hash', '?')}, tokenizer hash {lineage.get('tokenizer_hash', '?')})"),
        f"prompt = json.loads(open('{pipeline}/{version}/{PROMPT_FILE}').read())",
        "tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)",
        "model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)",
        "messages = [{'role': 'system', 'content': prompt['system']}] if prompt['system'] else []",
        "for example in prompt['examples']:",
        "    messages += [{'role': 'user', 'content': prompt['template'].format(prompt=example['prompt'])},",
        "                 {'role': 'assistant', 'content': example['response']}]",
        "messages.append({'role': 'user', 'content': prompt['template'].format(prompt=TEXT)})",
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors='pt')",
        "output = model.generate(**inputs, max_new_tokens=16, do_sample=False)",
        "reply = tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)",
    ]


def _metric_lines(report: dict) -> list[str]:
    """The model card's metrics: every metric of the report with its 95% interval, per model, and the
    candidate's difference from the model it was compared with (none for a report without intervals)."""
    intervals = report.get("intervals") or {}
    champion = bool(report.get("champion"))
    columns = [("base", "base"), *([("champion", f"champion {report.get('champion_version')}")] if champion else []),
               ("tuned", "this version")]
    table = metrics.markdown_table(intervals, {k: report.get(k) or {} for k, _ in columns}, columns,
                                   intervals.get("compared_with"), f"change vs {'champion' if champion else 'base'}")
    if not table:
        return []
    return ["", f"## Metrics ({intervals['confidence']:.0%} intervals)", "", *table]


def model_card(pipeline: str, version: str, report: dict, lineage: dict, decision: dict) -> str:
    metric = report["primary_metric"]
    champion_line = (f", champion {report['champion_version']} {report['champion'][metric]:.4f}"
                     if report.get("champion") else " (first promotion: compared with the base model)")
    libraries = ", ".join(f"{k} {v}" for k, v in sorted((lineage.get("libraries") or {}).items()))
    few_shot = lineage.get("method") == FEW_SHOT
    what = (f"A few-shot prompt of `{lineage.get('base_model', '?')}`, promoted by sft_dagster: no trained weights, "
            f"the base model with {len(lineage.get('example_ids', []))} examples from the train split in its prompt "
            f"(`{PROMPT_FILE}`; example ids {', '.join(lineage.get('example_ids', []))}), because the train split "
            "had fewer rows than training.min_rows_to_train." if few_shot else
            f"Fine-tuned with sft_dagster ({lineage.get('method', '?')}) from `{lineage.get('base_model', '?')}`.")
    return "\n".join(
        [
            f"# {pipeline} {version}",
            "",
            what,
            "",
            f"- Task: {report['task']}",
            f"- Test rows: {report['n_test']}",
            f"- {metric}: base {report['base'][metric]:.4f}, candidate {report['tuned'][metric]:.4f}{champion_line}",
            f"- Promotion: {decision['reason']}",
            *([] if few_shot else [f"- Trained on: {lineage.get('device', '?')}; {libraries or 'library versions not recorded'}"]),
            f"- Promoted at: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
            *_metric_lines(report),
            *win_rate_lines(report.get("win_rate")),
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
            *_use(pipeline, version, lineage),
            "```",
            "",
        ]
    )


def promote(adapter_dir: Path, registry_dir: Path, report: dict, lineage: dict, decision: dict) -> Path:
    """Copy the adapter (or prompt model) folder into the next registry version and point LATEST at it
    (the new champion)."""
    registry_dir.mkdir(parents=True, exist_ok=True)
    existing = _versions(registry_dir)
    # Promoting the same adapter twice (same lineage) is a no-op: return the existing version. So is
    # promoting an SFT adapter whose preference-tuned policy is the champion: the champion is its successor.
    if (current := latest_version(registry_dir)) is not None and (current / "lineage.json").exists():
        current_lineage = json.loads((current / "lineage.json").read_text())
        if current_lineage == lineage or tuned_from(current_lineage, lineage_hash_of(lineage)):
            return current
    version = f"v{(existing[-1] + 1) if existing else 1}"
    promoted_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with atomic.atomic_dir(registry_dir / version) as tmp:
        shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
        (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True))
        (tmp / "evaluation.json").write_text(json.dumps(report, indent=2, default=str))
        (tmp / "MODEL_CARD.md").write_text(model_card(registry_dir.name, version, report, lineage, decision))
        (tmp / "promotion.json").write_text(json.dumps({"version": version, "promoted_at": promoted_at,
                                                        "decision": decision}, indent=2, default=str))
    atomic.write_text(registry_dir / "LATEST", version + "\n")
    return registry_dir / version
