"""Distillation against forgetting: the KL term against a direct reference, the teacher cache, weight 0."""

from __future__ import annotations

import pytest
import torch
from test_training import examples, losses, spec_for
from tiny_model import build_tiny_model, with_another_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_dagster.formatting import IGNORE_INDEX
from sft_dagster.training.augment import GENERAL_TASK
from sft_dagster.training.distill import (
    Distiller,
    TeacherError,
    check_same_tokenizer,
    teacher_targets,
)
from sft_dagster.torchkit import collate
from sft_dagster.formatting import encode_frame


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Another random tiny model with the same tokenizer: a teacher that differs from the student."""
    return build_tiny_model(tmp_path_factory.mktemp("teacher"), seed=1)


def _replay_examples(tiny_model_dir, n=6):
    from sft_dagster.retention import replay_set

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = encode_frame(tok, replay_set(n), spec_for(tiny_model_dir), [GENERAL_TASK] * n)
    return tok, encoded, [tok.decode(e.input_ids) for e in encoded]


def _reference_kl(student, teacher, encoded, pad_id, temperature, top_k=None) -> tuple[float, int]:
    """Summed T^2 KL at answer positions, from plain full forwards of both models."""
    batch = collate(encoded, pad_id, "cpu")
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    where = batch["labels"][:, 1:] != IGNORE_INDEX
    s, t = s[where] / temperature, t[where] / temperature
    if top_k is None:
        kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                        reduction="sum")
    else:  # k + 1 outcomes: the teacher's top k tokens and everything else, in probabilities
        pt, ps = torch.softmax(t, -1).double(), torch.softmax(s, -1).double()
        idx = t.topk(top_k, -1).indices
        qt, qs = pt.gather(-1, idx), ps.gather(-1, idx)
        qt = torch.cat([qt, 1 - qt.sum(-1, keepdim=True)], -1)
        qs = torch.cat([qs, 1 - qs.sum(-1, keepdim=True)], -1)
        kl = (qt * (qt.log() - qs.log())).sum()
    return float(kl) * temperature ** 2, int(where.sum())


@pytest.mark.parametrize(("top_k", "temperature"), [(None, 1.0), (None, 2.0), (5, 1.5)])
def test_kl_term_equals_a_direct_reference(tiny_model_dir, teacher_dir, tmp_path, top_k, temperature):
    tok, encoded, texts = _replay_examples(tiny_model_dir)
    vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    k = top_k or vocab  # k = the vocabulary: the exact KL
    spec = spec_for(tiny_model_dir, distillation={"weight": 1.0, "teacher": str(teacher_dir), "top_k": k,
                                                  "temperature": temperature, "replay": {"examples": 6}})
    distiller = Distiller.prepare(spec, tiny_model_dir, tok, tmp_path / "cache", "cpu", tok.pad_token_id)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    rows = list(range(len(encoded)))
    ours, n = distiller.loss(student, rows)
    ref, n_ref = _reference_kl(student, teacher, [distiller.examples[i] for i in rows], tok.pad_token_id,
                               temperature, top_k)
    assert n == n_ref > 0
    assert ref > 0.005  # two different random models: clearly not zero (the self-KL below is < 1e-4 of it)
    # fp32 here, fp64 in the reference: KLs of near-uniform distributions lose digits to cancellation
    assert float(ours.detach()) == pytest.approx(ref, rel=1e-4 if top_k is None else 2e-3)
    # The teacher against itself: nothing to distil.
    self_kl, _ = Distiller(spec, distiller.examples, distiller.targets, {}, tok.pad_token_id, "cpu").loss(teacher, rows)
    assert abs(float(self_kl.detach())) < 1e-3 * ref


def test_teacher_logits_are_cached_and_read_back(tiny_model_dir, teacher_dir, tmp_path, monkeypatch):
    tok, encoded, texts = _replay_examples(tiny_model_dir)
    first, stats1 = teacher_targets(teacher_dir, encoded, texts, 8, 1.0, tmp_path / "c", "cpu")
    assert stats1 == {"hits": 0, "computed": 6} and len(list((tmp_path / "c").glob("*.pt"))) == 6

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded although every example is cached")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    second, stats2 = teacher_targets(teacher_dir, encoded, texts, 8, 1.0, tmp_path / "c", "cpu")
    assert stats2 == {"hits": 6, "computed": 0}
    for a, b in zip(first, second):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.logprobs, b.logprobs)
    monkeypatch.undo()
    # Another k is another key: computed again, not read back wrongly.
    _, stats3 = teacher_targets(teacher_dir, encoded, texts, 4, 1.0, tmp_path / "c", "cpu")
    assert stats3 == {"hits": 0, "computed": 6}


def test_training_with_distillation_runs_the_teacher_once_per_example(tiny_model_dir, teacher_dir, tmp_path):
    distill = {"weight": 1.0, "teacher": str(teacher_dir), "top_k": 8, "batch_size": 2, "replay": {"examples": 5}}
    spec = spec_for(tiny_model_dir, epochs=3, distillation=distill)
    data, val = examples(8), examples(3, 50)
    plain, _ = losses(spec_for(tiny_model_dir, epochs=3), tiny_model_dir, data, val, tmp_path / "plain")
    zero, _ = losses(spec_for(tiny_model_dir, epochs=3, distillation=distill | {"weight": 0.0}), tiny_model_dir, data,
                     val, tmp_path / "zero")
    assert zero == plain  # weight 0: today's run, bit for bit
    _, result = losses(spec, tiny_model_dir, data, val, tmp_path / "a" / "run")
    stats = result.metrics["distillation"]
    assert stats["computed"] == 5 and stats["hits"] == 0 and stats["replay_examples"] == 5  # 3 epochs, 5 teacher runs
    assert stats["final_kl"] > 0
    _, again = losses(spec, tiny_model_dir, data, val, tmp_path / "a" / "run2")  # same cache (next to the run folder)
    assert again.metrics["distillation"]["computed"] == 0 and again.metrics["distillation"]["hits"] == 5


def test_distillation_holds_the_student_near_the_base_model(tiny_model_dir, tmp_path):
    """Teacher = the base model (the default): plain training drifts away from it on the replay
    examples; the same training with the KL term drifts far less."""
    from peft import PeftModel

    common = {"epochs": 4, "learning_rate": 1e-2, "early_stopping_patience": None}
    distill = {"weight": 100.0, "top_k": 16, "batch_size": 6, "replay": {"examples": 6}}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = spec_for(tiny_model_dir, distillation=distill, **common)
    distiller = Distiller.prepare(spec, tiny_model_dir, tok, tmp_path / "cache", "cpu", tok.pad_token_id)
    drift = {}
    for name, s in {"plain": spec_for(tiny_model_dir, **common), "distilled": spec}.items():
        _, result = losses(s, tiny_model_dir, examples(8), examples(3, 50), tmp_path / name)
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
        kl, n = distiller.loss(tuned, list(range(6)))
        drift[name] = float(kl.detach()) / n
    untrained, n = distiller.loss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), list(range(6)))
    assert abs(float(untrained.detach())) / n < 1e-6  # the base model is its own teacher
    assert drift["plain"] > 2e-4, drift  # the task training moved the replay distributions
    assert drift["distilled"] < 0.5 * drift["plain"], drift


def test_a_teacher_with_another_tokenizer_is_refused(tiny_model_dir, teacher_dir, tmp_path):
    other = with_another_tokenizer(teacher_dir, tmp_path / "other")
    with pytest.raises(TeacherError, match="tokenizer differs.*vocabulary"):
        check_same_tokenizer(tiny_model_dir, other)
    check_same_tokenizer(tiny_model_dir, teacher_dir)  # the same tokenizer: accepted
    spec = spec_for(tiny_model_dir, distillation={"weight": 1.0, "teacher": str(tmp_path / "missing")})
    with pytest.raises(TeacherError, match="not a local model directory"):
        Distiller.prepare(spec, tiny_model_dir, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "cache", "cpu", 0)


def test_a_local_teacher_and_a_replay_file_join_the_lineage(tiny_model_dir, teacher_dir, tmp_path):
    from sft_dagster.defs.training import training_inputs

    assert training_inputs(spec_for(tiny_model_dir), tiny_model_dir) == {}
    assert training_inputs(spec_for(tiny_model_dir, distillation={"weight": 1.0}), tiny_model_dir) == {}  # the base
    general = tmp_path / "general.jsonl"
    general.write_text('{"prompt": "Say hi", "response": "hi"}\n')
    spec = spec_for(tiny_model_dir, distillation={"weight": 1.0, "teacher": str(teacher_dir)},
                    replay={"ratio": 0.5, "source": str(general)})
    first = training_inputs(spec, tiny_model_dir)
    assert set(first) == {"distillation_teacher_hash", "replay_file_hash"}
    general.write_text('{"prompt": "Say bye", "response": "bye"}\n')
    assert training_inputs(spec, tiny_model_dir)["replay_file_hash"] != first["replay_file_hash"]
