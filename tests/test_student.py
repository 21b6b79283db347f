"""Distillation into a smaller model (the spec's `student:` section): a student derived by dropping layers,
the teacher's answers, the student trained on them (and on the teacher's logits), the teacher vs
student report, the graph's wiring and the section's spec errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from preference_fixtures import one_torch_thread  # noqa: F401
from test_asset_graph import describe, matches_snapshot
from test_pipeline_dagster import (  # noqa: F401 (instance: fixture)
    ROOT,
    check_results,
    instance,
    materialized,
    metadata,
    run,
    write_spec,
)
from test_training import examples, spec_for
from tiny_model import build_tiny_model, with_another_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sft_dagster import evaluation, models, training
from sft_dagster import student as student_stage
from sft_dagster.cli import _print_summary, run_summary, stage_names
from sft_dagster.defs import build_definitions
from sft_dagster.defs.pipeline import build_pipeline_assets
from sft_dagster.evaluation import load_tuned_model, score_model
from sft_dagster.formatting import generation_prompt_ids
from sft_dagster.spec import (
    ModelSpec,
    SpecError,
    StudentGenerationSpec,
    TaskSpec,
    load_spec,
)
from sft_dagster.training.distill import Distiller
from sft_dagster.formatting import encode_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph_student.json"
ANSWER = "maybe so"  # what the fixed-answer teacher says to every prompt: never one of the task's labels
TASK = TaskSpec(type="sentiment", labels=["negative", "neutral", "positive"], prompt_template="Sentiment of: {prompt}")


def build_fixed_answer_teacher(source: Path, out: Path, answer: str) -> Path:
    """A tiny model (the source's tokenizer and embeddings) that answers every prompt with `answer`.

    Its decoder layers write nothing into the residual stream (zero output projections), so the next
    token depends on the current token alone; the untied head maps the template's last token to the
    answer's first token, each answer token to the next, and the last to the end-of-turn token.
    """
    tok = AutoTokenizer.from_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    config.tie_word_embeddings = False
    weights = AutoModelForCausalLM.from_pretrained(source).state_dict()
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict({k: v for k, v in weights.items() if k != "lm_head.weight"}, strict=False)
    last = generation_prompt_ids(tok, "any review", None, TASK)[-1]
    chain = [last, *tok.encode(answer, add_special_tokens=False), tok.eos_token_id]
    assert len(set(chain)) == len(chain)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        embed = model.get_input_embeddings().weight
        head = torch.zeros_like(model.lm_head.weight)
        for current, following in itertools.pairwise(chain):
            direction = embed[current] / embed[current].pow(2).mean().sqrt()  # what the final RMSNorm passes on
            head[following] += 50 * direction / direction.norm()
        model.lm_head.weight.copy_(head)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return build_fixed_answer_teacher(tiny_model_dir, tmp_path_factory.mktemp("teacher"), ANSWER)


def greedy_answers(model_dir: Path, prompts: list[str]) -> list[str]:
    """The model's greedy answers, generated here without the student module (the test's own reference)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([generation_prompt_ids(tok, prompt, None, TASK)])
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
            out.append(tok.decode(new, skip_special_tokens=True).strip())
    return out


# --- deriving a smaller model ---------------------------------------------------------------------------

def test_kept_layers_are_evenly_spaced_with_the_first_and_the_last():
    assert models.kept_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert models.kept_layers(6, 3) == [0, 2, 5] and models.kept_layers(6, 1) == [5] and models.kept_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(models.ModelResolutionError, match="not between 1 and the model's 6 layers"):
        models.kept_layers(6, 7)


