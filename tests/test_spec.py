from pathlib import Path

import pytest
import yaml

from sft_dagster.spec import SpecError, deprecation_notes, load_spec, load_specs

ROOT = Path(__file__).resolve().parents[1]

VALID = """
name: tiny
task:
  type: sentiment
  labels: [negative, positive]
sources:
  - path: data/*.jsonl
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_spec_loads():
    specs = load_specs(ROOT / "assets")
    assert "demo_sentiment" in [s.name for s in specs]


def test_defaults_and_relative_paths(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    assert spec.training.method == "lora"
    assert spec.schedule.cron == "0 2 * * *"
    assert spec.resolve("data/x.jsonl") == tmp_path.resolve() / "data/x.jsonl"


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, VALID + "training:\n  methd: lora\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert f"{path}:9" in message  # the line of `methd`
    assert "training.methd" in message


def test_bad_value_names_key(tmp_path):
    path = write(tmp_path, VALID + "training:\n  method: adapters\n")
    with pytest.raises(SpecError, match=r"training\.method"):
        load_spec(path)


def test_label_task_needs_labels(tmp_path):
    path = write(tmp_path, VALID.replace("  labels: [negative, positive]\n", ""))
    with pytest.raises(SpecError, match="task.labels is required"):
        load_spec(path)


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "name: x\ntask: [unclosed\n")
    with pytest.raises(SpecError, match=rf"{path}:\d+: not valid YAML"):
        load_spec(path)


def test_duplicate_pipeline_names(tmp_path):
    write(tmp_path, VALID, "a.yaml")
    write(tmp_path, VALID, "b.yaml")
    with pytest.raises(SpecError, match="also declared"):
        load_specs(tmp_path)


def test_fingerprint_changes_with_content(tmp_path):
    a = load_spec(write(tmp_path, VALID, "a.yaml"))
    b = load_spec(write(tmp_path, VALID + "training:\n  epochs: 3\n", "b.yaml"))
    assert a.fingerprint() != b.fingerprint()


def test_example_specs_load():
    """The examples on the shared data sets (not run in CI: the data lives outside the repository)."""
    examples = {s.name: s for s in map(load_spec, (ROOT / "examples").glob("*.yaml"))}
    assert sorted(examples) == ["banking77", "dialogsum", "gsm8k", "multitask_support", "translation_en_fr"]
    assert examples["translation_en_fr"].sources[0].format == "parallel"
    mixed = examples["multitask_support"]
    assert [t.name for t in mixed.tasks] == ["intents"] and len(mixed.tasks[0].task.labels) == 77
    assert mixed.mixing.strategy == "temperature"


def test_min_rows_to_train_needs_few_shot_examples_and_names_its_line(tmp_path):
    path = write(tmp_path, VALID + "training:\n  min_rows_to_train: 20\nevaluation:\n  few_shot_k: 0\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert f"{path}:9: training.min_rows_to_train:" in str(err.value) and "few_shot_k" in str(err.value)
    assert load_spec(write(tmp_path, VALID + "training:\n  min_rows_to_train: 20\n")).training.min_rows_to_train == 20


def test_min_rows_to_train_leaves_the_training_lineage_alone(tmp_path):
    """Unset, it is in no dump (preference lineages hash `training`); set, it is not in the fingerprint:
    it does not shape the weights of a run that trains."""
    plain = load_spec(write(tmp_path, VALID, "a.yaml"))
    threshold = load_spec(write(tmp_path, VALID + "training:\n  min_rows_to_train: 20\n", "b.yaml"))
    assert "min_rows_to_train" not in plain.training.model_dump(mode="json")
    assert threshold.fingerprint() == plain.fingerprint()


GENERATION = """
name: tiny_gen
task:
  type: {kind}
