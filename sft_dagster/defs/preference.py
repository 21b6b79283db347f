"""Preference stages (the spec's `preference:` section): candidates -> rankings -> pairs and their gates ->
reward model, DPO, PPO -> the SFT vs DPO vs PPO report -> promotion through the SFT registry.

    candidate_generations (+ preference_prompts, candidates_quarantine)  K seeded samples per new prompt
                   from the promoted model (else the SFT adapter; `preference.generator` names one), the
                   candidates earlier runs sampled, and written candidates; written to the candidates file
                   `sft-dagster rank` reads
    ranking_queue  the prompts still to rank, where the rankings file is, the command to rank them
    preference_pairs (+ preference_quarantine)  rankings and imported files expanded to pairs, split by
                   prompt, every pair gate as an asset check (blocking as the spec says)
    reward_model, <policy>_adapter (dpo, orpo, kto: one per pair-trained policy of `preference.train`, from
                   the objective registry), ppo_policy   the trainers (`sft_dagster.training`), each run in a folder
                   named by its lineage hash, skipped when the lineage is unchanged
    preference_report, preference_promoted_model

Training assets refuse to run while a blocking pair gate (or, for PPO, the reward model's accuracy gate)
has not passed on the current data (`guards.require_checks_passed`), in any run.
"""

import json
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from .. import atomic, decoding, evaluation, formatting, ingest, metrics, registry, training
from .. import preference as preference_pkg
from ..preference import pairs as pair_stage
from ..preference.columns import prompt_id_of
from ..preference.generation import generate_candidates
from ..preference.rankings import ranking_queue as queue_of
from ..preference.rankings import read_candidates, read_rankings
from ..schema import frame_hash, lineage_hash_of
from ..progress import Progress
from .common import (
    JSON_IO,
    PipelineDefs,
    check_specs,
    code_version,
    jsonable,
    numbers,
    outcome_to_check_result,
    rounded,
)
from .guards import require_checks_passed
from .resources import ComputeResource, SFTStorage
from .runs import cached_report, promotion, reuse_or_run
from .shared import file_version, registry_dir, tokenizer_for
from .training import device_kind, library_versions

ACCOUNTED_CHECK = "pairs_accounted_for"
REWARD_CHECK = "min_pairwise_accuracy"
PROMOTION_CHECK = "keeps_task_metric"
RECORD_FILE = "record.json"  # written last in a preference training folder: the run is complete


def candidates_path(spec, storage: SFTStorage) -> Path:
    """The candidates table `sft-dagster rank` reads: the spec's, or `<pipeline>/preference/candidates.parquet`."""
    cfg = spec.preference.ranking
    return spec.resolve(cfg.candidates_file) if cfg.candidates_file else storage.paths(spec.name).default_candidates_file


def rankings_path(spec, storage: SFTStorage) -> Path:
    """The rankings file people append to: the spec's, or `<pipeline>/preference/rankings.jsonl`."""
    cfg = spec.preference.ranking
    return spec.resolve(cfg.rankings_file) if cfg.rankings_file else storage.paths(spec.name).default_rankings_file


def rank_command(spec, storage: SFTStorage) -> str:
    """The exact command that ranks this pipeline's queue."""
    cfg, paths = spec.preference.ranking, storage.paths(spec.name)
    parts = ["sft-dagster", "rank", spec.name, "--storage", str(storage.root)]
    if candidates_path(spec, storage) != paths.default_candidates_file:
        parts += ["--candidates", str(candidates_path(spec, storage))]
    if rankings_path(spec, storage) != paths.default_rankings_file:
        parts += ["--rankings", str(rankings_path(spec, storage))]
    if cfg.rankings_per_prompt > 1:
        parts += ["--per-prompt", str(cfg.rankings_per_prompt)]
    if cfg.mode != "full":
        parts += ["--mode", cfg.mode]
    return " ".join(parts)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    non_empty = [f for f in frames if len(f)]
    return pd.concat(non_empty, ignore_index=True) if non_empty else frames[0].iloc[0:0].reset_index(drop=True)


