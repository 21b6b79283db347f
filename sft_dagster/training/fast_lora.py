"""A faster LoRA branch for CPU training: the same maths as peft's `lora.Linear`, fewer passes over memory.

peft computes `lora_B(lora_A(dropout(x))) * scaling`. On CPU, `nn.Dropout` draws one Mersenne-Twister
number per element, which costs as much as the frozen layer's matrix product (measured: ~4 ms for a
744 x 576 activation, against ~4 ms for the 576 x 576 product), and keeps a float copy of the dropped
input for the backward pass. Here the keep-mask comes from 16-bit slices of 64-bit random words (four
elements per draw from torch's own generator, so seeding, checkpoints and gradient checkpointing keep
working), the backward pass recomputes the dropped input from `x` and a one-byte mask, the scale and
dropout factors are applied to the rank-r product, and the LoRA product is added into the frozen
layer's output (and its gradient into the input gradient) in place.

Only plain LoRA on a dense layer takes this path (no DoRA or other variants, no LoRA bias, no
autocast, one active adapter); everything else keeps peft's forward. The adapter weights, their names
and the saved format are peft's. Mixed precision (a bf16 base with fp32 adapters, `precision: bf16`):
the products run in the activations' dtype on bf16 copies of the rank-r adapter matrices (small:
r x width), the gradients of the adapters come back in fp32, as under autocast; the activations are
never copied to fp32 (peft's forward casts the input to the adapters' dtype, a full-width pass).
"""

from __future__ import annotations

import types

import torch

_LEVELS = 1 << 16


def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask that is False with probability p (p rounded to a multiple of 1/65536)."""
    n = 1
    for size in shape:
        n *= size
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    threshold = -(1 << 15) + round(p * _LEVELS)
    return (words.view(torch.int16)[:n] >= threshold).view(shape)


class LoraLinear(torch.autograd.Function):
    """x @ W^T + b + (x * keep) @ A^T @ B^T * factor for a frozen W, b; factor = scaling / (1 - p).

    `keep=None` means no dropout. The LoRA product is accumulated into the base output in place
    (`addmm_`), and the input gradient likewise, so neither costs an extra full-width pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, keep, factor: float):
        x2d = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        dropped = x2d if keep is None else torch.where(keep.view(x2d.shape), x2d, 0.0)
        low_rank = dropped @ lora_a.to(x.dtype).t()
        out.addmm_(low_rank, lora_b.to(x.dtype).t(), alpha=factor)
        ctx.save_for_backward(x, weight, lora_a, lora_b, keep, low_rank)
        ctx.factor = factor
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, keep, low_rank = ctx.saved_tensors
        factor = ctx.factor
        x2d = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # no copies when all share one dtype
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_low = (grad_2d @ b) * factor
        grad_b = ((grad_2d.t() @ low_rank) * factor).to(lora_b.dtype)
        keep = None if keep is None else keep.view(x2d.shape).to(x.dtype)  # float products are ~5x faster
        grad_a = (grad_low.t() @ (x2d if keep is None else x2d * keep)).to(lora_a.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_2d @ weight
            if keep is None:
                grad_x.addmm_(grad_low, a)
            else:
                grad_x.addcmul_(grad_low @ a, keep)
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    name = adapters[0] if len(adapters) == 1 else None
    base = self.base_layer
    if (name is None or args or kwargs or self.disable_adapters or self.merged or name in self.lora_variant
            or self.lora_B[name].bias is not None or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad) or torch.is_autocast_enabled(x.device.type)
            or x.dtype != base.weight.dtype
            or self.lora_A[name].weight.dtype not in (x.dtype, torch.float32)
            or self.lora_B[name].weight.dtype != self.lora_A[name].weight.dtype):
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    keep = dropout_keep_mask(x.shape, p, x.device) if p > 0 else None
    return LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, keep,
                            self.scaling[name] / (1.0 - p))


def use_fast_lora(model) -> int:
    """Route peft's dense LoRA layers of `model` through `LoraLinear`; returns how many were switched."""
    from peft.tuners.lora.layer import Linear

    switched = 0
    for module in model.modules():
        if type(module) is Linear and isinstance(module.base_layer, torch.nn.Linear) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fast_forward, module)
            switched += 1
    return switched
