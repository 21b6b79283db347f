"""Distillation into a smaller model (the spec's `student:` section; a spec without it has none of these).

    student_base_model      the student as a local model directory (`student.model`, any source `model`
                            accepts; `keep_layers` derives a smaller model from one)
    student_teacher         the teacher as a local model directory: the promoted model (the registry's
                            champion) or the current fine_tuned_adapter, merged into the base model once
                            (`<pipeline>/student/teachers/<adapter lineage hash>/`), or a local model directory
    student_teacher_answers (+ student_answers_quarantine)   distillation `sequence` / `both` only: the
                            teacher's answers to the train and validation prompts (sft_dagster/student.py),
                            with the blocking check `answers_kept`
    student_model           the student trained through `training.train` (spec: `PipelineSpec.student_pipeline`),
                            in a folder named by its lineage hash like `fine_tuned_adapter`
    student_report          teacher vs student on the test split: task metric, parameters, tokens/s

The training and report assets refuse to run unless the pipeline's blocking data checks (and
`answers_kept`) passed on the current data, in any run (`guards.require_checks_passed`).
"""

import time
from pathlib import Path

import dagster as dg
import pandas as pd

from .. import artefacts, decoding, evaluation, formatting, metrics, models, registry, training
from .. import student as student_stage
from ..preference import generation
from ..schema import frame_hash
from ..spec import STUDENT_TEACHERS
from ..torchkit import pick_precision
from .common import JSON_IO, PipelineDefs, code_version, jsonable, rounded
from .guards import require_checks_passed
from .multitask import quarantine_assets
from .resources import ComputeResource, K8sTraining, MLflowTracking, SFTStorage
from .runs import cached_report
from .shared import registry_dir
from .training import adapter_lineage, model_output, trained_adapter

ANSWERS_CHECK = "answers_kept"
TEACHERS_KEPT = 2  # merged teacher folders kept (the current one and the one before)


def _prune_teachers(teachers_dir: Path, keep: Path) -> None:
    import shutil

    others = sorted((d for d in teachers_dir.iterdir() if d.is_dir() and d != keep and not d.name.startswith(".")),
                    key=lambda d: d.stat().st_mtime, reverse=True) if teachers_dir.exists() else []
    for d in others[TEACHERS_KEPT - 1:]:
        shutil.rmtree(d, ignore_errors=True)


def resolve_teacher(spec, storage: SFTStorage, base_model: dict | None, fine_tuned_adapter: dict | None) -> models.ResolvedModel:
    """The teacher as a local model directory with its hashes (see the module docstring)."""
    choice, where = spec.student.teacher, f"{spec.spec_path or '<spec>'}: student.teacher"
    if choice not in STUDENT_TEACHERS:
        path = spec.resolve(choice)
        if not (path / "config.json").is_file():
            raise student_stage.StudentError(f"{where}: {path} is not a local model directory (no config.json); "
                                             f"use {' or '.join(STUDENT_TEACHERS)} or a model directory")
        model_hash, tokenizer_hash = models.directory_hashes(path)
        return models.ResolvedModel(path.resolve(), model_hash, tokenizer_hash, str(path))
    if choice == "promoted":
        current = registry.champion(registry_dir(spec, storage))
        if current is None:
            raise student_stage.StudentError(f"{where}: promoted, but {spec.name} has no promoted model yet; promote "
                                             "one first or set student.teacher: fine_tuned")
        if current["base_model_hash"] != base_model["model_hash"]:
            raise student_stage.StudentError(f"{where}: the promoted {current['version']} was trained on base model "
                                             f"{current['base_model_hash']}, the pipeline's base model is now "
                                             f"{base_model['model_hash']}; set student.teacher: fine_tuned")
        adapter_dir, method, adapter_id = Path(current["adapter_dir"]), current["method"], current["lineage_hash"]
        described = f"promoted {current['version']} ({method} of {base_model['source']})"
    else:
        adapter_dir, method = Path(fine_tuned_adapter["adapter_dir"]), fine_tuned_adapter["method"]
        adapter_id = fine_tuned_adapter["lineage_hash"]
        described = f"fine_tuned_adapter {adapter_id} ({method} of {base_model['source']})"
    if artefacts.is_whole_model(method):  # a whole model already, tokenizer included
        path = adapter_dir
    else:
        teachers = storage.paths(spec.name).student_dir / "teachers"
        path = teachers / adapter_id
        if not (path / "config.json").exists():
            artefacts.merge_adapter(Path(base_model["path"]), adapter_dir, path)
        _prune_teachers(teachers, path)
    model_hash, tokenizer_hash = models.directory_hashes(path)
    return models.ResolvedModel(path.resolve(), model_hash, tokenizer_hash, described)