def _pairs_of(pairs: pd.DataFrame, split: str) -> pd.DataFrame:
    """The non-tie pairs of one split (a tie teaches no preference)."""
    return pairs[(pairs["split"] == split) & ~pairs["tie"].astype(bool)].reset_index(drop=True)


def _prompts_of(pairs: pd.DataFrame, split: str) -> pd.DataFrame:
    """The distinct prompts of one split's pairs, in prompt_id order (stable, independent of row order)."""
    rows = pairs[pairs["split"] == split].drop_duplicates("prompt_id").sort_values("prompt_id", kind="stable")
    return rows[["prompt_id", "prompt", "system", "history"]].reset_index(drop=True)


def _generator(spec, storage: SFTStorage, adapter: dict, base_model: dict) -> tuple[str | None, str, str]:
    """(adapter dir or None, its method, what it is) of the model that writes candidates."""
    choice = spec.preference.generator
    if choice in ("auto", "promoted"):
        current = registry.champion(registry_dir(spec, storage))
        if current is not None and current["base_model_hash"] == base_model["model_hash"]:
            return current["adapter_dir"], current["method"], f"promoted {current['version']}"
        if choice == "promoted":
            raise ValueError(f"preference.generator: promoted, but {spec.name} has no promoted model on this base "
                                  "model yet; promote one or use generator: auto")
    if choice == "base":
        return None, "lora", "base model"
    return adapter["adapter_dir"], adapter["method"], f"SFT adapter {adapter['lineage_hash']}"


def _finished_record(run_dir: Path) -> dict | None:
    record_file = run_dir / RECORD_FILE
    return json.loads(record_file.read_text()) if record_file.exists() else None


def _run_training(context, run_dir: Path, lineage: dict, train) -> tuple[dict, bool]:
    """A preference training run in `run_dir` (named by its lineage hash): the finished run's record, or
    `train()` -> TrainingResult, recorded once complete. Returns (record, skipped)."""
    def run() -> dict:
        result = train()
        record = {"model_dir": str(result.adapter_dir), "method": result.method, "lineage_hash": run_dir.name,
                  "lineage": lineage, "metrics": result.metrics}
        atomic.write_json(run_dir / RECORD_FILE, record, sort_keys=True)
        return record

    return reuse_or_run(context, run_dir, _finished_record, run)


def _code() -> str:
    return code_version(preference_pkg, ingest)


def _train_code() -> str:
    return code_version(training, preference_pkg, formatting)


def _trained_output(record: dict, skipped: bool, path_key: str, **counts) -> dg.Output[dict]:
    """A preference training asset's value: the run's record, its lineage hash the data version."""
    return dg.Output(record, data_version=dg.DataVersion(record["lineage_hash"]), metadata={
        path_key: dg.MetadataValue.path(record["model_dir"]),
        "skipped_training": skipped, **counts, "metrics": dg.MetadataValue.json(record["metrics"]),
        **numbers(record["metrics"])})


def _lineage(context, p: PipelineDefs, storage: SFTStorage, kind: str, config, base_model: dict, data: dict, device: str,
             **extra) -> tuple[dict, Path]:
    """Everything that shapes a preference-trained model, and the run folder named by its hash."""
    spec = p.spec
    lineage = {"method": kind, "config": config.model_dump(mode="json"), "data": data,
               "base_model_hash": base_model["model_hash"], "tokenizer_hash": base_model["tokenizer_hash"],
               "base_model": base_model["source"], "training": spec.training.model_dump(mode="json"),
               "max_length": spec.model.max_length, "task": spec.task.model_dump(mode="json"),
               "code_version": context.assets_def.code_versions_by_key[context.asset_key],
               "libraries": library_versions(), "device": device_kind(device), **extra}
    return lineage, p.paths(storage).preference_dir / kind / lineage_hash_of(lineage)


