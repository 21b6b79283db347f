"""Too few rows to train: the few-shot prompt as the model, scored, gated and promoted like an adapter."""

from __future__ import annotations

import json
import re

import dagster as dg
import pandas as pd
import pytest
from test_pipeline_dagster import (
    ROOT,
    check_results,
    materialized,
    metadata,
    run,
    write_spec,
)

from sft_dagster import prompt_model
from sft_dagster.cli import run_summary, stage_names
from sft_dagster.defs import build_definitions
from sft_dagster.demo_data import generate_demo_dataset
from sft_dagster.evaluation import (
    _without_context,
    encode_example,
    evaluate,
    render_markdown,
    with_few_shot,
)
from sft_dagster.formatting import build_messages, generation_prompt_ids
from sft_dagster.registry import champion, promote
from sft_dagster.spec import PipelineSpec, load_spec

LABELS = ["negative", "neutral", "positive"]
BASE = {"source": "tiny", "model_hash": "m1", "tokenizer_hash": "t1"}


def small_spec(**training) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "p", "task": {"type": "sentiment", "labels": LABELS, "prompt_template": "Sentiment of: {prompt}",
                              "system": "Answer with one word."},
        "sources": [{"path": "x"}], "model": {"max_length": 128},
        "training": {"min_rows_to_train": 50} | training,
        "evaluation": {"few_shot_k": 3, "max_new_tokens": 2, "num_samples": 4, "retention_examples": 6},
    })


def rows(n: int, offset: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"example_id": [f"e{i:03d}" for i in range(offset, offset + n)],
                         "prompt": [f"item {i} was fine" for i in range(offset, offset + n)],
                         "response": [LABELS[i % 3] for i in range(offset, offset + n)], "system": [None] * n})


def test_threshold_decides_whether_to_prompt():
    assert prompt_model.applies(small_spec(), 49) and not prompt_model.applies(small_spec(), 50)
    assert not prompt_model.applies(small_spec(min_rows_to_train=None), 0)


def test_lineage_changes_with_an_example_or_the_base_model_and_only_then():
    spec, train = small_spec(), rows(12)
    prompt = prompt_model.build_prompt(spec, train, BASE)
    lineage = prompt_model.lineage(prompt, "c1")
    ids = lineage["example_ids"]
    assert len(ids) == 3 and {e["response"] for e in prompt["examples"]} == set(LABELS)  # the report's k-shot draw
    assert prompt_model.lineage(prompt_model.build_prompt(spec, train.copy(), BASE), "c1") == lineage

    one_example = train.assign(prompt=train["prompt"].where(train["example_id"] != ids[1], "an edited example"))
    edited = prompt_model.lineage(prompt_model.build_prompt(spec, one_example, BASE), "c1")
    assert edited["example_ids"] == ids and edited["prompt_hash"] != lineage["prompt_hash"]

    unused = train[~train["example_id"].isin(ids)]["example_id"].iloc[0]
    other_row = train.assign(prompt=train["prompt"].where(train["example_id"] != unused, "edited, not an example"))
    assert prompt_model.lineage(prompt_model.build_prompt(spec, other_row, BASE), "c1") == lineage

    other_base = prompt_model.lineage(prompt_model.build_prompt(spec, train, BASE | {"model_hash": "m2"}), "c1")
    assert other_base["prompt_hash"] != lineage["prompt_hash"] and other_base["base_model_hash"] == "m2"
    reseeded = small_spec().model_copy(update={"evaluation": spec.evaluation.model_copy(update={"few_shot_seed": 5})})
    assert prompt_model.lineage(prompt_model.build_prompt(reseeded, train, BASE), "c1")["example_ids"] != ids


def test_an_empty_train_split_is_no_prompt():
    with pytest.raises(prompt_model.PromptModelError, match="no rows"):
        prompt_model.build_prompt(small_spec(), rows(0), BASE)