def build(p: PipelineDefs) -> None:
    student = p.spec.student
    if student is None:
        return
    _build_models(p)
    if student.uses_answers:
        _build_answers(p)
    _build_student_model(p)
    _build_report(p)


def _code() -> str:
    return code_version(student_stage, evaluation, decoding, metrics, formatting, generation)  # answers are sampled by generation.py


def _guarded(p: PipelineDefs) -> list[dg.AssetCheckKey]:
    """The checks the student's training and report need passed: the data's, and the teacher answers'."""
    if p.spec.student.uses_answers:
        return [*p.blocking_checks, p.check_key("student_teacher_answers", ANSWERS_CHECK)]
    return list(p.blocking_checks)


def _build_models(p: PipelineDefs) -> None:
    spec, K, student = p.spec, p.key, p.spec.student

    @dg.asset(**p.asset_args("student_base_model", kinds={"transformers", "safetensors"}, code_version=code_version(models),
                             io_manager_key=JSON_IO,
                             description="The student model (student.model) as a local safetensors directory."))
    def student_base_model(context: dg.AssetExecutionContext, storage: SFTStorage) -> dg.Output[dict]:
        return model_output(models.resolve_base_model(spec.student_model(), storage.paths(spec.name).model_cache,
                                                      spec.base_dir))

    teacher_ins = {"promoted": p.ins("base_model"), "fine_tuned": p.ins("base_model", "fine_tuned_adapter")}

    @dg.asset(**p.asset_args("student_teacher", kinds={"transformers", "safetensors"}, code_version=code_version(models),
                             io_manager_key=JSON_IO, ins=teacher_ins.get(student.teacher, {}),
                             deps=[K("promoted_model")] if student.teacher == "promoted" else [],
                             description=f"The teacher ({student.teacher}) as a local model directory, an adapter "
                                         "merged into the base model."))
    def student_teacher(context: dg.AssetExecutionContext, storage: SFTStorage, **inputs) -> dg.Output[dict]:
        return model_output(resolve_teacher(spec, storage, inputs.get("base_model"), inputs.get("fine_tuned_adapter")))

    p.assets += [student_base_model, student_teacher]