def build(p: PipelineDefs) -> None:
    pref = p.spec.preference
    if pref is None:
        return
    _build_candidates(p)
    _build_ranking_queue(p)
    _build_pairs(p)
    _build_reward_model(p)
    assets = policy_assets(pref)
    for name in assets:
        if name == "ppo":
            _build_ppo(p)
        else:
            p.assets.append(pair_policy_asset(p, name))
    _build_report(p, assets)
    if pref.promotion.candidate:
        _build_promotion(p, assets)


def _build_candidates(p: PipelineDefs) -> None:
    spec, pref, code = p.spec, p.spec.preference, _code()

    @dg.multi_asset(
        name=f"{spec.name}__candidates", pool=p.pool, ins=p.ins("base_model", "fine_tuned_adapter"),
        outs={
            "preference_prompts": p.out("preference_prompts", kinds={"pandas", "parquet"}, code_version=code,
                                        description="The prompts of `preference.prompts`, with their prompt_id and extra fields."),
            "candidate_generations": p.out("candidate_generations", kinds={"pandas", "parquet"}, code_version=code,
                                           description="K seeded replies per prompt from the promoted model (else the SFT "
                                                       "adapter), plus written candidates: what people rank."),
            "candidates_quarantine": p.out("candidates_quarantine", kinds={"pandas", "parquet"}, code_version=code,
                                           description="Prompt rows that could not be read, and prompts too long to sample "
                                                       "within model.max_length, with their reasons."),
        },
    )
    def candidate_generations(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                              base_model: dict, fine_tuned_adapter: dict):
        start = time.perf_counter()
        prompts, read_quarantine, read_stats = ingest.read_prompts(spec, pref.prompts)
        prompts["prompt_id"] = [prompt_id_of(t, sy) for t, sy in zip(prompts["prompt"], prompts["system"])]
        written = _concat([read_candidates(spec.resolve(f)) for f in pref.candidate_files]) if pref.candidate_files else None
        has_written = set(written["prompt_id"]) if written is not None else set()
        # Candidates sampled by earlier runs stay as they are (rankings point at them, and a retrained model
        # would orphan those rankings); only prompts without candidates are sampled.
        path = candidates_path(spec, storage)
        earlier = read_candidates(path) if path.exists() else None
        if earlier is not None:
            earlier = earlier[earlier["prompt_id"].isin(set(prompts["prompt_id"]) - has_written)]
        has_earlier = set(earlier["prompt_id"]) if earlier is not None else set()
        to_sample = prompts[~prompts["prompt_id"].isin(has_written | has_earlier)].reset_index(drop=True)
        adapter_dir, method, generator = _generator(spec, storage, fine_tuned_adapter, base_model)
        sampled, refused, stats = generate_candidates(
            to_sample, Path(base_model["path"]), task=spec.task, config=pref.generation, max_length=spec.model.max_length,
            adapter_dir=adapter_dir, adapter_method=method, device=compute.resolved_device(), model_name=generator)
        kept = [f[[c for c in sampled.columns if c in f]] for f in (earlier, written) if f is not None]
        candidates = (_concat([f.astype({"prompt_id": str, "candidate_id": str}) for f in (*kept, sampled)])
                      .sort_values(["prompt_id", "candidate_id"], kind="stable").reset_index(drop=True))
        repeated = candidates["candidate_id"].duplicated()
        if repeated.any():
            raise ValueError(f"preference.candidate_files: candidate {candidates.loc[repeated, 'candidate_id'].iloc[0]!r} "
                             "appears in more than one candidates file (or was also sampled)")
        atomic.write_parquet(path, candidates)  # the table `sft-dagster rank` shows people
        quarantine = _concat([read_quarantine, refused])
        stats |= {"prompt_rows_read": read_stats["rows_read"], "prompt_rows_quarantined": read_stats["rows_quarantined"],
                  "prompts_with_written_candidates": int(prompts["prompt_id"].isin(has_written).sum()),
                  "prompts_with_earlier_candidates": len(has_earlier),
                  "written_candidates": 0 if written is None else len(written)}
        yield dg.Output(prompts, output_name="preference_prompts", data_version=dg.DataVersion(frame_hash(prompts)),
                        metadata={"dagster/row_count": len(prompts), "preview": p.preview(prompts, ["prompt_id", "prompt"])})
        yield dg.Output(candidates, output_name="candidate_generations", data_version=dg.DataVersion(frame_hash(candidates)),
                        metadata={"dagster/row_count": len(candidates), "generator": generator, **jsonable(stats),
                                  "candidates_file": dg.MetadataValue.path(str(path)),
                                  "seconds": round(time.perf_counter() - start, 2),
                                  "preview": p.preview(candidates, ["prompt_id", "prompt", "response", "model"])})
        yield dg.Output(quarantine, output_name="candidates_quarantine", data_version=dg.DataVersion(frame_hash(quarantine)),
                        metadata={"dagster/row_count": len(quarantine),
                                  "preview": p.preview(quarantine, ["reason", "source_file", "source_line"])})

    p.assets.append(candidate_generations)


