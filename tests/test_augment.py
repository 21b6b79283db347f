"""NEFTune, prompt-template variation and replay mixing on the tiny model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_training import LABELS, examples, losses, spec_for

from sft_dagster.retention import replay_set, retention_set
from sft_dagster.spec import PipelineSpec, SpecError, parse_spec
from sft_dagster.training.augment import (
    GENERAL_TASK,
    NEFTune,
    attach_neftune,
    example_lengths,
    row_tasks,
    template_index,
    with_replay,
)


def _embed_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _embedded(model, ids, **kwargs):
    captured = {}
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    model.model(input_ids=ids, use_cache=False, **kwargs)
    handle.remove()
    return captured["out"].detach()


def test_neftune_noise_is_uniform_at_alpha_over_sqrt_length_times_width_in_train_mode_only(tiny_model_dir):
    model = _embed_model(tiny_model_dir)
    d = model.config.hidden_size
    ids = torch.randint(5, 100, (2, 64))
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0  # the second row is a 16-token example padded to 64
    model.eval()
    clean = _embedded(model, ids, attention_mask=mask)
    neft = NEFTune(model, alpha=5.0)
    assert torch.equal(_embedded(model, ids, attention_mask=mask), clean)  # eval: no noise
    model.train()
    torch.manual_seed(0)
    noise = _embedded(model, ids, attention_mask=mask) - clean
    full, short = 5.0 / (64 * d) ** 0.5, 5.0 / (16 * d) ** 0.5
    # Uniform in [-a, a]: bounded by a, and its extreme within 2% of a over 2048 draws.
    assert noise[0].abs().max() <= full * (1 + 1e-5) and noise[0].abs().max() > 0.98 * full
    assert noise[1, :16].abs().max() <= short * (1 + 1e-5) and noise[1, :16].abs().max() > 0.95 * short
    assert abs(float(noise[0].mean())) < 0.1 * full  # centred
    assert torch.equal(noise[1, 16:], torch.zeros_like(noise[1, 16:]))  # padding untouched
    neft.remove()
    assert torch.equal(_embedded(model, ids, attention_mask=mask), clean)


def test_packed_rows_get_each_example_its_own_length():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]])
    assert example_lengths((1, 10), None, positions).tolist() == [[3, 3, 3, 2, 2, 5, 5, 5, 5, 5]]


def test_neftune_changes_training_not_validation_and_alpha_zero_is_todays_run(tiny_model_dir, tmp_path):
    data, val = examples(8), examples(3, 50)
    plain, plain_result = losses(spec_for(tiny_model_dir, epochs=2), tiny_model_dir, data, val, tmp_path / "a")
    zero, zero_result = losses(spec_for(tiny_model_dir, epochs=2, neftune_alpha=0.0), tiny_model_dir, data, val, tmp_path / "b")
    noisy, noisy_result = losses(spec_for(tiny_model_dir, epochs=2, neftune_alpha=50.0), tiny_model_dir, data, val,
                                 tmp_path / "c")
    assert zero == plain and zero_result.metrics["val_loss"] == plain_result.metrics["val_loss"]
    assert noisy[0] != plain[0]  # the first step's training loss already sees the noise
    assert noisy_result.metrics["neftune_alpha"] == 50.0
    assert attach_neftune(object(), 0.0) is None


def test_neftune_leaves_the_validation_loss_alone(tiny_model_dir):
    from transformers import AutoTokenizer

    from sft_dagster.formatting import encode_frame
    from training_helpers import validation_loss

    model = _embed_model(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    val = encode_frame(tok, examples(5), spec_for(tiny_model_dir))
    before = validation_loss(model, val, 4, tok.pad_token_id, "cpu", "fp32")
    NEFTune(model, alpha=1000.0)
    model.train()  # validation_loss switches to eval itself
    assert validation_loss(model, val, 4, tok.pad_token_id, "cpu", "fp32") == before


def _templated_spec(tiny_model_dir, templates, seed=0) -> PipelineSpec:
    base = spec_for(tiny_model_dir, seed=seed).model_dump(mode="json", exclude={"spec_path"})
    base["task"] = {"type": "sentiment", "labels": LABELS, "prompt_templates": templates}
    return PipelineSpec.model_validate(base)


def test_template_sampling_is_seeded_per_example_and_covers_every_template(tiny_model_dir):
    templates = ["Review: {prompt}", "What is the sentiment of: {prompt}", "{prompt}\nSentiment?"]
    spec = _templated_spec(tiny_model_dir, templates)
    df = examples(90)
    chosen = [t.prompt_template for t in row_tasks(df, spec)]
    assert spec.task.prompt_template == templates[0]  # the main template (validation, evaluation)
    assert chosen == [t.prompt_template for t in row_tasks(df, spec)]  # same seed, same draw
    shuffled = df.sample(frac=1.0, random_state=3)
    assert dict(zip(shuffled["example_id"], (t.prompt_template for t in row_tasks(shuffled, spec)))) == dict(
        zip(df["example_id"], chosen))  # per example, not per position
    counts = pd.Series(chosen).value_counts()
    assert set(counts.index) == set(templates) and counts.min() >= 15  # 90 rows, about 30 each
    other = [t.prompt_template for t in row_tasks(df, _templated_spec(tiny_model_dir, templates, seed=1))]
    assert other != chosen
    assert template_index("x", 0, 3) == template_index("x", 0, 3)


def test_template_variation_trains_on_every_template(tiny_model_dir, tmp_path):
    templates = ["Review: {prompt}", "Sentiment of: {prompt}"]
    spec = _templated_spec(tiny_model_dir, templates)
    _, result = losses(spec, tiny_model_dir, examples(12), examples(3, 50), tmp_path / "t")
    counts = result.metrics["prompt_template_counts"]
    assert sum(counts.values()) == 12 and min(counts.values()) > 0


@pytest.mark.parametrize(("task", "message"), [
    ({"type": "qa", "prompt_templates": ["a {prompt}", "b {prompt}"]}, "for label tasks"),
    ({"type": "sentiment", "labels": LABELS, "prompt_templates": ["a {prompt}"]}, "at least two"),
    ({"type": "sentiment", "labels": LABELS, "prompt_templates": ["a {prompt}", "b"]}, "prompt_templates[1]"),
    ({"type": "sentiment", "labels": LABELS, "prompt_template": "x {prompt}", "prompt_templates": ["a {prompt}", "b {prompt}"]},
     "differ"),
])
def test_bad_template_lists_are_refused(task, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_spec({"name": "t", "task": task, "sources": [{"path": "x.jsonl"}]})


def test_replay_set_never_contains_a_scored_retention_prompt():
    replay, scored = replay_set(), retention_set()
    assert len(replay) >= 200 and not set(replay["prompt"]) & set(scored["prompt"])
    assert replay["response"].str.len().min() > 0


def test_replay_mixing_adds_general_rows_at_the_ratio_rendered_without_the_task_template(tiny_model_dir, tmp_path):
    spec = spec_for(tiny_model_dir, replay={"ratio": 0.5})
    train = examples(10)
    mixed = with_replay(train, spec)
    assert len(mixed) == 15 and int(mixed["replay"].sum()) == 5
    tasks = row_tasks(mixed, spec)
    assert all(t is GENERAL_TASK for t in tasks[10:]) and all(t.prompt_template == "Review: {prompt}" for t in tasks[:10])
    assert with_replay(train, spec_for(tiny_model_dir)) is train  # ratio 0: the split unchanged
    _, result = losses(spec, tiny_model_dir, train, examples(3, 50), tmp_path / "r")
    assert result.metrics["replay_examples_mixed"] == 5


def test_replay_from_a_file_names_the_bad_line(tiny_model_dir, tmp_path):
    path = tmp_path / "general.jsonl"
    path.write_text('{"prompt": "Say hi", "response": "hi"}\n{"prompt": "Say bye"}\n')
    spec = spec_for(tiny_model_dir, replay={"ratio": 1.0, "source": str(path)})
    with pytest.raises(ValueError, match=r"general.jsonl:2"):
        with_replay(examples(4), spec)