def _build_answers(p: PipelineDefs) -> None:
    spec, K, cfg, code = p.spec, p.key, p.spec.student.generation, _code()

    @dg.multi_asset(
        name=f"{spec.name}__student_answers", pool=p.pool,
        ins={**p.ins("dataset_splits", "student_teacher", "student_base_model")}, deps=quarantine_assets(p),
        outs={
            "student_teacher_answers": p.out(
                "student_teacher_answers", kinds={"pandas", "parquet"}, code_version=code,
                description="The train and validation rows with the teacher's answer as `response` (the "
                            "row's own in `gold_response`): what the student is trained on."),
            "student_answers_quarantine": p.out(
                "student_answers_quarantine", kinds={"pandas", "parquet"}, code_version=code,
                description="Rows without a usable teacher answer (unfinished, empty, too long), with reasons."),
        },
        check_specs=[dg.AssetCheckSpec(
            ANSWERS_CHECK, asset=K("student_teacher_answers"), blocking=True,
            description=f"at most {cfg.max_refused_rate:.0%} of the rows lack a usable teacher answer "
                        "(student.generation.max_refused_rate)")],
    )
    def student_teacher_answers(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                                dataset_splits: pd.DataFrame, student_teacher: dict, student_base_model: dict):
        require_checks_passed(context, p.blocking_checks)
        start = time.perf_counter()
        device = compute.resolved_device()
        rows = dataset_splits[dataset_splits["split"].isin(["train", "validation"])].reset_index(drop=True)
        answers, quarantine, stats = student_stage.teacher_answers(
            rows, Path(student_teacher["path"]), student_teacher["model_hash"], spec.task, cfg, spec.model.max_length,
            Path(student_base_model["path"]), spec.student_model().max_length,
            p.paths(storage).student_dir / "answers" / f"{student_teacher['model_hash']}.parquet", device,
            pick_precision(spec.training.precision, device))
        stats |= {"teacher": student_teacher["source"], "seconds": round(time.perf_counter() - start, 2)}
        yield dg.Output(answers, output_name="student_teacher_answers", data_version=dg.DataVersion(frame_hash(answers)),
                        metadata={"dagster/row_count": len(answers), **jsonable(stats),
                                  "by_split": dg.MetadataValue.json({str(k): int(v) for k, v in
                                                                     answers["split"].value_counts().items()}),
                                  "preview": p.preview(answers, ["split", "prompt", "response", "gold_response"])})
        yield dg.Output(quarantine, output_name="student_answers_quarantine",
                        data_version=dg.DataVersion(frame_hash(quarantine)),
                        metadata={"dagster/row_count": len(quarantine),
                                  "preview": p.preview(quarantine, ["example_id", "reason"], n=20)})
        rate = len(quarantine) / max(1, len(rows))
        yield dg.AssetCheckResult(asset_key=K("student_teacher_answers"), check_name=ANSWERS_CHECK,
                                  passed=bool(len(answers)) and rate <= cfg.max_refused_rate,
                                  description=f"{len(quarantine)} of {len(rows)} rows without a usable teacher answer "
                                              f"({rate:.1%}; at most {cfg.max_refused_rate:.0%})",
                                  metadata={"rows_in": len(rows), "rows_answered": len(answers),
                                            "rows_quarantined": len(quarantine), "refused_rate": rate})

    p.assets.append(student_teacher_answers)


def _build_student_model(p: PipelineDefs) -> None:
    spec, K, student = p.spec, p.key, p.spec.student
    guarded = _guarded(p)
    rows_asset = "student_teacher_answers" if student.uses_answers else "dataset_splits"

    @dg.asset(**p.asset_args("student_model", kinds={"pytorch", "peft"}, code_version=code_version(training, formatting),
                             io_manager_key=JSON_IO, ins={"rows": dg.AssetIn(K(rows_asset)),
                                                          **p.ins("student_base_model", "student_teacher")},
                             deps=quarantine_assets(p),
                             description=f"The student trained on the teacher's {student.distillation} "
                                         "(training.train with the student's model and training settings)."))
    def student_model(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                      mlflow: MLflowTracking, pipes_subprocess_client: dg.PipesSubprocessClient, k8s_training: K8sTraining,
                      rows: pd.DataFrame, student_base_model: dict, student_teacher: dict) -> dg.Output[dict]:
        require_checks_passed(context, guarded)
        model_dir, teacher_dir = Path(student_base_model["path"]), Path(student_teacher["path"])
        student_stage.check_logits_teacher(spec, model_dir, teacher_dir)
        student_spec = spec.student_pipeline(str(teacher_dir) if student.uses_logits else None)
        train_df = rows[rows["split"] == "train"].reset_index(drop=True)
        val_df = rows[rows["split"] == "validation"].reset_index(drop=True)
        device = compute.resolved_device()
        lineage = adapter_lineage(context, student_spec, student_base_model, train_df, val_df, device) | {
            "distillation": student.distillation, "teacher_model_hash": student_teacher["model_hash"]}
        resources = {"storage": storage, "compute": compute, "mlflow": mlflow,
                     "pipes_subprocess_client": pipes_subprocess_client, "k8s_training": k8s_training}
        out = trained_adapter(context, student_spec, lineage, p.paths(storage).student_dir / "training", model_dir,
                              train_df, val_df, device, resources, [K(rows_asset), K("student_base_model")],
                              f"{spec.name}-student")
        shown = [c for c in ("prompt", "response", "gold_response") if c in train_df]
        return dg.Output(out.value, data_version=out.data_version, metadata={
            **out.metadata, "teacher": student_teacher["source"], "student": student_base_model["source"],
            "train_rows": len(train_df), "training_rows": p.preview(train_df, shown)})

    p.assets.append(student_model)