def _build_ranking_queue(p: PipelineDefs) -> None:
    spec, pref, code = p.spec, p.spec.preference, _code()

    @dg.asset(**p.asset_args("ranking_queue", kinds={"pandas"}, code_version=code, ins=p.ins("candidate_generations"),
                             description="Candidates of the prompts still to rank, the rankings file, and the command "
                                         "that ranks them (`sft-dagster rank`)."))
    def ranking_queue(context: dg.AssetExecutionContext, storage: SFTStorage, candidate_generations: pd.DataFrame):
        path = rankings_path(spec, storage)
        rankings = read_rankings(path)
        queue = queue_of(candidate_generations, rankings, rankings_per_prompt=pref.ranking.rankings_per_prompt)
        by_author = rankings["author"].value_counts().to_dict() if len(rankings) else {}
        return dg.Output(queue, data_version=dg.DataVersion(frame_hash(queue)), metadata={
            "dagster/row_count": len(queue), "prompts_to_rank": int(queue["prompt_id"].nunique()),
            "prompts": int(candidate_generations["prompt_id"].nunique()), "rankings": len(rankings),
            "rankings_by_author": dg.MetadataValue.json({str(k): int(v) for k, v in by_author.items()}),
            "rankings_file": dg.MetadataValue.path(str(path)),
            "rank_command": dg.MetadataValue.md(f"```\n{rank_command(spec, storage)}\n```"),
            "preview": p.preview(queue, ["prompt_id", "prompt", "response"]),
        })

    p.assets.append(ranking_queue)


