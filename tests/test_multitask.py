"""Multi-task mixing: sampled proportions follow the weights; one adapter trained on the mix."""

from __future__ import annotations

import pandas as pd
import pytest
from test_training import examples, spec_for

from sft_dagster.multitask import TASK_COLUMN, mix_splits, mix_train_rows, mixing_probabilities
from sft_dagster.spec import TaskSpec


def test_proportional_mixing_follows_size_times_weight():
    p = mixing_probabilities({"a": 300, "b": 100}, {"a": 1.0, "b": 1.0})
    assert p == pytest.approx({"a": 0.75, "b": 0.25})
    p = mixing_probabilities({"a": 300, "b": 100}, {"a": 1.0, "b": 3.0})
    assert p == pytest.approx({"a": 0.5, "b": 0.5})
    assert mixing_probabilities({"a": 300, "b": 100}, {"a": 1.0, "b": 0.0}) == pytest.approx({"a": 1.0, "b": 0.0})


def test_temperature_flattens_the_mix_towards_uniform():
    sizes, weights = {"a": 900, "b": 100}, {"a": 1.0, "b": 1.0}
    p2 = mixing_probabilities(sizes, weights, "temperature", 2.0)
    assert p2["b"] == pytest.approx(10 / (30 + 10))  # sqrt(100) / (sqrt(900) + sqrt(100))
    p1 = mixing_probabilities(sizes, weights, "temperature", 1.0)
    assert p1 == pytest.approx(mixing_probabilities(sizes, weights))
    p100 = mixing_probabilities(sizes, weights, "temperature", 100.0)
    assert 0.1 < p2["b"] < p100["b"] < 0.5


def test_sampled_rows_follow_the_probabilities_and_are_seeded():
    train = {"a": pd.DataFrame({"example_id": [f"a{i}" for i in range(400)]}),
             "b": pd.DataFrame({"example_id": [f"b{i}" for i in range(50)]})}
    probabilities = {"a": 0.6, "b": 0.4}
    mixed = mix_train_rows(train, probabilities, seed=0, total=4000)
    share = mixed[TASK_COLUMN].value_counts(normalize=True)
    assert abs(share["b"] - 0.4) < 0.03  # multinomial: sd ~0.008
    b_rows = mixed[mixed[TASK_COLUMN] == "b"]["example_id"].value_counts()
    assert len(b_rows) == 50 and b_rows.max() - b_rows.min() <= 1  # upsampled evenly: every row, then repeats
    assert mixed.equals(mix_train_rows(train, probabilities, seed=0, total=4000))
    assert not mixed.equals(mix_train_rows(train, probabilities, seed=1, total=4000))


def test_mix_splits_keeps_every_tasks_held_out_rows():
    def splits(prefix, n_train, n_test):
        return pd.DataFrame({"example_id": [f"{prefix}{i}" for i in range(n_train + n_test)],
                             "split": ["train"] * n_train + ["test"] * n_test})

    mixed = mix_splits({"a": splits("a", 30, 5), "b": splits("b", 10, 4)}, {"a": 1.0, "b": 1.0}, seed=0)
    test = mixed[mixed["split"] == "test"]
    assert sorted(test["example_id"]) == sorted([f"a{i}" for i in range(30, 35)] + [f"b{i}" for i in range(10, 14)])
    assert (test["example_id"].str[0] == test[TASK_COLUMN]).all()
    assert (mixed["split"] == "train").sum() == 40


def test_one_adapter_trains_on_a_mix_rendering_each_row_with_its_task(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from sft_dagster.training import train
    from sft_dagster.training.augment import row_tasks
    from sft_dagster.formatting import encode_frame

    spec = spec_for(tiny_model_dir, epochs=1)
    tasks = {"sentiment": spec.task,
             "qa": TaskSpec(type="qa", prompt_template="Question: {prompt}", system="Answer briefly.")}
    qa = pd.DataFrame({"example_id": [f"q{i}" for i in range(6)], "prompt": [f"what is {i}" for i in range(6)],
                       "response": [str(i) for i in range(6)], "system": [None] * 6})
    mixed = pd.concat([examples(6).assign(task="sentiment"), qa.assign(task="qa")], ignore_index=True)
    rendered = row_tasks(mixed, spec, tasks)
    assert [t.type for t in rendered] == ["sentiment"] * 6 + ["qa"] * 6
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [tok.decode(e.input_ids) for e in encode_frame(tok, mixed, spec, rendered)]
    assert "Review: the item 0" in texts[0] and "Answer briefly." not in texts[0]
    assert "Answer briefly." in texts[6] and "Question: what is 0" in texts[6]
    result = train(spec, tiny_model_dir, mixed, examples(3, 50).assign(task="sentiment"), tmp_path / "mix",
                   device="cpu", log=lambda _: None, on_metrics=lambda m: None, tasks=tasks)
    assert result.metrics["task_rows"] == {"qa": 6, "sentiment": 6} and result.metrics["steps"] == 3
    with pytest.raises(ValueError, match="unknown tasks"):
        row_tasks(mixed.assign(task="other"), spec, tasks)


def test_multi_task_spec_validation_and_task_pipelines():
    from sft_dagster.spec import SpecError, parse_spec

    extra = {"name": "intents", "weight": 0.5, "task": {"type": "classification", "labels": ["a", "b"]},
             "sources": [{"path": "b.jsonl"}], "quality": {"suite": "default"}}
    base = {"name": "mix", "task": {"type": "sentiment", "labels": ["neg", "pos"]}, "sources": [{"path": "a.jsonl"}],
            "quality": {"suite": "sentiment"}, "splits": {"test": 0.3}}
    spec = parse_spec(base | {"tasks": [extra], "mixing": {"strategy": "temperature", "weight": 2.0}})
    sub = spec.task_pipeline("intents")
    assert sub.name == "mix__intents" and sub.task.labels == ["a", "b"] and sub.sources[0].path == "b.jsonl"
    assert sub.quality.suite == "default" and sub.splits.test == 0.3 and sub.tasks == []  # own quality, shared splits
    assert spec.task_pipeline("main") is spec and spec.mixing_weights() == {"main": 2.0, "intents": 0.5}
    assert set(spec.task_specs()) == {"main", "intents"}
    for bad, message in [({"tasks": [extra, extra]}, "unique"), ({"tasks": [extra | {"name": "main"}]}, "other than"),
                         ({"tasks": [extra], "training": {"launcher": "subprocess"}}, "in process")]:
        with pytest.raises(SpecError, match=message):
            parse_spec(base | bad)
    single = parse_spec(base)
    assert single.tasks == [] and single.task_specs() == {"main": single.task}