def _build_report(p: PipelineDefs) -> None:
    spec, student = p.spec, p.spec.student
    guarded = _guarded(p)

    @dg.asset(**p.asset_args("student_report", kinds={"pytorch", "markdown"}, code_version=_code(), io_manager_key=JSON_IO,
                             ins=p.ins("student_model", "student_teacher", "student_base_model", "dataset_splits"),
                             description="Teacher vs student on the test split: task metric, parameters, generation "
                                         "tokens/s (measured in the run)."))
    def student_report(context: dg.AssetExecutionContext, storage: SFTStorage, compute: ComputeResource,
                       student_model: dict, student_teacher: dict, student_base_model: dict,
                       dataset_splits: pd.DataFrame) -> dg.Output[dict]:
        require_checks_passed(context, guarded)
        test = dataset_splits[dataset_splits["split"] == "test"].reset_index(drop=True)
        directory = p.paths(storage).student_dir / "reports"
        inputs = {"student": student_model["lineage_hash"], "teacher": student_teacher["model_hash"],
                  "test": frame_hash(test), "evaluation": spec.evaluation.model_dump(mode="json"),
                  "report": student.report.model_dump(mode="json"),
                  "code_version": context.assets_def.code_versions_by_key[context.asset_key]}
        report, inputs_hash, skipped = cached_report(
            context, directory, "student_report.json", inputs,
            lambda _: _compared(spec, compute, test, student_model, student_teacher, student_base_model),
            read=evaluation.read_report, write=student_stage.write_report,
            unchanged="student, teacher and test split unchanged since the last report")
        student_stage.write_report(directory, report)  # the latest, where people look for it
        metric, d = report["primary_metric"], report["student_vs_teacher"]
        return dg.Output(report, data_version=dg.DataVersion(inputs_hash), metadata=rounded({
            "report": dg.MetadataValue.md(student_stage.render_markdown(report)),
            "report_path": dg.MetadataValue.path(str(directory / "student_report.md")),
            f"teacher_{metric}": report["teacher"]["metrics"][metric], f"student_{metric}": report["student"]["metrics"][metric],
            "teacher_parameters": report["teacher"]["parameters"], "student_parameters": report["student"]["parameters"],
            "teacher_tokens_per_second": report["teacher"]["speed"]["tokens_per_second"],
            "student_tokens_per_second": report["student"]["speed"]["tokens_per_second"],
            "speedup": d["speedup"], "parameters_ratio": d["parameters_ratio"], "n_test": report["n_test"],
            "skipped_evaluation": skipped, "inputs_hash": inputs_hash}))

    p.assets.append(student_report)


def _compared(spec, compute: ComputeResource, test: pd.DataFrame, student_model: dict, student_teacher: dict,
              student_base_model: dict) -> dict:
    """Teacher and student scored here on the same test rows (`student.compare`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = compute.resolved_device()
    start = time.perf_counter()
    teacher_dir, model_dir = Path(student_teacher["path"]), Path(student_base_model["path"])
    teacher = (AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).to(device).eval(),
               AutoTokenizer.from_pretrained(teacher_dir))
    tuned = (evaluation.load_tuned_model(model_dir, Path(student_model["adapter_dir"]), student_model["method"],
                                         device), AutoTokenizer.from_pretrained(model_dir))
    student_spec = spec.student_pipeline(str(teacher_dir) if spec.student.uses_logits else None)
    report = student_stage.compare(spec, student_spec, test, teacher, tuned, device,
                                   pick_precision(spec.training.precision, device),
                                   {"teacher": student_teacher["source"],
                                    "student": f"{student_model['method']} of {student_base_model['source']}"})
    return report | {"student_lineage_hash": student_model["lineage_hash"],
                     "student_training": {k: student_model["metrics"].get(k) for k in
                                          ("steps", "seconds", "tokens_per_second", "trainable_parameters", "val_loss")},
                     "seconds": round(time.perf_counter() - start, 1)}