def _build_pairs(p: PipelineDefs) -> None:
    spec, K, pref, code = p.spec, p.key, p.spec.preference, _code()
    gates = pref.gates
    pair_checks = check_specs(K("preference_pairs"), pair_stage.pair_check_defs(gates))
    accounted = dg.AssetCheckSpec(ACCOUNTED_CHECK, asset=K("preference_pairs"), blocking=True,
                                  description="records in (rankings, imported rows, pairs) = pairs kept + records quarantined")
    p.preference_blocking_checks += [c.key for c in pair_checks if c.blocking] + [accounted.key]

    @dg.multi_asset(
        name=f"{spec.name}__pairs", pool=p.pool, ins=p.ins("candidate_generations"), check_specs=[*pair_checks, accounted],
        outs={
            "preference_pairs": p.out("preference_pairs", kinds={"pandas", "parquet"}, code_version=code,
                                      description="(prompt, chosen, rejected) pairs from the rankings file and imported "
                                                  "preference files, split by prompt, after the pair gates."),
            "preference_quarantine": p.out("preference_quarantine", kinds={"pandas", "parquet"}, code_version=code,
                                           description="Rankings, imported rows and pairs removed, each with its reason."),
        },
    )
    def preference_pairs(context: dg.AssetExecutionContext, storage: SFTStorage, candidate_generations: pd.DataFrame):
        path = rankings_path(spec, storage)
        ranked, ranking_quarantine, ranking_stats = pair_stage.pairs_from_rankings(read_rankings(path), candidate_generations)
        imports = [pair_stage.read_preference_file(spec.resolve(s.path), s.columns, s.format) for s in pref.sources]
        pairs = pair_stage.assign_pair_splits(_concat([ranked, *(i[0] for i in imports)]), spec.splits)
        outcomes = pair_stage.run_pair_checks(pairs, gates, task=spec.task, tokenizer=tokenizer_for(spec, storage),
                                              max_length=spec.model.max_length)
        kept, curation_quarantine, curation_stats = pair_stage.curate_pairs(pairs, outcomes)
        quarantine = _concat([ranking_quarantine, *(i[1] for i in imports), curation_quarantine])
        records_in = ranking_stats["rankings_quarantined"] + sum(i[2]["rows_quarantined"] for i in imports) + len(pairs)
        stats = {"rankings_file": str(path), "rankings_file_version": file_version(path), **ranking_stats,
                 "imports": {str(s.path): i[2] for s, i in zip(pref.sources, imports)}, **curation_stats,
                 "by_split": {str(k): int(v) for k, v in kept["split"].value_counts().items()}}
        yield dg.Output(kept, output_name="preference_pairs", data_version=dg.DataVersion(frame_hash(kept)),
                        metadata={"dagster/row_count": len(kept), **jsonable(stats),
                                  "preview": p.preview(kept, ["prompt", "chosen", "rejected", "author", "split"])})
        yield dg.Output(quarantine, output_name="preference_quarantine", data_version=dg.DataVersion(frame_hash(quarantine)),
                        metadata={"dagster/row_count": len(quarantine),
                                  "by_stage": dg.MetadataValue.json({str(k): int(v) for k, v in quarantine["stage"].value_counts().items()}),
                                  "preview": p.preview(quarantine, ["stage", "reason", "source_file", "source_line"], n=20)})
        for outcome in outcomes:
            yield outcome_to_check_result(outcome, K("preference_pairs"), previews=spec.quality.previews,
                                          blocking=getattr(gates, outcome.name).blocking)
        yield dg.AssetCheckResult(asset_key=K("preference_pairs"), check_name=ACCOUNTED_CHECK,
                                  passed=records_in == len(kept) + len(quarantine),
                                  metadata={"records_in": records_in, "pairs_kept": len(kept),
                                            "records_quarantined": len(quarantine)})

    p.assets.append(preference_pairs)



def _build_reward_model(p: PipelineDefs) -> None:
    spec, K, pref = p.spec, p.key, p.spec.preference
    reward_check = dg.AssetCheckSpec(REWARD_CHECK, asset=K("reward_model"), blocking=True,
                                     description=f"pairwise accuracy on the validation pairs is at least "
                                                 f"{pref.min_reward_accuracy} (preference.min_reward_accuracy)")

    @dg.asset(**p.asset_args("reward_model", kinds={"pytorch", "peft"}, code_version=_train_code(), io_manager_key=JSON_IO,
                             ins=p.ins("preference_pairs", "base_model"), check_specs=[reward_check],
                             description="Bradley-Terry reward model (LoRA + score head) on the train pairs; "
                                         "pairwise accuracy on the validation pairs."))
    def reward_model(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                     preference_pairs: pd.DataFrame, base_model: dict):
        require_checks_passed(context, p.preference_blocking_checks)
        device = compute.resolved_device()
        train, val = _pairs_of(preference_pairs, "train"), _pairs_of(preference_pairs, "validation")
        lineage, run_dir = _lineage(context, p, storage, "reward_model", pref.reward_model, base_model,
                                    {"train": frame_hash(train), "validation": frame_hash(val)}, device)
        progress = Progress(context.log.info)
        record, skipped = _run_training(context, run_dir, lineage, lambda: training.train_reward_model(
            spec, pref.reward_model, Path(base_model["path"]), train, val, run_dir, device=device,
            log=context.log.info, on_metrics=progress))
        accuracy = record["metrics"].get("pairwise_accuracy")
        yield _trained_output(record, skipped, "model_dir", train_pairs=len(train), validation_pairs=len(val))
        yield dg.AssetCheckResult(asset_key=K("reward_model"), check_name=REWARD_CHECK,
                                  passed=accuracy is not None and accuracy >= pref.min_reward_accuracy,
                                  metadata={"pairwise_accuracy": accuracy, "min_accuracy": pref.min_reward_accuracy,
                                            "validation_pairs": len(val)})

    p.assets.append(reward_model)


