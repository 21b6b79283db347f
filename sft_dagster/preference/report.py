"""SFT vs DPO vs PPO on held-out data: what the `preference_report` asset shows and promotion decides on.

For each policy (a LoRA adapter, or a full model, over the base):
- replies to the held-out (test-split) prompts of the pairs, greedy, and their reward-model scores;
- win rate over SFT judged by the reward model (`losses.pairwise_accuracy` of the policy's scores
  against SFT's on the same prompt: a tie counts one half, SFT against itself gets 0.5);
- pairwise accuracy of the policy's own sequence log-probs on held-out human pairs (log pi(chosen) >
  log pi(rejected));
- the task's metrics on the SFT test split (`evaluation.score_model`), for the promotion gate;
- with `report.rule: demo`, the share of replies that satisfy the demo annotator's rule, on the held-out
  prompts whose row in `preference.prompts` gives the answer (imported pairs' prompts have none).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from .. import evaluation
from ..spec import PipelineSpec
from .demo_data import rule_satisfaction
from .losses import collate_pairs, encode_pairs, pairwise_accuracy, sequence_logprobs


def held_out(pairs: pd.DataFrame, max_prompts: int, max_pairs: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(prompts, non-tie pairs) of the test split, in content-hash order (stable, independent of row order)."""
    test = pairs[pairs["split"] == "test"]
    if test.empty:
        raise ValueError("no held-out preference pairs: the test split of preference_pairs is empty "
                         "(more rankings, or a larger splits.test)")
    prompts = (test.drop_duplicates("prompt_id").sort_values("prompt_id", kind="stable")
               [["prompt_id", "prompt", "system", "history"]].head(max_prompts).reset_index(drop=True))
    scored = test[~test["tie"].astype(bool)].sort_values("pair_id", kind="stable").head(max_pairs).reset_index(drop=True)
    return prompts, scored


@torch.no_grad()
def logprob_accuracy(model, tokenizer, pairs: pd.DataFrame, spec: PipelineSpec, batch_size: int, device: str) -> float:
    """Share of pairs whose chosen reply has the higher sequence log-probability under `model`."""
    encoded = encode_pairs(tokenizer, pairs, spec.task, spec.model.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chosen, rejected = [], []
    for start in range(0, len(encoded), batch_size):
        part = encoded[start : start + batch_size]
        logps = sequence_logprobs(model, collate_pairs(part, pad, device))
        chosen += logps[: len(part)].tolist()
        rejected += logps[len(part) :].tolist()
    return pairwise_accuracy(chosen, rejected)


def rule_rows(prompts: pd.DataFrame, preference_prompts: pd.DataFrame) -> pd.DataFrame:
    """The held-out prompts with the demo's `answer` and `allowed_numbers` (from the prompt rows' extra fields)."""
    extra = {pid: json.loads(m) for pid, m in zip(preference_prompts["prompt_id"], preference_prompts["metadata"])}
    rows = prompts.assign(answer=[extra.get(pid, {}).get("answer") for pid in prompts["prompt_id"]],
                          allowed_numbers=[extra.get(pid, {}).get("allowed_numbers") or [] for pid in prompts["prompt_id"]])
    return rows


def compare_policies(spec: PipelineSpec, model_dir: Path, models: dict[str, dict], reward_model_dir: str,
                     pairs: pd.DataFrame, preference_prompts: pd.DataFrame, sft_test: pd.DataFrame,
                     device: str = "cpu") -> dict:
    """The report: `models` maps a policy name ("sft", "dpo", "ppo") to {model_dir, method, lineage_hash}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..training import load_trained_reward_model

    cfg, task = spec.preference.report, spec.task
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts, scored_pairs = held_out(pairs, cfg.max_prompts, cfg.max_pairs)
    test_rows = evaluation.test_rows(sft_test, spec)
    metric = evaluation.primary_metric(task)
    reward = load_trained_reward_model(reward_model_dir, device, base_model_dir=model_dir).reward_fn(cfg.batch_size)
    rules = rule_rows(prompts, preference_prompts) if cfg.rule == "demo" else None
    if rules is not None and rules["answer"].isna().all():
        raise ValueError("preference.report.rule: demo needs `answer` (and `allowed_numbers`) in the rows of "
                         "preference.prompts; no held-out prompt has one")
    known = rules["answer"].notna().to_numpy() if rules is not None else None  # imported pairs' prompts have none

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    base_task = evaluation.score_model(base, tokenizer, test_rows, spec, device, with_loss=False).metrics
    del base
    policies: dict[str, dict] = {}
    task_metrics: dict[str, dict] = {}
    scores: dict[str, list[float]] = {}
    samples: list[dict] = []
    for name, record in models.items():
        model = evaluation.load_tuned_model(Path(model_dir), Path(record["model_dir"]), record["method"], device)
        replies = evaluation.generate(model, tokenizer, prompts, task, cfg.max_new_tokens, cfg.batch_size, device)
        scores[name] = reward(prompts["prompt"].astype(str).tolist(), replies)
        task_metrics[name] = evaluation.score_model(model, tokenizer, test_rows, spec, device, with_loss=False).metrics
        row = {"lineage_hash": record["lineage_hash"], "reward_score": sum(scores[name]) / len(replies),
               "logprob_pairwise_accuracy": logprob_accuracy(model, tokenizer, scored_pairs, spec, cfg.batch_size, device),
               f"task_{metric}": task_metrics[name][metric]}
        if rules is not None:
            satisfied = rule_satisfaction(rules[known], [r for r, k in zip(replies, known) if k])
            row |= {"rule_prompts": satisfied["n"], "rule_satisfaction": satisfied["satisfied"],
                    **{f"rule_{part}": satisfied[part] for part in ("correct", "no_hedging", "concise")}}
        policies[name] = row
        samples += [{"policy": name, "prompt": p, "reply": r, "reward_score": round(s, 4)}
                    for p, r, s in list(zip(prompts["prompt"], replies, scores[name]))[: cfg.num_samples]]
        del model
    for name in policies:
        policies[name]["win_rate_vs_sft"] = pairwise_accuracy(scores[name], scores["sft"])
    task_report = {
        name: {"primary_metric": metric, "task": task.type, "n_test": len(test_rows), "base": base_task,
               "tuned": task_metrics[name], "champion": task_metrics["sft"],
               "champion_version": f"SFT adapter {models['sft']['lineage_hash']}"}
        for name in policies if name != "sft"
    }
    return {"primary_metric": metric, "held_out_prompts": len(prompts), "held_out_pairs": len(scored_pairs),
            "n_test": len(test_rows), "base_task": base_task, "policies": policies, "task_report": task_report,
            "samples": samples}


def render_markdown(report: dict) -> str:
    """The report as a Markdown table (one row per policy) and the samples."""
    table = pd.DataFrame.from_dict(report["policies"], orient="index").drop(columns=["lineage_hash"])
    lines = [f"Held-out prompts: {report['held_out_prompts']}, held-out pairs: {report['held_out_pairs']}, "
             f"SFT test rows: {report['n_test']} (base model {report['primary_metric']} "
             f"{report['base_task'].get(report['primary_metric'], float('nan')):.4f})", "",
             table.round(4).to_markdown(), ""]
    if report.get("promotion"):
        lines += [f"Promotion of {report['promotion']['candidate_policy']}: {report['promotion']['reason']}", ""]
    if report["samples"]:
        lines += ["## Samples", "", pd.DataFrame(report["samples"]).to_markdown(index=False)]
    return "\n".join(lines)
