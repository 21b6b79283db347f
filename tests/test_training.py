"""The trainer on the tiny model: invariance, early stopping, full fine-tune, refusal, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_model import build_tiny_model

from sft_dagster.spec import PipelineSpec
from sft_dagster.training import latest_checkpoint, train

LABELS = ["negative", "neutral", "positive"]


def spec_for(model_dir: Path, **training) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "t",
        "task": {"type": "sentiment", "labels": LABELS, "prompt_template": "Review: {prompt}"},
        "sources": [{"path": "unused.jsonl"}],
        "model": {"base": str(model_dir), "max_length": 128},
        # fp32 unless a test asks: `auto` measures the machine, and the tolerances below are fp32's.
        "training": {"learning_rate": 1e-3, "batch_size": 4, "epochs": 2, "warmup_ratio": 0.0, "precision": "fp32",
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.0}} | training,
    })


def examples(n: int, offset: int = 0) -> pd.DataFrame:
    words = {"negative": "awful broken", "neutral": "okay average", "positive": "great lovely"}
    rows = [(f"id{i}", f"the item {i} is {words[LABELS[i % 3]]}" + " really" * (i % 4), LABELS[i % 3])
            for i in range(offset, offset + n)]
    return pd.DataFrame({"example_id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                         "response": [r[2] for r in rows], "system": [None] * n})


def encoded_examples(model_dir: Path, n: int):
    """(spec, tokenizer, the first n `examples` encoded with the spec's template) for the tiny model."""
    from transformers import AutoTokenizer

    from sft_dagster.formatting import build_messages, encode_example

    spec = spec_for(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = examples(n)
    return spec, tokenizer, [encode_example(tokenizer, build_messages(p, r, None, spec.task), 128)
                             for p, r in zip(rows["prompt"], rows["response"])]


def losses(spec, model_dir, train_df, val_df, out, device="cpu"):
    history = []
    result = train(spec, model_dir, train_df, val_df, out, device=device, log=lambda _: None,
                   on_metrics=lambda m: history.append(m["train_loss"]))
    return history, result


# bf16 (frozen base stored in bf16, adapters and optimizer in fp32): the same invariances up to bf16
# rounding, at a learning rate that moves the loss by ~45x the tolerance (measured deviations on the
# tiny model: fp32 < 3e-6, bf16 < 1e-4 relative).
@pytest.mark.parametrize(("precision", "learning_rate", "rtol"), [("fp32", 1e-3, 1e-4), ("bf16", 1e-2, 5e-4)])
def test_batch_8x1_equals_batch_1x8(tiny_model_dir, tmp_path, precision, learning_rate, rtol):
    data = examples(8)
    common = {"epochs": 4, "precision": precision, "learning_rate": learning_rate}
    a, _ = losses(spec_for(tiny_model_dir, batch_size=8, gradient_accumulation_steps=1, **common), tiny_model_dir,
                  data, examples(3, 50), tmp_path / "a")
    b, _ = losses(spec_for(tiny_model_dir, batch_size=1, gradient_accumulation_steps=8, **common), tiny_model_dir,
                  data, examples(3, 50), tmp_path / "b")
    c, _ = losses(spec_for(tiny_model_dir, batch_size=8, gradient_accumulation_steps=1, max_tokens_per_micro_batch=16,
                           **common), tiny_model_dir, data, examples(3, 50), tmp_path / "c")
    d, _ = losses(spec_for(tiny_model_dir, batch_size=8, gradient_accumulation_steps=1, packing=True, **common),
                  tiny_model_dir, data, examples(3, 50), tmp_path / "d")
    assert len(a) == len(b) == len(c) == len(d) == 4
    # Packing the batch into one padding-free row: same trajectory.
    assert torch.allclose(torch.tensor(a), torch.tensor(d), rtol=rtol, atol=1e-5), (a, d)
    # A token budget that splits every batch into single rows changes memory, not the trajectory.
    assert torch.allclose(torch.tensor(a), torch.tensor(c), rtol=rtol, atol=1e-5), (a, c)
    # Loss normalised by the loss tokens of the whole window: same trajectory up to float rounding.
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=rtol, atol=1e-5), (a, b)
    assert a[-1] < a[0]
    if precision == "bf16":
        assert a[0] - a[-1] > 20 * rtol * a[0]  # the tolerance is small against what training moves


def test_bf16_lora_keeps_the_base_in_bf16_and_follows_the_fp32_trajectory(tiny_model_dir, tmp_path):
    from sft_dagster.training.methods.sft import load_model

    model = load_model(spec_for(tiny_model_dir, precision="bf16"), tiny_model_dir, "cpu", "bf16")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    fp32_model = load_model(spec_for(tiny_model_dir), tiny_model_dir, "cpu", "fp32")
    assert {p.dtype for p in fp32_model.parameters()} == {torch.float32}

    common = {"epochs": 6, "learning_rate": 1e-2, "batch_size": 8, "checkpoint_every_steps": 3}
    ref, ref_result = losses(spec_for(tiny_model_dir, precision="fp32", **common), tiny_model_dir, examples(8),
                             examples(3, 50), tmp_path / "fp32")
    got, result = losses(spec_for(tiny_model_dir, precision="bf16", **common), tiny_model_dir, examples(8),
                         examples(3, 50), tmp_path / "bf16")
    assert result.metrics["precision"] == "bf16" and len(got) == len(ref) == 6
    assert ref[0] - ref[-1] > 0.1  # training moves the loss far more than the tolerance below
    # bf16 follows the fp32 trajectory (measured: within 1e-4 relative, 0.4% of the loss decrease).
    assert torch.allclose(torch.tensor(got), torch.tensor(ref), rtol=5e-4), (got, ref)
    assert abs(result.metrics["val_loss"] - ref_result.metrics["val_loss"]) < 5e-4 * ref_result.metrics["val_loss"]
    # The optimizer state is fp32 (it follows the adapters), as are the saved adapters.
    last = max((tmp_path / "bf16" / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    saved = torch.load(last / "state.pt", weights_only=True)
    moments = [t for state in saved["optimizer"]["state"].values() for k, t in state.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(result.adapter_dir / "adapter_model.safetensors").values()} == {torch.float32}


def test_bf16_resume_equals_a_straight_run(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    spec = spec_for(tiny_model_dir, precision="bf16", epochs=3, checkpoint_every_steps=3, learning_rate=1e-2,
                    lora={"r": 4, "alpha": 8, "dropout": 0.1})
    stopped = train(spec, tiny_model_dir, examples(16), examples(4, 50), tmp_path / "r", device="cpu",
                    log=lambda _: None, stop_after_steps=4)
    assert stopped.metrics["step"] == 4
    resumed = train(spec, tiny_model_dir, examples(16), examples(4, 50), tmp_path / "r", device="cpu", log=lambda _: None)
    assert resumed.metrics["resumed_from_step"] == 3 and resumed.metrics["steps"] == 12
    straight = train(spec, tiny_model_dir, examples(16), examples(4, 50), tmp_path / "s", device="cpu", log=lambda _: None)
    a = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    b = load_file(straight.adapter_dir / "adapter_model.safetensors")
    for key in a:  # bf16 kernels are deterministic on CPU: the resumed run is the straight run
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_auto_precision_is_measured_once_per_machine_and_reported(tiny_model_dir, tmp_path):
    from sft_dagster.training import preflight
    from sft_dagster.training.precision import CACHE_FILE

    spec = spec_for(tiny_model_dir, precision="auto", epochs=1)
    cache = tmp_path / "probes"
    first = preflight(spec, tiny_model_dir, examples(8), device="cpu", probe_cache=cache)
    choice = first["precision_choice"]
    assert first["precision"] == choice["precision"] in ("fp32", "bf16") and choice["cached"] is False
    assert first["precision_reason"] == choice["reason"]
    rates = choice["measured"]["matmul_gflops"]
    assert rates["fp32"] > 0 and rates["bf16"] > 0
    if rates["bf16"] > rates["fp32"]:  # the step was timed in both precisions and decided the choice
        steps = choice["measured"]["step"]
        assert steps["fp32"]["tokens"] == steps["bf16"]["tokens"] > 0
    else:
        assert choice["precision"] == "fp32" and "step" not in choice["measured"]
    entries = json.loads((cache / CACHE_FILE).read_text())
    assert len(entries) == 1
    (entry,) = entries.values()
    assert entry["key"]["method"] == "lora" and entry["key"]["hidden_size"] == 32 and entry["key"]["torch"]
    assert entry["precision"] == choice["precision"]

    # Training (and any later run on this machine) reads the measurement instead of repeating it.
    result = train(spec, tiny_model_dir, examples(8), examples(3, 50), tmp_path / "run", device="cpu",
                   log=lambda _: None, probe_cache=cache)
    assert result.metrics["precision"] == choice["precision"] and result.metrics["precision_choice"]["cached"] is True
    again = preflight(spec, tiny_model_dir, examples(8), device="cpu", probe_cache=cache)
    assert again["precision_choice"] == {**choice, "cached": True}
    # Another method is another measurement.
    preflight(spec_for(tiny_model_dir, precision="auto", method="full"), tiny_model_dir, examples(8), device="cpu",
              probe_cache=cache)
    assert len(json.loads((cache / CACHE_FILE).read_text())) == 2


def test_precision_decision_takes_the_faster_only_when_the_loss_matches():
    from sft_dagster.training.precision import decide

    fp32 = {"seconds": 2.0, "loss": 3.000}
    assert decide(fp32, {"seconds": 1.0, "loss": 3.010})[0] == "bf16"
    assert decide(fp32, {"seconds": 2.5, "loss": 3.000})[0] == "fp32"  # slower
    choice, reason = decide(fp32, {"seconds": 1.0, "loss": 3.100})  # faster, but 3.3% off
    assert choice == "fp32" and "3.33%" in reason


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sft_dagster.torchkit import collate, collate_packed, summed_response_loss

    _, tokenizer, encoded = encoded_examples(tiny_model_dir, 3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        packed = collate_packed(encoded, "cpu")
        # As the trainer calls it: without a KV cache (transformers only honours packed position ids then).
        hidden = model.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                             use_cache=False).last_hidden_state[0]
        start = 0
        for e in encoded:
            alone = model.model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0]
            # Each example's states in the packed row equal its states alone: nothing leaks across.
            assert torch.allclose(hidden[start : start + len(e.input_ids)], alone, atol=1e-5)
            start += len(e.input_ids)
        packed_loss, packed_n = summed_response_loss(model, packed)
        padded_loss, padded_n = summed_response_loss(model, collate(encoded, tokenizer.pad_token_id, "cpu"))
    assert packed_n == padded_n == sum(e.n_loss_tokens for e in encoded)
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5)


def test_shared_prefix_rows_give_the_loss_and_gradients_of_one_row_per_example(tiny_model_dir):
    """The tokens a micro-batch's examples share (system turn, template) computed once: the same loss
    and the same gradient for every weight as one padded row per example, in fewer tokens; rows are
    split to stay under the row limit; the SFT method uses them unless NEFTune (per-example noise) is on."""
    import copy

    from transformers import AutoModelForCausalLM

    from sft_dagster.training.methods.sft import SFTMethod
    from sft_dagster.torchkit import (
        collate,
        collate_shared_prefix,
        common_prefix_length,
        shared_prefix_rows,
        shared_row_length,
        summed_response_loss,
    )
    from sft_dagster.training.methods.sft import probe_batch

    spec, tokenizer, encoded = encoded_examples(tiny_model_dir, 6)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    shared = common_prefix_length([e.input_ids for e in encoded])
    assert shared > 5  # the template's tokens before the review text
    assert [len(r) for r in shared_prefix_rows(encoded)] == [6]
    split = shared_prefix_rows(encoded, max_row=shared + 30)  # about two examples' own tokens a row
    assert len(split) > 1 and sorted(e.input_ids for r in split for e in r) == sorted(e.input_ids for e in encoded)

    def loss_and_gradients(net, batch):
        net.zero_grad()
        loss, n = summed_response_loss(net, batch)
        loss.backward()
        return float(loss.detach()), n, {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    plain = collate(encoded, tokenizer.pad_token_id, "cpu")
    want, want_n, want_grads = loss_and_gradients(model, plain)
    assert want_n == sum(e.n_loss_tokens for e in encoded)
    for layout in ([encoded], split):
        batch = collate_shared_prefix(layout, tokenizer.pad_token_id, "cpu")
        computed = sum(shared_row_length([e.input_ids for e in row]) for row in layout)
        assert computed < sum(len(e.input_ids) for e in encoded)
        got, n, grads = loss_and_gradients(model, batch)
        assert n == want_n and got == pytest.approx(want, rel=1e-5)
        assert grads.keys() == want_grads.keys()
        for key in grads:
            assert torch.allclose(grads[key], want_grads[key], rtol=1e-4, atol=1e-6), key
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        assert float(summed_response_loss(eager, collate_shared_prefix([encoded], tokenizer.pad_token_id, "cpu"))[0]) \
            == pytest.approx(want, rel=1e-5)

    method = SFTMethod(spec)
    method.load_model(tiny_model_dir, "cpu", "fp32")
    assert "token_index" in method.collate(encoded, tokenizer.pad_token_id, "cpu")
    noisy = SFTMethod(spec_for(tiny_model_dir, neftune_alpha=5.0))
    noisy.load_model(tiny_model_dir, "cpu", "fp32")
    assert "token_index" not in noisy.collate(encoded, tokenizer.pad_token_id, "cpu")
    # The pre-flight's timed step (duration estimate, precision probe) is collated the way training is.
    probe, tokens = probe_batch(encoded, spec, tokenizer.pad_token_id, "cpu")
    sample = sorted(encoded, key=lambda e: len(e.input_ids))[3:][: spec.training.batch_size]
    assert "token_index" in probe and tokens == sum(len(e.input_ids) for e in sample)
    assert "token_index" not in probe_batch(encoded, noisy.spec, tokenizer.pad_token_id, "cpu")[0]


def test_multi_turn_chats_train_on_the_whole_conversation(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from sft_dagster.formatting import build_messages, encode_example

    data = examples(4)
    data["history"] = [None, json.dumps([{"role": "user", "content": "Review: fine"}, {"role": "assistant", "content": "neutral"}]),
                       None, json.dumps([{"role": "user", "content": "Review: bad"}, {"role": "assistant", "content": "negative"}])]
    spec = spec_for(tiny_model_dir, epochs=1, batch_size=4)
    _, result = losses(spec, tiny_model_dir, data, examples(2, 50), tmp_path / "chat")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = [encode_example(tokenizer, build_messages(r.prompt, r.response, None, spec.task, r.history), 128)
               for r in data.itertuples()]
    assert result.metrics["trained_tokens"] == sum(len(e.input_ids) for e in encoded)
    assert [e.n_loss_tokens > 0 for e in encoded] == [True] * 4
    assert encoded[1].n_loss_tokens > encoded[0].n_loss_tokens  # both assistant turns carry loss


def test_gradient_checkpointing_changes_memory_not_the_trajectory(tiny_model_dir, tmp_path):
    # With dropout on: recomputed forward passes must draw the same dropout masks.
    lora = {"r": 4, "alpha": 8, "dropout": 0.1}
    a, _ = losses(spec_for(tiny_model_dir, epochs=2, lora=lora), tiny_model_dir, examples(8), examples(3, 50), tmp_path / "a")
    b, _ = losses(spec_for(tiny_model_dir, epochs=2, lora=lora, gradient_checkpointing=True), tiny_model_dir,
                  examples(8), examples(3, 50), tmp_path / "b")
    assert len(a) == len(b) == 4
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5), (a, b)
    from sft_dagster.training.methods.sft import load_model

    spec = spec_for(tiny_model_dir, lora=lora, gradient_checkpointing=True)
    assert load_model(spec, tiny_model_dir, "cpu").get_base_model().is_gradient_checkpointing


def test_heap_is_trimmed_when_it_reaches_a_new_high_not_after_every_step():
    from sft_dagster.torchkit import HeapReleaser

    readings = iter([1000, 1050, 1100, 1099, 1300, 1200, 1420, 1431])
    trims = []
    heap = HeapReleaser(growth=0.1, rss=lambda: next(readings), release=lambda: trims.append(1))
    decisions = [heap.after_step() for _ in range(8)]
    # the first reading; 1100 is not above 1000 * 1.1, 1300 is; 1420 is not above 1300 * 1.1, 1431 is
    assert decisions == [True, False, False, False, True, False, False, True]
    assert len(trims) == heap.trims == 3 and heap.high == 1431
    assert not HeapReleaser(rss=lambda: None, release=lambda: trims.append(1)).after_step()


def test_resident_bytes_follow_touched_memory():
    from sft_dagster.torchkit import resident_bytes

    before = resident_bytes()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, written
    grown = resident_bytes() - before
    assert 56 << 20 <= grown <= 96 << 20, grown
    del block


def test_cpu_training_does_not_trim_the_heap_after_every_step(tiny_model_dir, tmp_path, monkeypatch):
    """Trimming returns the freed activations the next step would reuse (page faults: 11-14% of a
    SmolLM2 step, `HeapReleaser`); training trims when the heap reaches a new high and once at the end."""
    from sft_dagster import torchkit

    trims = []

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad)

    monkeypatch.setattr(torchkit, "_libc", lambda: Libc())
    history, result = losses(spec_for(tiny_model_dir, epochs=6), tiny_model_dir, examples(8), examples(3, 50),
                             tmp_path / "run")
    assert len(history) == result.metrics["steps"] == 12
    assert 2 <= len(trims) <= 5, trims  # load, first step, the end: not one per step


def test_lora_adapter_is_standard_peft_and_learns(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    history, result = losses(spec_for(tiny_model_dir, epochs=3, learning_rate=5e-3), tiny_model_dir, examples(24),
                             examples(6, 100), tmp_path / "run")
    assert (result.adapter_dir / "adapter_config.json").exists()
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == result.metrics["trainable_parameters"]
    assert result.metrics["val_loss"] < result.metrics["val_loss_history"][0]["val_loss"] or len(result.metrics["val_loss_history"]) == 1
    assert history[-1] < history[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == result.metrics["steps"] == 18


def test_merged_export_equals_adapter_outputs(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_dagster.training import merge_adapter

    _, result = losses(spec_for(tiny_model_dir, epochs=1, learning_rate=1e-2), tiny_model_dir, examples(8),
                       examples(3, 50), tmp_path / "m")
    merged_dir = merge_adapter(tiny_model_dir, result.adapter_dir, tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "model.safetensors").exists()
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4) and not torch.allclose(merged, base, atol=1e-4)


def test_full_fine_tune_saves_a_whole_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    _, result = losses(spec_for(tiny_model_dir, method="full", epochs=1), tiny_model_dir, examples(8), examples(3, 50),
                       tmp_path / "full")
    assert result.adapter_dir.name == "model"
    tuned = AutoModelForCausalLM.from_pretrained(result.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert result.metrics["trainable_parameters"] == sum(p.numel() for p in base.parameters())


def test_early_stopping_keeps_best_weights(tiny_model_dir, tmp_path):
    spec = spec_for(tiny_model_dir, learning_rate=0.5, epochs=10, eval_every_steps=1, early_stopping_patience=1,
                    max_grad_norm=100.0, lr_scheduler="constant")
    _, result = losses(spec, tiny_model_dir, examples(8), examples(6, 50), tmp_path / "es")
    assert result.metrics["early_stopped"] is True
    assert result.metrics["steps"] < result.metrics["optimizer_steps_planned"]
    history = [h["val_loss"] for h in result.metrics["val_loss_history"]]
    assert result.metrics["val_loss"] == min(history)


def test_rows_that_would_be_truncated_are_refused(tiny_model_dir, tmp_path):
    data = examples(4)
    data.loc[2, "prompt"] = "very long " * 200
    with pytest.raises(ValueError, match=r"would be truncated.*id2"):
        train(spec_for(tiny_model_dir), tiny_model_dir, data, examples(2, 50), tmp_path / "x", device="cpu")


def test_qlora_trains_adapters_over_a_4bit_base_on_cpu(tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_dagster.training.methods.sft import load_model

    # bitsandbytes' CPU kernels quantise in blocks of 64 input features (SmolLM2: 576 and 1536).
    tiny_model_dir = build_tiny_model(tmp_path / "tiny64", hidden_size=64)
    spec = spec_for(tiny_model_dir, method="qlora", epochs=6, learning_rate=1e-2)
    model = load_model(spec, tiny_model_dir, "cpu")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every linear layer of both decoder layers is 4-bit NF4
    assert quantized[0].weight.quant_type == "nf4"
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    history, result = losses(spec, tiny_model_dir, examples(8), examples(3, 50), tmp_path / "q")
    assert sum(history[-4:]) / 4 < history[0] - 0.25, history  # it learns
    assert result.metrics["method"] == "qlora"
    # A standard peft adapter: it loads on the full-precision base too (how it is evaluated and merged).
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    assert any("lora_A" in n for n, _ in tuned.named_parameters())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_qlora_gradients_after_validation_equal_the_dequantized_base(tmp_path, monkeypatch, batch_size):
    """A validation pass must not switch the 4-bit layers to bitsandbytes' CPU inference layout.

    On a CPU with AVX512-BF16, bitsandbytes repacks a `Linear4bit` for its `gemv_4bit` kernel the first
    time it runs in eval mode without gradients; that kernel has no backward, so later training steps
    silently dropped the gradient through the frozen weights. The condition is forced here on any CPU
    by the switch bitsandbytes itself reads (`has_avx512bf16`, copied into each layer when built).
    """
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoTokenizer

    from sft_dagster.formatting import build_messages, encode_example
    from sft_dagster.torchkit import collate, summed_response_loss
    from sft_dagster.training.methods.sft import load_model
    from training_helpers import validation_loss

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model_dir = build_tiny_model(tmp_path / "tiny64", hidden_size=64)
    spec = spec_for(model_dir, method="qlora")
    qlora = load_model(spec, model_dir, "cpu")
    reference = load_model(spec_for(model_dir, method="lora"), model_dir, "cpu")
    ref_params = dict(reference.named_parameters())
    torch.manual_seed(0)
    with torch.no_grad():  # the reference holds the dequantised 4-bit weights and the same (non-zero) adapters
        quantized = {n: m for n, m in qlora.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert len(quantized) == 14
        for name, module in quantized.items():
            ref_params[name + ".weight"].copy_(dequantize_4bit(module.weight.data, module.weight.quant_state))
        for name, p in qlora.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
                ref_params[name].copy_(p)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    def encode(df):
        return [encode_example(tokenizer, build_messages(p, r, None, spec.task), 128)
                for p, r in zip(df["prompt"], df["response"])]

    validation_loss(qlora, encode(examples(4, 50)), 2, tokenizer.pad_token_id, "cpu", "fp32")
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized.values())

    batch = collate(encode(examples(batch_size)), tokenizer.pad_token_id, "cpu")
    grads = []
    for model in (qlora, reference):
        model.train()
        loss, _ = summed_response_loss(model, batch)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    diff = torch.sqrt(sum(((grads[0][n] - grads[1][n]) ** 2).sum() for n in grads[1]))
    norm = torch.sqrt(sum((g**2).sum() for g in grads[1].values()))
    assert norm > 0 and diff / norm < 1e-5, float(diff / norm)  # global relative error


def test_qlora_on_cpu_refuses_widths_its_kernels_cannot_quantise(tiny_model_dir):
    from sft_dagster.training.methods.sft import load_model

    with pytest.raises(ValueError, match="multiples of 64.*32 inputs: use method lora"):
        load_model(spec_for(tiny_model_dir, method="qlora"), tiny_model_dir, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_on_cuda(tiny_model_dir, tmp_path):
    tiny_model_dir = build_tiny_model(tmp_path / "tiny64", hidden_size=64)
    _, result = losses(spec_for(tiny_model_dir, method="qlora", epochs=1, precision="bf16"), tiny_model_dir, examples(8),
                       examples(3, 50), tmp_path / "q", device="cuda")
    assert result.metrics["device"] == "cuda" and result.metrics["precision"] == "bf16"
    assert (result.adapter_dir / "adapter_config.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_lora_on_cuda_keeps_the_base_in_bf16_and_follows_fp32(tiny_model_dir, tmp_path):
    from sft_dagster.training import preflight
    from sft_dagster.training.methods.sft import load_model

    model = load_model(spec_for(tiny_model_dir, precision="bf16"), tiny_model_dir, "cuda", "bf16")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    common = {"epochs": 6, "learning_rate": 1e-2, "batch_size": 8}
    ref, _ = losses(spec_for(tiny_model_dir, precision="fp32", **common), tiny_model_dir, examples(8), examples(3, 50),
                    tmp_path / "fp32", device="cuda")
    got, result = losses(spec_for(tiny_model_dir, precision="bf16", **common), tiny_model_dir, examples(8),
                         examples(3, 50), tmp_path / "bf16", device="cuda")
    assert result.metrics["precision"] == "bf16" and ref[0] - ref[-1] > 0.1
    assert torch.allclose(torch.tensor(got), torch.tensor(ref), rtol=2e-3), (got, ref)
    plan = preflight(spec_for(tiny_model_dir, precision="auto"), tiny_model_dir, examples(8), device="cuda",
                     probe_cache=tmp_path / "probes")
    assert plan["precision_choice"]["measured"]["matmul_gflops"]["bf16"] > 0


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_training import examples, spec_for
    from sft_dagster.training import train
    from pathlib import Path
    def die(m):
        if m["step"] == 7:
            os.kill(os.getpid(), signal.SIGKILL)
    spec = spec_for(Path({model!r}), epochs=3, checkpoint_every_steps=3, lora={{"r": 4, "alpha": 8, "dropout": 0.1}})
    train(spec, Path({model!r}), examples(16), examples(4, 50), Path({out!r}), device="cpu", on_metrics=die)
""")


def test_resume_after_sigkill_loses_at_most_one_interval(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    spec = spec_for(tiny_model_dir, epochs=3, checkpoint_every_steps=3, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    killed = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), model=str(tiny_model_dir), out=str(killed))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert latest_checkpoint(killed / "checkpoints", json.loads(
        (sorted((killed / "checkpoints").glob("step-*"))[-1] / "trainer_state.json").read_text())["fingerprint"]).name == "step-6"
    assert not (killed / "adapter").exists()

    resumed = train(spec, tiny_model_dir, examples(16), examples(4, 50), killed, device="cpu", log=lambda _: None)
    assert resumed.metrics["resumed_from_step"] == 6 and resumed.metrics["steps"] == 12
    straight = train(spec, tiny_model_dir, examples(16), examples(4, 50), tmp_path / "straight", device="cpu",
                     log=lambda _: None)
    a = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    b = load_file(straight.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # the resumed run continues exactly where the killed one stopped
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_grid_and_bayesian_search_pick_the_best_trial(tiny_model_dir, tmp_path):
    from sft_dagster.training.search import search_hyperparameters

    spec = spec_for(tiny_model_dir, epochs=1, search={"strategy": "grid", "space": {"learning_rate": [1e-5, 1e-2]}})
    best, trials = search_hyperparameters(spec, tiny_model_dir, examples(8), examples(4, 50), tmp_path / "g",
                                          device="cpu", log=lambda _: None)
    assert [t["learning_rate"] for t in trials] == [1e-5, 1e-2]
    assert best == {"learning_rate": min(trials, key=lambda t: t["val_loss"])["learning_rate"]}
    spec = spec_for(tiny_model_dir, epochs=1, search={"strategy": "bayesian", "trials": 3,
                                                       "space": {"learning_rate": [1e-4, 1e-2], "lora.r": [2, 8]}})
    best, trials = search_hyperparameters(spec, tiny_model_dir, examples(8), examples(4, 50), tmp_path / "b",
                                          device="cpu", log=lambda _: None)
    assert len(trials) == 3 and all(1e-4 <= t["learning_rate"] <= 1e-2 and 2 <= t["lora.r"] <= 8 for t in trials)
    assert (tmp_path / "b" / "trial-2" / "adapter" / "adapter_config.json").exists()


def test_search_space_is_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot search"):
        spec_for(Path("."), search={"strategy": "grid", "space": {"colour": ["red"]}})