def policy_assets(pref) -> dict[str, str]:
    """The policies of `preference.train` tuned from the SFT adapter, each with its asset: `<name>_adapter`
    for each pair-trained objective of the registry (DPO, ORPO, KTO: a method class the shared loop runs),
    in `preference.train`'s order, then `ppo_policy` (its own loop, against the reward model)."""
    assets = {name: f"{name}_adapter" for name in pref.train if training.objective(name).method is not None}
    return assets | ({"ppo": "ppo_policy"} if "ppo" in pref.train else {})


def pair_policy_asset(p: PipelineDefs, name: str) -> dg.AssetsDefinition:
    """`<name>_adapter`: the policy objective `name` (`training.objectives`: DPO, ORPO, KTO, ...) trained from
    the SFT adapter on the train pairs by its entry point, in a run folder named by its lineage."""
    spec, entry = p.spec, training.objective(name)
    config = getattr(spec.preference, name)

    @dg.asset(**p.asset_args(f"{name}_adapter", kinds={"pytorch", "peft"}, code_version=_train_code(),
                             io_manager_key=JSON_IO, ins=p.ins("preference_pairs", "base_model", "fine_tuned_adapter"),
                             description=f"{name.upper()} ({json.dumps(config.model_dump(exclude_none=True))}) from "
                                         "the SFT adapter on the train pairs."))
    def policy_adapter(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                       preference_pairs: pd.DataFrame, base_model: dict, fine_tuned_adapter: dict) -> dg.Output[dict]:
        require_checks_passed(context, p.preference_blocking_checks)
        device = compute.resolved_device()
        train, val = _pairs_of(preference_pairs, "train"), _pairs_of(preference_pairs, "validation")
        lineage, run_dir = _lineage(context, p, storage, name, config, base_model,
                                    {"train": frame_hash(train), "validation": frame_hash(val)}, device,
                                    sft_adapter=fine_tuned_adapter["lineage_hash"])
        progress = Progress(context.log.info)
        record, skipped = _run_training(context, run_dir, lineage, lambda: entry.train(
            spec, config, Path(base_model["path"]), Path(fine_tuned_adapter["adapter_dir"]), train, val, run_dir,
            device=device, log=context.log.info, on_metrics=progress))
        return _trained_output(record, skipped, "adapter_dir", train_pairs=len(train))

    return policy_adapter


def _build_ppo(p: PipelineDefs) -> None:
    """`ppo_policy`: PPO from the SFT adapter on the train pairs' prompts, against the reward model."""
    spec, pref = p.spec, p.spec.preference

    @dg.asset(**p.asset_args("ppo_policy", kinds={"pytorch", "peft"}, code_version=_train_code(), io_manager_key=JSON_IO,
                             ins=p.ins("preference_pairs", "base_model", "fine_tuned_adapter", "reward_model"),
                             description="PPO from the SFT adapter against reward_model, KL-penalised towards the SFT "
                                         "model, on the train pairs' prompts."))
    def ppo_policy(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                   preference_pairs: pd.DataFrame, base_model: dict, fine_tuned_adapter: dict,
                   reward_model: dict) -> dg.Output[dict]:
        require_checks_passed(context, [*p.preference_blocking_checks, p.check_key("reward_model", REWARD_CHECK)])
        device = compute.resolved_device()
        train, val = _prompts_of(preference_pairs, "train"), _prompts_of(preference_pairs, "validation")
        lineage, run_dir = _lineage(context, p, storage, "ppo", pref.ppo, base_model,
                                    {"train": frame_hash(train), "validation": frame_hash(val)}, device,
                                    sft_adapter=fine_tuned_adapter["lineage_hash"], reward_model=reward_model["lineage_hash"])
        record, skipped = _run_training(context, run_dir, lineage, lambda: training.train_ppo(
            spec, pref.ppo, Path(base_model["path"]), Path(fine_tuned_adapter["adapter_dir"]),
            Path(reward_model["model_dir"]), train, val, run_dir, device=device, log=context.log.info))
        return _trained_output(record, skipped, "adapter_dir", train_prompts=len(train))

    p.assets.append(ppo_policy)