def test_loss_of_a_prompted_row_is_over_its_own_reply_only(tiny_model_dir):
    from transformers import AutoTokenizer

    spec, tokenizer = small_spec(), AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = prompt_model.build_prompt(spec, rows(12), BASE)
    task_spec, prompted = prompt_model.prompted(spec, rows(1, 100), prompt)
    row = prompted.iloc[0]
    messages = build_messages(row.prompt, row.response, row.system, task_spec.task, row.history)
    plain = encode_example(tokenizer, build_messages(row.prompt, row.response, row.system, task_spec.task), 128)
    with_examples = encode_example(tokenizer, messages, 10**6)
    assert with_examples.n_loss_tokens > plain.n_loss_tokens  # every example's reply would carry loss
    scored = _without_context(tokenizer, messages, 2 * prompt["k"], 128)
    assert [t for t in scored.labels if t != -100] == [t for t in plain.labels if t != -100]


def reference_loss(model_dir, prompt: dict, test: pd.DataFrame) -> float:
    """Mean cross-entropy of the test replies (and their end-of-turn token) after the prompt's system
    text, its examples and the row's own user turn, computed here with the model and the chat template
    directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    turns = [{"role": "system", "content": prompt["system"]}]
    for example in prompt["examples"]:
        turns += [{"role": "user", "content": prompt["template"].format(prompt=example["prompt"])},
                  {"role": "assistant", "content": example["response"]}]
    total, count = 0.0, 0
    for row in test.itertuples():
        user = {"role": "user", "content": prompt["template"].format(prompt=row.prompt)}
        context = tokenizer.apply_chat_template(turns + [user], add_generation_prompt=True)
        context = list(context["input_ids"] if hasattr(context, "keys") else context)
        reply = tokenizer(row.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([context + reply])).logits[0, len(context) - 1 : -1]
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(reply), reduction="sum"))
        count += len(reply)
    return total / count


def test_a_prompt_model_is_scored_as_the_base_model_with_its_examples(tiny_model_dir, tmp_path, monkeypatch):
    from sft_dagster import evaluation

    spec, train, test = small_spec(), rows(12), rows(6, 100)
    prompt = prompt_model.build_prompt(spec, train, BASE)
    folder = prompt_model.write(tmp_path / "run", prompt)
    histories = []
    real_generate = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda model, tokenizer, df, *a, **kw: (
        histories.append(list(df["history"]) if "history" in df else None), real_generate(model, tokenizer, df, *a, **kw))[1])
    report = evaluate(spec, tiny_model_dir, folder, test, device="cpu", method=prompt_model.METHOD,
                      adapter_id="p1", cache_dir=tmp_path / "scores", train=train)
    # Generation: the k-shot baseline and the candidate, and only they, answer after the prompt's examples.
    prompted = list(with_few_shot(test, pd.DataFrame(prompt["examples"]), spec.task)["history"])
    assert report["prompt_models"]["tuned"]["example_ids"] == report["few_shot"]["example_ids"]
    # (the base model's zero-shot rows and retention generate in the one pass with their loss, not through
    # `generate`; the prompted rows take `generate`, one generation per distinct prompt)
    assert sum(h == prompted for h in histories) == 2 and len(histories) == 2  # k-shot, candidate
    # Loss: over the test replies only, after the examples; not the zero-shot loss.
    expected = reference_loss(tiny_model_dir, prompt, test.sort_values("example_id"))
    assert report["tuned"]["loss"] == pytest.approx(expected, rel=1e-4)
    assert abs(report["base"]["loss"] - expected) > 1e-3
    # Its weights are the base model's: its retention is the base model's, not scored a second time.
    assert report["retention"]["models"]["tuned"]["nll_change"] == 0.0
    assert len(list((tmp_path / "scores").glob("*.json"))) == 4  # base test, base few-shot, base retention, candidate test
    markdown = render_markdown(report)
    assert "The candidate is a few-shot prompt, not a fine-tune" in markdown and "candidate (3-shot prompt)" in markdown
    assert report["candidate_method"] == "few_shot"


def test_registry_entry_holds_the_prompt_and_a_card_whose_code_prompts_as_evaluated(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    from transformers import AutoTokenizer

    spec, train = small_spec(), rows(12)
    prompt = prompt_model.build_prompt(spec, train, BASE)
    folder = prompt_model.write(tmp_path / "run", prompt)
    lineage = prompt_model.lineage(prompt, "c1")
    report = {"task": "sentiment", "n_test": 4, "primary_metric": "accuracy", "base": {"accuracy": 0.25},
              "tuned": {"accuracy": 0.5}}
    registry = tmp_path / "registry" / "p"
    version = promote(folder, registry, report, lineage, {"promote": True, "reason": "beats the base model"})
    assert json.loads((version / prompt_model.PROMPT_FILE).read_text()) == prompt
    assert json.loads((version / "lineage.json").read_text()) == lineage
    assert {"evaluation.json", "promotion.json", "MODEL_CARD.md"} <= {p.name for p in version.iterdir()}
    current = champion(registry)
    assert current["method"] == "few_shot" and current["base_model_hash"] == "m1"

    card = (version / "MODEL_CARD.md").read_text()
    assert "PeftModel" not in card and "A few-shot prompt of `tiny`" in card and "m1" in card
    code = re.search(r"## Use\n\n```python\n(.*?)```", card, re.DOTALL).group(1)
    monkeypatch.chdir(registry.parent)
    scope = {"BASE_MODEL_DIR": str(tiny_model_dir), "TEXT": "item 7 was fine"}
    exec(code, scope)  # noqa: S102  (the card's own code, run as a reader would)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    served = with_few_shot(pd.DataFrame({"prompt": ["item 7 was fine"], "system": [None]}),
                           pd.DataFrame(prompt["examples"]), spec.task)
    scored_ids = generation_prompt_ids(tokenizer, "item 7 was fine", None, spec.task, served["history"][0])
    assert scope["inputs"]["input_ids"][0].tolist() == scored_ids and isinstance(scope["reply"], str)


@pytest.fixture()
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def few_rows(data) -> None:
    """A task with few labelled rows: the demo data at 45 rows, without its fixed handful of broken rows
    (at this size they are more than the suite's `mostly` allows, and would stop the run before training)."""
    generate_demo_dataset(data, n_rows=45, seed=1, error_rate=0.05)
    jsonl = next(data.glob("*.jsonl"))
    keep = []
    for line in jsonl.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("label") in LABELS and row["text"].strip() and "<|" not in row["text"]:
            keep.append(line)
    jsonl.write_text("\n".join(keep) + "\n")


def pipeline(tmp_path, tiny_model_dir, **overrides):
    if not (tmp_path / "data").exists():
        few_rows(tmp_path / "data")
    settings = {"promotion.metric": "accuracy", "evaluation.retention_examples": 0}  # retention: not this test's
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, **settings | overrides))
    return spec, build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")


