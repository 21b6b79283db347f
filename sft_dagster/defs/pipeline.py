"""One spec -> one asset group: the SFT lifecycle as Dagster assets and checks, one module per stage.

    data.py        raw_examples (+ ingest_quarantine), label_corrections, labelled_examples
                   (+ labels_quarantine), the data-quality suite as checks
    quality.py     label_issues (cleanlab) and its gates
    curation.py    curated_examples (+ curation_quarantine), quarantine, dataset_splits
    multitask.py   multi-task specs only: each further task's data stages, and task_mix
    training.py    base_model, fine_tuned_adapter
    evaluation.py  evaluation_report (base / champion / candidate), promoted_model
    preference.py  only with a `preference:` section: candidate_generations, ranking_queue,
                   preference_pairs and their gates, reward_model, dpo_adapter, ppo_policy,
                   preference_report, preference_promoted_model
    student.py     only with a `student:` section: student_base_model, student_teacher,
                   student_teacher_answers (+ student_answers_quarantine), student_model, student_report

Adding a stage means one module with a `build(p)` and one line here.
"""

from __future__ import annotations

from pathlib import Path

from ..quality import load_suite
from ..spec import PipelineSpec
from . import curation, data, evaluation, multitask, preference, quality, student, training
from .common import PipelineDefs

DATA_STAGES = (data, quality, curation)
STAGES = (*DATA_STAGES, multitask, training, evaluation, preference, student)


def build_pipeline_assets(spec: PipelineSpec, checks_dir: Path) -> PipelineDefs:
    p = PipelineDefs(spec=spec, suite=load_suite(spec.quality.suite, checks_dir))
    multitask.build_task_pipelines(p, checks_dir, DATA_STAGES)
    for stage in STAGES:
        stage.build(p)
    return p