def _build_report(p: PipelineDefs, assets: dict[str, str]) -> None:
    """`preference_report`: SFT and every policy of `assets` ({objective: its asset}) compared."""
    spec, K, pref = p.spec, p.key, p.spec.preference
    candidate = pref.promotion.candidate
    promotion_check = dg.AssetCheckSpec(
        PROMOTION_CHECK, asset=K("preference_report"), blocking=True,
        description=f"the {candidate or 'preference-tuned'} policy loses at most {pref.promotion.max_task_metric_drop} of "
                    "the task's primary metric against the SFT adapter on the SFT test split")

    @dg.asset(**p.asset_args("preference_report", kinds={"pytorch", "markdown"}, code_version=code_version(preference_pkg, evaluation, decoding, metrics),
                             io_manager_key=JSON_IO, check_specs=[promotion_check] if candidate else [],
                             ins=p.ins("preference_pairs", "preference_prompts", "base_model", "fine_tuned_adapter",
                                       "reward_model", "dataset_splits", *assets.values()),
                             description="SFT vs DPO vs PPO on held-out prompts: reward-model score, win rate over SFT, "
                                         "pairwise accuracy of log-probs on held-out human pairs, task metric, rule rates "
                                         "of sampled replies with their change from SFT, samples; kept while its inputs "
                                         "are unchanged."))
    def preference_report(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                          preference_pairs: pd.DataFrame, preference_prompts: pd.DataFrame, base_model: dict,
                          fine_tuned_adapter: dict, reward_model: dict, dataset_splits: pd.DataFrame, **tuned):
        require_checks_passed(context, p.preference_blocking_checks)
        from ..preference.report import render_markdown

        models = {"sft": {"model_dir": fine_tuned_adapter["adapter_dir"], "method": fine_tuned_adapter["method"],
                          "lineage_hash": fine_tuned_adapter["lineage_hash"]}}
        models |= {t: tuned[asset] for t, asset in assets.items()}
        reports_dir = p.paths(storage).preference_dir / "report"
        report, inputs_hash, skipped = _compared_policies(context, spec, compute, reports_dir, models, reward_model,
                                                          preference_pairs, preference_prompts, dataset_splits, base_model)
        # The latest report, where people look for it.
        atomic.write_json(reports_dir / "preference_report.json", report, sort_keys=True)
        markdown = render_markdown(report)
        atomic.write_text(reports_dir / "preference_report.md", markdown)
        summary = {f"{name}_{k}": rounded(v) for name, row in report["policies"].items() for k, v in numbers(row).items()}
        yield dg.Output(report, data_version=dg.DataVersion(inputs_hash),
                        metadata={"report": dg.MetadataValue.md(markdown), **summary, "inputs_hash": inputs_hash,
                                  "skipped_report": skipped, "seconds": None if skipped else report.get("seconds"),
                                  "report_path": dg.MetadataValue.path(str(reports_dir / "preference_report.md"))})
        if candidate:
            decision = report["promotion"]
            yield dg.AssetCheckResult(asset_key=K("preference_report"), check_name=PROMOTION_CHECK,
                                      passed=bool(decision["promote"]), description=decision["reason"],
                                      metadata=jsonable({k: v for k, v in decision.items() if k != "reason"}))

    p.assets.append(preference_report)