def test_keep_layers_copies_the_kept_layers_weights_and_computes_as_the_source_without_the_others(tmp_path, monkeypatch):
    source = build_tiny_model(tmp_path / "six", num_layers=6, seed=3)
    resolved = models.resolve_base_model(ModelSpec(base=str(source), keep_layers=3), tmp_path / "cache")
    assert resolved.path.parent == (tmp_path / "cache").resolve() and resolved.source == f"{source} keep_layers=3"
    src_hash, src_tok = models.directory_hashes(source)
    assert resolved.tokenizer_hash == src_tok and resolved.model_hash != src_hash
    big = AutoModelForCausalLM.from_pretrained(source).eval()
    small = AutoModelForCausalLM.from_pretrained(resolved.path).eval()
    assert small.config.num_hidden_layers == 3
    kept = json.loads((resolved.path / models.DERIVED_FILE).read_text())["kept_layers"]
    assert kept == [0, 2, 5]
    for j, i in enumerate(kept):
        mine, theirs = small.model.layers[j].state_dict(), big.model.layers[i].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not torch.equal(small.model.layers[1].self_attn.q_proj.weight, big.model.layers[1].self_attn.q_proj.weight)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(small.state_dict()[name], big.state_dict()[name])
    # The same function as the source with only those layers, and generation with a KV cache works.
    ids = torch.tensor([[1, 5, 9, 33, 60, 2]])
    big.model.layers = torch.nn.ModuleList(big.model.layers[i] for i in kept)
    with torch.no_grad():
        assert torch.allclose(small(ids, use_cache=False).logits, big(ids, use_cache=False).logits, atol=1e-5)
        assert small.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)
    # Derived once: a second resolution reuses the cached directory without loading the source.
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("derived again although cached"))
    again = models.resolve_base_model(ModelSpec(base=str(source), keep_layers=3), tmp_path / "cache")
    assert again == resolved


# --- the teacher's answers ------------------------------------------------------------------------------

def test_teacher_answers_are_the_teachers_cached_and_unfinished_ones_quarantined(tiny_model_dir, teacher_dir, tmp_path,
                                                                                  monkeypatch):
    rows = examples(6).assign(split="train")
    cfg = StudentGenerationSpec(max_new_tokens=8, batch_size=4)
    teacher_hash = models.directory_hashes(teacher_dir)[0]
    cache = tmp_path / "answers.parquet"
    answered, quarantine, stats = student_stage.teacher_answers(
        rows, teacher_dir, teacher_hash, TASK, cfg, 128, tiny_model_dir, 128, cache, "cpu")
    assert answered["response"].tolist() == greedy_answers(teacher_dir, rows["prompt"].tolist()) == [ANSWER] * 6
    assert answered["gold_response"].tolist() == rows["response"].tolist()
    assert quarantine.empty and stats["teacher_generated"] == 6 and stats["answers_equal_to_gold"] == 0
    # Read back from the cache: the teacher is not loaded again.
    with monkeypatch.context() as m:
        m.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("teacher loaded"))
        again, _, stats2 = student_stage.teacher_answers(rows, teacher_dir, teacher_hash, TASK, cfg, 128, tiny_model_dir,
                                                         128, cache, "cpu")
    assert again.equals(answered) and stats2["teacher_generated"] == 0 and stats2["rows_read_from_cache"] == 6
    # An answer cut by max_new_tokens, a prompt that leaves no room, and a student too short for the answer:
    # quarantined with their reasons, never cut; rows in = answered + quarantined.
    short = StudentGenerationSpec(max_new_tokens=1)
    _, refused, _ = student_stage.teacher_answers(rows, teacher_dir, teacher_hash, TASK, short, 128, tiny_model_dir, 128,
                                                  cache, "cpu")
    assert len(refused) == 6 and refused["reason"].str.contains("did not end within").all()
    long_rows = pd.concat([rows, examples(1, 40).assign(split="train", prompt="word " * 200)], ignore_index=True)
    kept, refused, stats = student_stage.teacher_answers(long_rows, teacher_dir, teacher_hash, TASK, cfg, 128,
                                                         tiny_model_dir, 128, cache, "cpu")
    assert len(kept) == 6 and refused["example_id"].tolist() == ["id40"] and "does not fit" in refused["reason"].iloc[0]
    prompt_tokens = len(generation_prompt_ids(AutoTokenizer.from_pretrained(tiny_model_dir), rows["prompt"].iloc[0],
                                              None, TASK))
    _, refused, _ = student_stage.teacher_answers(rows.head(1), teacher_dir, teacher_hash, TASK, cfg, 128, tiny_model_dir,
                                                  prompt_tokens + 1, cache, "cpu")
    assert "over its max_length" in refused["reason"].iloc[0]