sources:
  - path: data/*.jsonl
"""


def test_promotion_metric_defaults_to_the_task_types_primary_metric(tmp_path):
    defaults = {kind: load_spec(write(tmp_path, GENERATION.format(kind=kind), f"{kind}.yaml")).promotion.metric
                for kind in ("translation", "summarization", "qa", "instruction", "style")}
    assert defaults == {"translation": "chrf", "summarization": "rougeLsum", "qa": "exact_match",
                        "instruction": "rougeL", "style": "rougeL"}
    label = load_spec(write(tmp_path, VALID))
    assert label.promotion.metric == "accuracy"  # a label spec's default, and its dump, as before
    assert label.promotion.model_dump(mode="json") == {"metric": "accuracy", "min_improvement": 0.0,
                                                       "compare_with": "champion", "max_forgetting": None, "registry": None}
    chosen = load_spec(write(tmp_path, GENERATION.format(kind="translation") + "promotion:\n  metric: bleu\n"))
    assert chosen.promotion.metric == "bleu"
    assert load_spec(write(tmp_path, GENERATION.format(kind="qa") + "promotion: {metric: loss}\n")).promotion.metric == "loss"


def test_a_promotion_metric_the_task_cannot_produce_fails_at_load_with_file_line_and_key(tmp_path):
    path = write(tmp_path, GENERATION.format(kind="translation") + "promotion:\n  min_improvement: 0.5\n  metric: accuracy\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert f"{path}:9: promotion.metric:" in message  # line 9: `metric: accuracy`
    assert "'accuracy' is not a metric a translation task's evaluation reports" in message and "chrf" in message
    with pytest.raises(SpecError, match="no better direction"):  # a length statistic is reported, not a target
        load_spec(write(tmp_path, GENERATION.format(kind="summarization") + "promotion: {metric: words_mean}\n"))
    with pytest.raises(SpecError, match=r"promotion\.metric: .*'chrf' is not a metric a sentiment task"):
        load_spec(write(tmp_path, VALID + "promotion: {metric: chrf}\n"))


def test_require_significant_needs_a_metric_with_an_interval(tmp_path):
    path = write(tmp_path, GENERATION.format(kind="qa") + "promotion:\n  metric: loss\n  require_significant: true\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert f"{path}:9: promotion.require_significant:" in str(err.value) and "no interval" in str(err.value)
    spec = load_spec(write(tmp_path, GENERATION.format(kind="qa") + "promotion: {require_significant: true}\n"))
    assert spec.promotion.require_significant and spec.promotion.metric == "exact_match"
    plain = load_spec(write(tmp_path, GENERATION.format(kind="qa"), "plain.yaml"))
    assert "require_significant" not in plain.promotion.model_dump()  # false: in no dump, no lineage changes


def test_multi_task_and_preference_specs_resolve_the_main_tasks_metric():
    demo = load_spec(ROOT / "assets" / "demo_preference.yaml")
    assert demo.preference is not None and demo.promotion.metric == "exact_match"
    mixed = load_spec(ROOT / "examples" / "multitask.yaml")
    assert mixed.tasks and mixed.promotion.metric == "accuracy"
    assert mixed.task_pipeline(mixed.tasks[0].name).promotion.metric == "accuracy"


def test_a_judge_is_for_generation_tasks_and_leaves_the_lineage_alone(tmp_path):
    path = write(tmp_path, VALID + "evaluation:\n  max_new_tokens: 4\n  judge:\n    model: embedded:smollm2-135m-instruct\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert f"{path}:10: evaluation.judge:" in str(err.value)  # line 10: `judge:`
    assert "a sentiment task's answers are labels" in str(err.value)
    judged = load_spec(write(tmp_path, GENERATION.format(kind="instruction")
                             + "evaluation:\n  judge: {model: embedded:smollm2-135m-instruct, max_examples: 50}\n", "j.yaml"))
    assert judged.evaluation.judge.model == "embedded:smollm2-135m-instruct" and judged.evaluation.judge.max_examples == 50
    plain = load_spec(write(tmp_path, GENERATION.format(kind="instruction"), "plain.yaml"))
    assert "judge" not in plain.evaluation.model_dump(mode="json")  # unset: in no dump, no cache key changes
    assert judged.fingerprint() == plain.fingerprint()  # the judge does not shape the adapter
    with pytest.raises(SpecError, match=r"evaluation\.judge\.max_examples"):
        load_spec(write(tmp_path, GENERATION.format(kind="qa") + "evaluation:\n  judge: {model: x, max_examples: 0}\n", "z.yaml"))


def test_training_adapter_is_the_artefact_and_method_its_old_name(tmp_path):
    """`training.adapter` names what SFT saves; `training.method` (old) still loads, with a note at its line,
    and both spellings give the same spec, fingerprint included (existing runs keep their lineage)."""
    new = load_spec(write(tmp_path, VALID + "training:\n  adapter: full\n", "new.yaml"))
    with pytest.warns(FutureWarning, match=r"old\.yaml:9: training\.method: deprecated.*write training\.adapter: full"):
        old = load_spec(write(tmp_path, VALID + "training:\n  method: full\n", "old.yaml"))
    assert new.training.adapter == old.training.adapter == "full"
    assert new.fingerprint() == old.fingerprint()
    assert new.training.model_dump()["method"] == "full" and "adapter" not in new.training.model_dump()
    assert new.fingerprint() != load_spec(write(tmp_path, VALID, "default.yaml")).fingerprint()


def test_training_method_and_adapter_must_agree(tmp_path):
    path = write(tmp_path, VALID + "training:\n  adapter: lora\n  method: full\n")
    with pytest.raises(SpecError, match=rf"{path}:10: training\.method: .*disagrees with training\.adapter \(lora\)"):
        load_spec(path)
    same = load_spec(write(tmp_path, VALID + "training:\n  adapter: qlora\n  method: qlora\n", "same.yaml"))
    assert same.training.adapter == "qlora"


def test_the_old_name_is_noted_in_the_students_training_too():
    text = VALID + "training:\n  adapter: lora\nstudent:\n  model: m\n  training:\n    method: full\n"
    assert deprecation_notes(yaml.safe_load(text), "s.yaml", text) == [
        "s.yaml:13: student.training.method: deprecated, the old name of training.adapter (what SFT saves: lora, "
        "qlora or full; the objective is sft); write student.training.adapter: full"]
    assert deprecation_notes(yaml.safe_load(VALID + "training:\n  adapter: lora\n"), "s.yaml") == []