def _compared_policies(context, spec, compute: ComputeResource, reports_dir: Path, models: dict, reward_model: dict,
                       pairs: pd.DataFrame, prompts: pd.DataFrame, dataset_splits: pd.DataFrame,
                       base_model: dict) -> tuple[dict, str, bool]:
    """The policies compared (`preference.report.compare_policies`), with the promotion decision; kept
    while the policies, reward model, pairs and settings are unchanged. (report, inputs_hash, skipped)."""
    from ..preference.report import compare_policies

    pref, candidate = spec.preference, spec.preference.promotion.candidate
    sft_test = dataset_splits[dataset_splits["split"] == "test"]
    inputs = {
        "policies": {k: v["lineage_hash"] for k, v in models.items()}, "reward_model": reward_model["lineage_hash"],
        "pairs": frame_hash(pairs), "prompts": frame_hash(prompts),
        "sft_test": frame_hash(sft_test), "report": pref.report.model_dump(mode="json"),
        "generation": pref.generation.model_dump(mode="json"), "promotion": pref.promotion.model_dump(mode="json"),
        "evaluation": spec.evaluation.model_dump(mode="json"), "task": spec.task.model_dump(mode="json"),
        "max_length": spec.model.max_length, "base_model": base_model["model_hash"],
        "code_version": context.assets_def.code_versions_by_key[context.asset_key]}

    def compare(inputs_hash: str) -> dict:
        start = time.perf_counter()
        report = compare_policies(spec, Path(base_model["path"]), models, reward_model["model_dir"], pairs, prompts,
                                  sft_test, device=compute.resolved_device())
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["inputs_hash"] = inputs_hash
        if candidate:
            report["promotion"] = registry.promotion_decision(report["task_report"][candidate], report["primary_metric"],
                                                              -pref.promotion.max_task_metric_drop)
            report["promotion"]["candidate_policy"] = candidate
        return report

    return cached_report(context, reports_dir, "preference_report.json", inputs, compare,
                         read=lambda path: json.loads(path.read_text()),
                         write=lambda folder, report: atomic.write_json(folder / "preference_report.json", report,
                                                                        sort_keys=True),
                         unchanged="policies, reward model, pairs and settings unchanged since the last preference report")


def _build_promotion(p: PipelineDefs, assets: dict[str, str]) -> None:
    # After SFT's own promotion (`deps`, no data): the policy is tuned from the SFT adapter, so within one
    # run the registry takes SFT's version first and the policy's last (LATEST ends on the policy); and
    # when SFT's promotion gate fails, the policy tuned from that adapter is not promoted either (it was
    # never compared with the champion the adapter lost to).
    spec, K, candidate = p.spec, p.key, p.spec.preference.promotion.candidate

    @dg.asset(**p.asset_args("preference_promoted_model", kinds={"peft", "safetensors"}, code_version=code_version(registry),
                             io_manager_key=JSON_IO, ins=p.ins("preference_report", assets[candidate]),
                             deps=[K("promoted_model")],
                             description=f"The {candidate} policy copied with its model card into the pipeline's registry "
                                         "(the new champion), only when it keeps the SFT task metric and after "
                                         "SFT's promoted_model."))
    def preference_promoted_model(context: dg.AssetExecutionContext, storage: SFTStorage, preference_report: dict,
                                  **policy) -> dg.Output[dict]:
        require_checks_passed(context, [*p.preference_blocking_checks, p.check_key("preference_report", PROMOTION_CHECK)])
        record = policy[assets[candidate]]
        judged = preference_report["policies"][candidate]["lineage_hash"]
        # `method` is the saved format (a LoRA adapter over the base, as SFT's), what loaders look at.
        return promotion(spec, storage, model_dir=Path(record["model_dir"]), report=preference_report["task_report"][candidate],
                         decision=preference_report["promotion"],
                         lineage={**record["lineage"], "method": "lora", "preference_method": candidate},
                         lineage_hash=record["lineage_hash"],
                         stale=None if judged == record["lineage_hash"] else
                         f"the preference report is for {candidate} {judged}, the current one is {record['lineage_hash']}; "
                         f"materialize {spec.name}/preference_report first")

    p.assets.append(preference_promoted_model)
