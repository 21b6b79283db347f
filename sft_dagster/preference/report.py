"""SFT vs DPO vs PPO on held-out data: what the `preference_report` asset shows and promotion decides on.

For each policy (a LoRA adapter, or a full model, over the base), on the held-out (test-split) prompts
of the pairs:
- `report.samples_per_prompt` sampled replies per prompt (temperature and top-p of the candidate
  generation unless the report sets its own), seeded per (seed, prompt, sample index) so that every
  policy draws with the same random numbers (paired comparisons), and the greedy reply;
- the reward-model score of the sampled replies (`greedy_reward_score`: of the greedy ones); win rate
  over SFT judged by the reward model (`losses.pairwise_accuracy` of the policy's scores against SFT's
  on the same prompt and draw: a tie counts one half, SFT against itself gets 0.5);
- pairwise accuracy of the policy's own sequence log-probs on held-out human pairs (log pi(chosen) >
  log pi(rejected));
- the task's metrics on the SFT test split (`evaluation.score_model`), for the promotion gate;
- with `report.rule: demo`, the share of sampled (and greedy) replies that satisfy the demo annotator's
  rule, its style part (no hedging and concise) and its correctness part apart, on the held-out prompts
  whose row in `preference.prompts` gives the answer (imported pairs' prompts have none);
- `vs_sft`: each measure's mean change from SFT over prompts with a 95% bootstrap interval over prompts.

Why sampled replies: a policy is a distribution; its greedy reply is one point of it. In the first
version of the demo every greedy SFT reply already followed the style part of the rule while 7% of its
sampled replies did not (BENCHMARKS.md), and a greedy-only report on 13 prompts moves in steps of 1/13.
The seeded, shared draws make the policies' differences paired (sample k of a prompt differs between
two policies only where their distributions do), and the bootstrap over prompts says how sure a change is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from .. import artefacts, evaluation
from ..formatting import pad_id
from ..spec import PipelineSpec
from .demo_data import RULE_PARTS, rule_parts, rule_satisfaction
from .losses import collate_pair_groups, encode_pairs, group_pairs, pair_sides, pairwise_accuracy, sequence_logprobs

BOOTSTRAP_RESAMPLES = 2000  # resamples of the paired bootstrap over prompts


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
    """Share of pairs whose chosen reply has the higher sequence log-probability under `model` (each
    distinct reply of a prompt scored once, `losses.group_pairs`)."""
    groups = group_pairs(encode_pairs(tokenizer, pairs, spec.task, spec.model.max_length))
    pad = pad_id(tokenizer)
    chosen, rejected = [], []
    for start in range(0, len(groups), batch_size):
        batch = collate_pair_groups(groups[start : start + batch_size], pad, device)
        sides = pair_sides(sequence_logprobs(model, batch), batch)
        chosen += sides[0].tolist()
        rejected += sides[1].tolist()
    return pairwise_accuracy(chosen, rejected)


def rule_rows(prompts: pd.DataFrame, preference_prompts: pd.DataFrame) -> pd.DataFrame:
    """The held-out prompts with the demo's `answer` and `allowed_numbers` (from the prompt rows' extra fields)."""
    extra = {pid: json.loads(m) for pid, m in zip(preference_prompts["prompt_id"], preference_prompts["metadata"])}
    rows = prompts.assign(answer=[extra.get(pid, {}).get("answer") for pid in prompts["prompt_id"]],
                          allowed_numbers=[extra.get(pid, {}).get("allowed_numbers") or [] for pid in prompts["prompt_id"]])
    return rows


def paired_difference(policy: list[float], reference: list[float], seed: int = 0) -> dict:
    """The mean over prompts of (policy - reference) per-prompt values, with a 95% percentile bootstrap
    interval over prompts (`scipy.stats.bootstrap`, BOOTSTRAP_RESAMPLES resamples, seeded): the
    prompts are the unit that varies (a prompt's samples are not independent of each other)."""
    import numpy as np
    from scipy.stats import bootstrap

    diffs = np.asarray(policy, dtype=float) - np.asarray(reference, dtype=float)
    if len(diffs) < 2:
        return {"difference": float(diffs.mean()) if len(diffs) else float("nan"), "ci95_low": float("nan"),
                "ci95_high": float("nan"), "prompts": int(len(diffs))}
    interval = bootstrap((diffs,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95,
                         method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return {"difference": float(diffs.mean()), "ci95_low": float(interval.low), "ci95_high": float(interval.high),
            "prompts": int(len(diffs))}


def _per_prompt(values: list[float], prompt_of: list[int], n_prompts: int) -> list[float]:
    """The mean of each prompt's values (its samples), for prompts 0..n_prompts-1 (each has at least one)."""
    sums, counts = [0.0] * n_prompts, [0] * n_prompts
    for value, i in zip(values, prompt_of):
        sums[i] += float(value)
        counts[i] += 1
    return [total / count for total, count in zip(sums, counts)]


def _sampled_replies(model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], cfg, temperature: float,
                     top_p: float, device: str) -> tuple[list[str], list[bool]]:
    """(reply texts, finished flags: False where a reply was cut at max_new_tokens)."""
    from .generation import sample_continuations

    eos = tokenizer.eos_token_id
    samples = sample_continuations(model, tokenizer, prompt_ids, seeds, temperature=temperature, top_p=top_p,
                                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, device=device)
    return ([tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True) for ids, _ in samples],
            [finished for _, finished in samples])


def compare_policies(spec: PipelineSpec, model_dir: Path, models: dict[str, dict], reward_model_dir: str,
                     pairs: pd.DataFrame, preference_prompts: pd.DataFrame, sft_test: pd.DataFrame,
                     device: str = "cpu") -> dict:
    """The report: `models` maps a policy name ("sft", "dpo", "orpo", "kto", "ppo") to {model_dir, method,
    lineage_hash}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..formatting import generation_prompt_ids
    from ..schema import column_or_none
    from .scoring import load_trained_reward_model
    from .generation import sample_seed

    cfg, task, generation = spec.preference.report, spec.task, spec.preference.generation
    temperature = cfg.temperature if cfg.temperature is not None else generation.temperature
    top_p = cfg.top_p if cfg.top_p is not None else generation.top_p
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts, scored_pairs = held_out(pairs, cfg.max_prompts, cfg.max_pairs)
    texts = prompts["prompt"].astype(str).tolist()
    test_rows = evaluation.test_rows(sft_test, spec)
    metric = evaluation.primary_metric(task)
    timings: dict[str, dict[str, float]] = {}
    clock = time.perf_counter()
    reward = load_trained_reward_model(reward_model_dir, device, base_model_dir=model_dir).reward_fn(cfg.batch_size)
    rules = rule_rows(prompts, preference_prompts) if cfg.rule == "demo" else None
    if rules is not None and rules["answer"].isna().all():
        raise ValueError("preference.report.rule: demo needs `answer` (and `allowed_numbers`) in the rows of "
                         "preference.prompts; no held-out prompt has one")
    known = rules["answer"].notna().tolist() if rules is not None else []  # imported pairs' prompts have none
    # The sampled replies: sample k of prompt i draws from the seed of (report seed, prompt, k) under every
    # policy (common random numbers: the policies' replies differ only where their distributions do).
    jobs = [(i, k) for i in range(len(prompts)) for k in range(cfg.samples_per_prompt)]
    prompt_ids = [generation_prompt_ids(tokenizer, p, sy, task, h)
                  for p, sy, h in zip(texts, prompts["system"], column_or_none(prompts, "history"))]
    seeds = [sample_seed(cfg.seed, prompts.loc[i, "prompt_id"], k) for i, k in jobs]

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    base_task = evaluation.score_model(base, tokenizer, test_rows, spec, device, with_loss=False).metrics
    del base
    timings["setup"] = {"reward_model_and_base_task": round(time.perf_counter() - clock, 1)}
    policies: dict[str, dict] = {}
    task_metrics: dict[str, dict] = {}
    scores: dict[str, list[float]] = {}  # per measured reply (the samples, or the greedy replies without samples)
    per_prompt: dict[str, dict[str, list[float]]] = {}
    samples: list[dict] = []
    for name, record in models.items():
        seconds: dict[str, float] = {}

        def lap(part: str) -> None:
            nonlocal clock
            seconds[part] = round(time.perf_counter() - clock, 1)
            clock = time.perf_counter()

        clock = time.perf_counter()
        model = artefacts.load_tuned_model(Path(model_dir), Path(record["model_dir"]), record["method"], device)
        lap("load")
        greedy = evaluation.generate(model, tokenizer, prompts, task, cfg.max_new_tokens, cfg.batch_size, device)
        lap("greedy")
        sampled, finished = _sampled_replies(model, tokenizer, [prompt_ids[i] for i, _ in jobs], seeds, cfg, temperature,
                                             top_p, device) if jobs else ([], [])
        lap("sampling")
        measured, prompt_of = (sampled, [i for i, _ in jobs]) if jobs else (greedy, list(range(len(prompts))))
        scores[name] = reward([texts[i] for i in prompt_of], measured)
        greedy_scores = reward(texts, greedy) if jobs else scores[name]
        lap("reward_scores")
        task_metrics[name] = evaluation.score_model(model, tokenizer, test_rows, spec, device, with_loss=False).metrics
        lap("task_metric")
        row = {"lineage_hash": record["lineage_hash"], "reward_score": sum(scores[name]) / len(measured),
               "logprob_pairwise_accuracy": logprob_accuracy(model, tokenizer, scored_pairs, spec, cfg.batch_size, device),
               f"task_{metric}": task_metrics[name][metric],
               "mean_reply_words": sum(len(r.split()) for r in measured) / len(measured),
               # replies cut at report.max_new_tokens (scored as they are: a cut long reply is still not concise)
               "unfinished_replies": (len(finished) - sum(finished)) / len(finished) if finished else None,
               "greedy_reward_score": sum(greedy_scores) / len(greedy)}
        lap("logprob_accuracy")
        per_prompt[name] = {"reward_score": _per_prompt(scores[name], prompt_of, len(prompts))}
        if rules is not None:
            rows = [(i, r) for i, r in zip(prompt_of, measured) if known[i]]
            parts = [rule_parts(r, str(rules.loc[i, "answer"]), rules.loc[i, "allowed_numbers"]) for i, r in rows]
            rated = [i for i in range(len(prompts)) if known[i]]
            position = {i: n for n, i in enumerate(rated)}
            row |= {"rule_prompts": len(rated), "rule_replies": len(parts)}
            for part in RULE_PARTS:
                values = [float(p[part]) for p in parts]
                column = "rule_satisfaction" if part == "satisfied" else f"rule_{part}"
                row[column] = sum(values) / max(1, len(values))
                per_prompt[name][column] = _per_prompt(values, [position[i] for i, _ in rows], len(rated))
            greedy_rates = rule_satisfaction(rules[rules["answer"].notna()], [r for r, k in zip(greedy, known) if k])
            row |= {"greedy_rule_satisfaction": greedy_rates["satisfied"], "greedy_rule_style": greedy_rates["style"],
                    "greedy_rule_correct": greedy_rates["correct"]}
        policies[name] = row
        for i in range(min(cfg.num_samples, len(prompts))):
            samples.append({"policy": name, "prompt": texts[i], "kind": "greedy", "reply": greedy[i],
                            "reward_score": round(greedy_scores[i], 4)})
            if jobs:
                j = jobs.index((i, 0))
                samples.append({"policy": name, "prompt": texts[i], "kind": "sample 0", "reply": sampled[j],
                                "reward_score": round(scores[name][j], 4)})
        timings[name] = seconds
        del model
    for name in policies:
        policies[name]["win_rate_vs_sft"] = pairwise_accuracy(scores[name], scores["sft"])
    vs_sft = {name: {measure: paired_difference(values, per_prompt["sft"][measure], cfg.seed)
                     for measure, values in per_prompt[name].items()}
              for name in policies if name != "sft"}
    task_report = {
        name: {"primary_metric": metric, "task": task.type, "n_test": len(test_rows), "base": base_task,
               "tuned": task_metrics[name], "champion": task_metrics["sft"],
               "champion_version": f"SFT adapter {models['sft']['lineage_hash']}"}
        for name in policies if name != "sft"
    }
    return {"primary_metric": metric, "held_out_prompts": len(prompts), "held_out_pairs": len(scored_pairs),
            "n_test": len(test_rows), "base_task": base_task, "policies": policies, "vs_sft": vs_sft,
            "sampling": {"samples_per_prompt": cfg.samples_per_prompt, "temperature": temperature, "top_p": top_p,
                         "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "replies_per_policy": len(jobs)},
            "task_report": task_report, "samples": samples, "timings": timings}


def render_markdown(report: dict) -> str:
    """The report as Markdown: one row per policy, the paired differences from SFT, and the samples."""
    table = pd.DataFrame.from_dict(report["policies"], orient="index").drop(columns=["lineage_hash"])
    sampling = report.get("sampling") or {}
    measured = (f"{sampling['samples_per_prompt']} sampled replies per prompt (temperature {sampling['temperature']}, "
                f"top-p {sampling['top_p']}, seed {sampling['seed']}, the same draws for every policy); "
                "`greedy_*`: the greedy reply" if sampling.get("samples_per_prompt") else "greedy replies")
    lines = [f"Held-out prompts: {report['held_out_prompts']}, held-out pairs: {report['held_out_pairs']}, "
             f"SFT test rows: {report['n_test']} (base model {report['primary_metric']} "
             f"{report['base_task'].get(report['primary_metric'], float('nan')):.4f}). Reward score, win rate and "
             f"rule rates on {measured}.", "",
             table.round(4).to_markdown(), ""]
    differences = [{"policy": name, "measure": measure, "difference": d["difference"], "95% interval":
                    f"[{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]", "prompts": d["prompts"]}
                   for name, measures in (report.get("vs_sft") or {}).items() for measure, d in measures.items()]
    if differences:
        lines += ["## Change from SFT", "",
                  "Mean over held-out prompts of (policy - SFT), each prompt's value the mean over its replies; the "
                  "interval is a 95% percentile bootstrap over prompts.", "",
                  pd.DataFrame(differences).round(4).to_markdown(index=False), ""]
    if report.get("promotion"):
        lines += [f"Promotion of {report['promotion']['candidate_policy']}: {report['promotion']['reason']}", ""]
    if report["samples"]:
        lines += ["## Samples", "", pd.DataFrame(report["samples"]).to_markdown(index=False)]
    return "\n".join(lines)