MODEL_STAGES = ["fine_tuned_adapter", "evaluation_report", "promoted_model"]


def report_of(tmp_path, spec) -> dict:
    return json.loads((tmp_path / "store" / spec.name / "reports" / "evaluation.json").read_text())


def gate_says(report: dict, min_improvement: float) -> bool:
    """The gate's decision recomputed from the report's own numbers (accuracy, the primary metric)."""
    reference = report["champion"] or report["base"]
    return report["tuned"]["accuracy"] - reference["accuracy"] >= min_improvement - 1e-12


def test_few_rows_promote_a_prompt_model_through_the_gates_and_a_trained_model_is_compared_with_it(
        tmp_path, tiny_model_dir, instance):
    registry = tmp_path / "store" / "registry" / "tiny_sentiment"
    # 1. Fewer train rows than the threshold: no training, a prompt model, scored and gated like an adapter.
    spec, defs = pipeline(tmp_path, tiny_model_dir, **{"training.min_rows_to_train": 1000,
                                                       "promotion.min_improvement": -1.0})
    first = run(defs, spec, instance)
    assert first.success, [e.message for e in first.all_events if e.is_failure]
    adapter = metadata(instance, spec, "fine_tuned_adapter")
    assert adapter["method"] == "few_shot" and adapter["skipped_training"] is False and "loss" not in adapter
    splits = pd.read_parquet(tmp_path / "store" / spec.name / "tables" / "dataset_splits.parquet")
    train_ids = set(splits[splits["split"] == "train"]["example_id"])
    assert adapter["train_rows"] == len(train_ids) < 1000
    run_dir = tmp_path / "store" / spec.name / "training" / adapter["lineage_hash"]
    prompt = prompt_model.read(run_dir / "prompt")
    assert prompt["k"] == 2 and {e["example_id"] for e in prompt["examples"]} <= train_ids
    report = report_of(tmp_path, spec)
    assert report["candidate_method"] == "few_shot" and report["prompt_models"]["tuned"]["k"] == 2
    assert check_results(first)["evaluation_report:beats_champion"] is gate_says(report, -1.0) is True
    version = registry / "v1"
    assert "promoted_model" in materialized(first) and (version / "prompt.json").exists()
    assert json.loads((version / "prompt.json").read_text())["base_model"]["model_hash"] == \
        metadata(instance, spec, "base_model")["model_hash"]
    assert not list(version.glob("adapter_model*")) and champion(registry)["method"] == "few_shot"
    # The CLI's run summary names the artefact for what it is.
    assert artefacts(instance, spec, defs, first) == {"prompt_model": str(run_dir / "prompt")}

    # Unchanged inputs: the prompt model is kept, like a completed training run.
    again = run(defs, spec, instance, ["fine_tuned_adapter"])
    assert again.success and metadata(instance, spec, "fine_tuned_adapter")["skipped_training"] is True
    assert metadata(instance, spec, "fine_tuned_adapter")["lineage_hash"] == adapter["lineage_hash"]

    # 2. Other examples (another seed): a new lineage, compared with the prompt champion v1 scored the same way.
    spec, defs = pipeline(tmp_path, tiny_model_dir, **{"training.min_rows_to_train": 1000,
                                                       "evaluation.few_shot_seed": 4, "promotion.min_improvement": 0.5})
    second = run(defs, spec, instance, MODEL_STAGES)  # the data stages are unchanged since the first run
    assert metadata(instance, spec, "fine_tuned_adapter")["lineage_hash"] != adapter["lineage_hash"]
    report2 = report_of(tmp_path, spec)
    assert report2["champion_version"] == "v1" and report2["champion_method"] == "few_shot"
    assert report2["champion"] == report["tuned"]  # the champion's scores are the ones it had as the candidate
    assert check_results(second)["evaluation_report:beats_champion"] is gate_says(report2, 0.5) is False
    assert "promoted_model" not in materialized(second) and champion(registry)["version"] == "v1"

    # 3. Enough rows (threshold below the train split): it trains as before and is scored against prompt v1.
    spec, defs = pipeline(tmp_path, tiny_model_dir, **{"training.min_rows_to_train": 2, "promotion.min_improvement": -1.0,
                                                       "training.max_steps": 2, "training.precision": "fp32"})
    third = run(defs, spec, instance, MODEL_STAGES)
    assert third.success, [e.message for e in third.all_events if e.is_failure]
    trained = metadata(instance, spec, "fine_tuned_adapter")
    assert trained["method"] == "lora" and trained["train_loss"] > 0
    report3 = report_of(tmp_path, spec)
    assert report3["candidate_method"] == "lora" and report3["champion_method"] == "few_shot"
    assert report3["prompt_models"] == {"champion": report["prompt_models"]["tuned"]}
    assert report3["champion"]["accuracy"] == report["tuned"]["accuracy"]
    assert check_results(third)["evaluation_report:beats_champion"] is gate_says(report3, -1.0) is True
    assert (registry / "v2" / "adapter_config.json").exists() and champion(registry)["method"] == "lora"
    assert "PeftModel" in (registry / "v2" / "MODEL_CARD.md").read_text()
    assert artefacts(instance, spec, defs, third) == {"adapter": trained["adapter_dir"]}


def artefacts(instance, spec, defs, result) -> dict:
    """The model artefact the CLI's run summary lists (`adapter` or `prompt_model`)."""
    summary = run_summary(instance, spec, result.run_id, defs.resolve_asset_graph(),
                          stage_names(defs.resolve_job_def(f"{spec.name}_job")))
    return {k: v for k, v in summary["artefacts"].items() if k in ("adapter", "prompt_model")}