def test_sampled_answers_are_seeded_per_prompt(tiny_model_dir, tmp_path):
    """A random teacher sampling at temperature 1: the same seed gives the same answers whatever the batch
    and row order; another seed other answers."""
    rows = examples(6).assign(split="train")
    cfg = StudentGenerationSpec(max_new_tokens=6, temperature=1.0, batch_size=4, max_refused_rate=1.0)
    h = models.directory_hashes(tiny_model_dir)[0]

    def answers(frame, config, name):
        cache = tmp_path / f"{name}.parquet"
        student_stage.teacher_answers(frame, tiny_model_dir, h, TASK, config, 128, tiny_model_dir, 128, cache, "cpu")
        return pd.read_parquet(cache).set_index("key")["answer"].sort_index()

    a = answers(rows, cfg, "a")
    b = answers(rows.iloc[::-1], cfg.model_copy(update={"batch_size": 1}), "b")
    c = answers(rows, cfg.model_copy(update={"seed": 1}), "c")
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


# --- logits: the KL term on the train rows ---------------------------------------------------------------

def test_logits_distillation_scores_the_train_rows_with_their_task(tiny_model_dir, teacher_dir, tmp_path):
    spec = spec_for(tiny_model_dir, distillation={"weight": 1.0, "teacher": str(teacher_dir), "top_k": 8,
                                                  "replay": {"source": "train", "examples": 10}})
    train = examples(5)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    distiller = Distiller.prepare(spec, tiny_model_dir, tok, tmp_path / "cache", "cpu", tok.pad_token_id, train, None)
    expected = encode_frame(tok, train, spec)  # the task's template, not the plain replay rendering
    assert [e.input_ids for e in distiller.examples] == [e.input_ids for e in expected]
    assert distiller.stats["computed"] == 5 and distiller.stats["source"] == "train"
    with pytest.raises(ValueError, match="needs the train split"):
        Distiller.prepare(spec, tiny_model_dir, tok, tmp_path / "cache", "cpu", tok.pad_token_id)


def test_logits_distillation_refuses_a_teacher_with_another_tokenizer(tiny_model_dir, teacher_dir, tmp_path):
    other = with_another_tokenizer(teacher_dir, tmp_path / "other")
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, student={"model": {"base": str(tiny_model_dir)},
                                                                   "teacher": str(other), "distillation": "logits"}))
    with pytest.raises(student_stage.StudentError, match=r"spec.yaml: student.distillation: logits .*vocabulary differ"):
        student_stage.check_logits_teacher(spec, tiny_model_dir, other)
    student_stage.check_logits_teacher(spec, tiny_model_dir, teacher_dir)  # same tokenizer: accepted


# --- the spec section ------------------------------------------------------------------------------------

def test_student_spec_errors_name_file_line_and_key(tmp_path, tiny_model_dir):
    good = {"model": {"base": str(tiny_model_dir), "keep_layers": 1}, "teacher": "promoted"}

    def error(student) -> tuple[str, Path]:
        path = write_spec(tmp_path, tiny_model_dir, student=student)
        with pytest.raises(SpecError) as exc:
            load_spec(path)
        return str(exc.value), path

    def line_of(path: Path, key: str) -> int:
        return next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(f"{key}:"))

    text, path = error(good | {"distillation": "words"})
    assert f"{path}:{line_of(path, 'distillation')}: student.distillation: Input should be 'sequence', 'logits' or 'both'" in text
    text, path = error(good | {"model": {"base": str(tiny_model_dir), "keep_layers": 0}})
    assert f"{path}:{line_of(path, 'keep_layers')}: student.model.keep_layers: Input should be greater than or equal to 1" in text
    text, path = error({"teacher": "promoted"})
    assert "student.model: Field required" in text
    text, _ = error(good | {"distillation": "both", "training": {"distillation": {"weight": 0.5}}})
    assert "student: Value error, student.training.distillation is set by student.distillation: both" in text
    text, _ = error(good | {"generation": {"temperature": -1}})
    assert "student.generation.temperature: Input should be greater than or equal to 0" in text
    text, _ = error(good | {"speed": 3})
    assert "student.speed: Extra inputs are not permitted" in text
    with pytest.raises(SpecError, match="training.replay: Value error|training: Value error, training.replay.source: train"):
        load_spec(write_spec(tmp_path, tiny_model_dir, **{"training.replay": {"source": "train", "ratio": 0.1}}))
    # Valid: the student's max_length and training default to the pipeline's; the SFT fingerprint ignores the section.
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, student=good))
    plain = load_spec(write_spec(tmp_path, tiny_model_dir))
    assert spec.student_model().max_length == spec.model.max_length == 256
    assert spec.student_pipeline().training == spec.training and spec.fingerprint() == plain.fingerprint()
    assert spec.student_pipeline().fingerprint() != plain.fingerprint()  # the student's own model is in its lineage


