"""The fast LoRA branch computes what peft computes: outputs, gradients, dropout rate, reproducibility."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sft_dagster.training.fast_lora import LoraLinear, dropout_keep_mask, use_fast_lora


def _lora_model(dropout: float, seed: int = 0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 16))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"]))
    with torch.no_grad():  # lora_B starts at zero; make the branch matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, x.grad


def test_same_outputs_and_gradients_as_peft_without_dropout():
    peft_model = _lora_model(dropout=0.0)
    fast_model = copy.deepcopy(peft_model)
    assert use_fast_lora(fast_model) == 2
    x = torch.randn(3, 5, 24)
    out_a, grads_a, gx_a = _grads(peft_model, x)
    out_b, grads_b, gx_b = _grads(fast_model, x)
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert torch.allclose(gx_a, gx_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 4
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


@pytest.mark.parametrize("with_bias", [True, False])
def test_dropout_layer_matches_the_reference_for_a_given_mask(with_bias):
    torch.manual_seed(1)
    x = torch.randn(2, 7, 24, requires_grad=True)
    weight, bias = torch.randn(40, 24), torch.randn(40) if with_bias else None
    a = torch.randn(4, 24, requires_grad=True)
    b = torch.randn(40, 4, requires_grad=True)
    keep, p, scaling = torch.rand(2, 7, 24) > 0.3, 0.3, 2.0
    reference = torch.nn.functional.linear(x, weight, bias) + ((x * keep / (1 - p)) @ a.t() @ b.t()) * scaling
    fused = LoraLinear.apply(x, weight, bias, a, b, keep, scaling / (1 - p))
    assert fused.shape == (2, 7, 40)
    assert torch.allclose(reference, fused, atol=1e-4)
    weights = torch.randn(2, 7, 40)
    ref_grads = torch.autograd.grad((reference * weights).sum(), (x, a, b))
    fused_grads = torch.autograd.grad((fused * weights).sum(), (x, a, b))
    for r, f in zip(ref_grads, fused_grads):
        assert torch.allclose(r, f, atol=1e-4)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_mask_drops_at_rate_p_and_follows_the_torch_seed(p):
    torch.manual_seed(0)
    first = dropout_keep_mask(torch.Size([1000, 1001]), p, torch.device("cpu"))
    second = dropout_keep_mask(torch.Size([1000, 1001]), p, torch.device("cpu"))
    torch.manual_seed(0)
    again = dropout_keep_mask(torch.Size([1000, 1001]), p, torch.device("cpu"))
    assert first.shape == (1000, 1001) and first.dtype == torch.bool
    assert abs(1 - first.float().mean().item() - p) < 0.002
    assert torch.equal(first, again) and not torch.equal(first, second)
    # Neighbouring elements (slices of one 64-bit word) are independent.
    flat = first.flatten()[:1_000_000].view(-1, 4).float()
    assert abs((flat[:, 0] * flat[:, 1]).mean().item() - (1 - p) ** 2) < 0.003


def test_dropout_in_training_only_and_peft_forward_kept_for_other_cases():
    model = _lora_model(dropout=0.5)
    use_fast_lora(model)
    x = torch.randn(4, 24)
    model.train()
    assert not torch.allclose(model(x), model(x))  # fresh masks each call
    model.eval()
    assert torch.allclose(model(x), model(x))
    with model.disable_adapter():  # falls back to peft's own forward: the frozen layers alone
        base_out = model(x)
    first, second = model.get_base_model()[0].base_layer, model.get_base_model()[2].base_layer
    assert torch.allclose(base_out, second(torch.relu(first(x))), atol=1e-6)
    assert not torch.allclose(base_out, model(x), atol=1e-3)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).norm() / want.detach().double().norm())


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bf16_base_with_fp32_adapters_matches_the_reference(p):
    """`precision: bf16`: bf16 activations and frozen weights, fp32 adapters (and their gradients)."""
    torch.manual_seed(2)
    x = torch.randn(3, 50, 64).to(torch.bfloat16).requires_grad_(True)
    weight, bias = torch.randn(96, 64).to(torch.bfloat16), torch.randn(96).to(torch.bfloat16)
    a = (torch.randn(8, 64) * 0.3).requires_grad_(True)
    b = (torch.randn(96, 8) * 0.3).requires_grad_(True)
    keep = torch.rand(3, 50, 64) > p if p else None
    scaling = 2.0
    fused = LoraLinear.apply(x, weight, bias, a, b, keep, scaling / (1 - p))
    assert fused.dtype == torch.bfloat16 and fused.shape == (3, 50, 96)
    # The reference in float64 from the same values: only bf16 rounding separates the two.
    x64, w64, b64 = x.detach().double().requires_grad_(True), weight.double(), bias.double()
    a64, b_64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    dropped = x64 if keep is None else x64 * keep / (1 - p)
    reference = torch.nn.functional.linear(x64, w64, b64) + (dropped @ a64.t() @ b_64.t()) * scaling
    assert _relative_error(fused, reference) < 1e-2
    weights = torch.randn(3, 50, 96)
    got = torch.autograd.grad((fused.float() * weights).sum(), (x, a, b))
    want = torch.autograd.grad((reference * weights.double()).sum(), (x64, a64, b_64))
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    for g, w in zip(got, want):
        assert _relative_error(g, w) < 1e-2, (_relative_error(g, w), g.shape)


def test_bf16_base_model_takes_the_fast_path_and_matches_peft():
    peft_model = _lora_model(dropout=0.0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    fast_model = copy.deepcopy(peft_model)
    assert use_fast_lora(fast_model) == 2
    x = torch.randn(3, 5, 24).to(torch.bfloat16)
    out_fast = fast_model(x.clone().requires_grad_(True))
    assert "LoraLinear" in type(out_fast.grad_fn).__name__  # the fused layer ran, not peft's fallback
    out_a, grads_a, gx_a = _grads(peft_model, x)
    out_b, grads_b, gx_b = _grads(fast_model, x)
    assert out_b.dtype == gx_b.dtype == torch.bfloat16
    assert _relative_error(out_b, out_a) < 1e-2 and _relative_error(gx_b, gx_a) < 2e-2
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 4
    for name in grads_a:
        assert grads_b[name].dtype == torch.float32
        assert _relative_error(grads_b[name], grads_a[name]) < 2e-2, name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_swiglu_mlp_matches_the_unfused_layers(tiny_model_dir, dropout):
    """The MLP's down projection fused with SiLU(gate) * up keeps two activations instead of four and
    computes the same outputs and gradients: against peft's own layers without dropout, against the
    unfused fast layers (same dropout masks for the same seed) with it."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.train()
    peft_model, unfused, fused = model, copy.deepcopy(model), copy.deepcopy(model)
    use_fast_lora(unfused)
    for module in unfused.modules():  # the fast layers, the MLP left as transformers wrote it
        if hasattr(module, "_unfused_forward"):
            module.forward = module._unfused_forward
    use_fast_lora(fused)
    mlps = [m for m in fused.modules() if hasattr(m, "_unfused_forward")]
    assert len(mlps) == base.config.num_hidden_layers
    ids = torch.randint(3, base.config.vocab_size, (2, 9))

    def run(net):
        torch.manual_seed(7)
        net.zero_grad()
        captured = {}
        def keep(_, __, out):
            captured.setdefault("grad_fn", type(out.grad_fn).__name__)

        handle = net.get_base_model().model.layers[0].mlp.register_forward_hook(keep)
        logits = net(input_ids=ids).logits
        handle.remove()
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, captured

    out_f, grads_f, seen = run(fused)
    assert "SwiGLULoraDown" in seen["grad_fn"]
    for other in ([peft_model] if dropout == 0 else []) + [unfused]:
        out, grads, _ = run(other)
        assert torch.allclose(out, out_f, atol=1e-5)
        assert grads.keys() == grads_f.keys() and len(grads) == 7 * 2 * base.config.num_hidden_layers
        for name in grads:
            assert torch.allclose(grads[name], grads_f[name], rtol=1e-4, atol=1e-6), name