# --- the graph -------------------------------------------------------------------------------------------

def test_student_asset_graph_matches_snapshot(tmp_path, tiny_model_dir):
    """The SFT graph plus the student's assets (teacher: the promoted model, distillation: both)."""
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, student={
        "model": {"base": str(tiny_model_dir), "keep_layers": 1}, "teacher": "promoted", "distillation": "both"}))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store")
    current = describe(defs, build_pipeline_assets(spec, ROOT / "data_checks").blocking_checks)
    assert matches_snapshot(current, SNAPSHOT)
    sft = json.loads((SNAPSHOT.parent / "asset_graph.json").read_text())  # the same spec without the section
    assert set(sft["assets"]) < set(current["assets"])
    assert {k: v for k, v in current["assets"].items() if k in sft["assets"]} == sft["assets"]  # SFT's wiring as it was
    assert set(current["assets"]) - set(sft["assets"]) == {
        "student_base_model", "student_teacher", "student_teacher_answers", "student_answers_quarantine",
        "student_model", "student_report"}
    # logits only: no teacher answers; a local teacher: no dependency on the SFT adapter
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, student={
        "model": {"base": str(tiny_model_dir)}, "teacher": str(tiny_model_dir), "distillation": "logits"}))
    graph = describe(build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store"), [])["assets"]
    assert "student_teacher_answers" not in graph and graph["student_teacher"]["deps"] == []
    assert graph["student_model"]["deps"] == ["dataset_splits", "quarantine", "student_base_model", "student_teacher"]


# --- end to end through Dagster --------------------------------------------------------------------------

def test_student_is_trained_on_the_teachers_answers_and_reported_against_it(tmp_path, tiny_model_dir, teacher_dir,
                                                                             instance, monkeypatch, capsys):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, **{
        "quality.cleanlab.enabled": False, "evaluation.max_examples": 12, "evaluation.max_new_tokens": 4,
        "student": {"model": {"base": str(tiny_model_dir), "keep_layers": 1}, "teacher": str(teacher_dir),
                    "distillation": "both", "generation": {"max_new_tokens": 12},
                    "logits": {"top_k": 8, "batch_size": 4},
                    "training": {"method": "lora", "epochs": 1, "batch_size": 16, "learning_rate": 0.005,
                                 "precision": "fp32", "lora": {"r": 4, "alpha": 8}},
                    "report": {"speed_prompts": 4, "speed_new_tokens": 3, "speed_repeats": 2}}}))
    storage = tmp_path / "store"
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=storage, device="cpu")
    trained_on = []

    original = training.train

    def spy(train_spec, model_dir, train_df, val_df, *args, **kwargs):
        trained_on.append((train_spec, Path(model_dir), train_df.copy(), val_df.copy()))
        return original(train_spec, model_dir, train_df, val_df, *args, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    result = run(defs, spec, instance, ["student_report"], upstream=True)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert {"student_base_model", "student_teacher", "student_teacher_answers", "student_model",
            "student_report"} <= materialized(result)
    assert "fine_tuned_adapter" not in materialized(result)  # a local teacher needs no SFT adapter
    assert check_results(result)["student_teacher_answers:answers_kept"]

    # Trained once, on the student model, on the teacher's answers: not the gold labels.
    (train_spec, model_dir, train_df, val_df), = trained_on
    assert model_dir == Path(metadata(instance, spec, "student_base_model")["path"])
    assert AutoConfig.from_pretrained(model_dir).num_hidden_layers == 1
    splits = pd.read_parquet(storage / spec.name / "tables" / "dataset_splits.parquet")
    assert sorted(train_df["example_id"]) == sorted(splits.loc[splits["split"] == "train", "example_id"])
    assert train_df["response"].tolist() == greedy_answers(teacher_dir, train_df["prompt"].tolist())
    assert val_df["response"].tolist() == greedy_answers(teacher_dir, val_df["prompt"].tolist())
    gold = splits.set_index("example_id").loc[train_df["example_id"], "response"].tolist()
    assert train_df["gold_response"].tolist() == gold and not set(train_df["response"]) & set(gold)
    # both: the KL term to the teacher on the same rows
    assert train_spec.training.distillation.weight == 1.0 and train_spec.training.distillation.replay.source == "train"
    assert Path(train_spec.training.distillation.teacher) == teacher_dir.resolve()
    student = metadata(instance, spec, "student_model")
    assert student["metrics"]["distillation"]["replay_examples"] == len(train_df)

    # The report: both models scored here, on the same test rows, with their own parameters and speed.
    report = json.loads((storage / spec.name / "student" / "reports" / "student_report.json").read_text())
    rows = evaluation.test_rows(splits[splits["split"] == "test"].reset_index(drop=True), spec)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tuned = load_tuned_model(model_dir, Path(student["adapter_dir"]), "lora", "cpu")
    expected_teacher = score_model(teacher_model, AutoTokenizer.from_pretrained(teacher_dir), rows, spec, "cpu").metrics
    expected_student = score_model(tuned, AutoTokenizer.from_pretrained(model_dir), rows, train_spec, "cpu").metrics
    assert report["n_test"] == len(rows) == 12
    for name, expected in (("teacher", expected_teacher), ("student", expected_student)):
        assert report[name]["metrics"]["accuracy"] == expected["accuracy"]
        assert report[name]["metrics"]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert report["teacher"]["metrics"]["loss"] != pytest.approx(report["student"]["metrics"]["loss"], rel=1e-3)
    assert report["teacher"]["parameters"] == sum(p.numel() for p in teacher_model.parameters())
    assert report["student"]["parameters"] == sum(p.numel() for p in tuned.parameters())
    assert report["student"]["parameters"] < report["teacher"]["parameters"]  # one decoder layer of two, tied head
    for name in ("teacher", "student"):
        speed = report[name]["speed"]
        assert speed["tokens"] == 4 * 3 and len(speed["passes_seconds"]) == 2  # every prompt generated exactly 3 tokens
        assert speed["tokens_per_second"] == pytest.approx(speed["tokens"] / speed["seconds"], rel=1e-2)
    assert report["student_vs_teacher"]["speedup"] == pytest.approx(
        report["student"]["speed"]["tokens_per_second"] / report["teacher"]["speed"]["tokens_per_second"])
    shown = metadata(instance, spec, "student_report")
    assert shown["student_parameters"] == report["student"]["parameters"] and "| parameters |" in shown["report"]
    summary = run_summary(instance, spec, result.run_id, defs.resolve_asset_graph(),
                          stage_names(defs.resolve_job_def(f"{spec.name}_job")))
    assert summary["student"]["student"]["parameters"] == report["student"]["parameters"]
    assert summary["student"]["teacher"]["tokens_per_second"] == report["teacher"]["speed"]["tokens_per_second"]
    _print_summary(summary)
    assert f"student report: {storage / spec.name / 'student' / 'reports' / 'student_report.md'}" in capsys.readouterr().out

    # A second run keeps the answers, the student and the report (same inputs).
    again = run(defs, spec, instance, ["student_teacher_answers", "student_model", "student_report"])
    assert again.success and len(trained_on) == 1
    assert metadata(instance, spec, "student_teacher_answers")["teacher_generated"] == 0
    assert metadata(instance, spec, "student_model")["skipped_training"] is True
    assert metadata(instance, spec, "student_report")["skipped_evaluation"] is True
