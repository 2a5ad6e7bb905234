"""One autograd node for a LoRA linear layer: `x @ W.T + scaling * (drop(x) @ A.T) @ B.T`.

PEFT computes a LoRA layer as four autograd nodes, `base(x) + lora_B(lora_A(dropout(x))) * scaling`.
Besides the matmuls, that runs two passes over the (tokens x out-features) output in the forward (the
multiply by scaling and the add), one in the backward (the multiply again), and one over the
(tokens x in-features) input gradient, where autograd sums the base's and the adapter's halves. On a
CPU those passes are memory-bound and cost as much as a good part of the rank-16 matmuls.

`LoraLinearFunction` does the same arithmetic with the scaling folded into the matmuls' alpha and the
sums accumulated in place (`addmm_`): no extra pass and no extra (tokens x features) tensor. It keeps
for the backward what PEFT's nodes keep (the input, or the dropped input, and the rank-r
`drop(x) @ A.T`), so lean activations (`train/speed/lean.py`) still find the norm outputs and MLP products
among the saved tensors. The values agree with PEFT's to float rounding (tested).

`fuse_lora_layers` installs it as the forward of every PEFT `lora.Linear` it can compute exactly:
one active adapter, plain LoRA (not DoRA), an `nn.Linear` base with frozen weights, no autocast, one
dtype. Anything else (adapters disabled for DPO's reference pass, a merged adapter, per-request
`adapter_names`, QLoRA's 4-bit base, bf16 autocast on a GPU) falls through to PEFT's own forward,
decided at each call. `add_lora` installs it on the architectures the speed pieces are verified on
(train/speed/support.py); others keep PEFT's forward throughout.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class LoraLinearFunction(torch.autograd.Function):
    """out = x @ W.T (+ bias) + scaling * (xd @ A.T) @ B.T, on 2-D inputs. xd is x, or x after dropout
    (computed outside, so autograd owns the mask). W and bias are frozen: no gradient for them."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_a, lora_b, scaling: float):
        h = xd @ lora_a.t()  # (N, r)
        out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.same = xd is x
        # Only xd is needed for A's gradient; x's gradient needs W alone. When they are one tensor
        # (no dropout) it is saved once.
        ctx.save_for_backward(xd, h, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        xd, h, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        grad = grad.contiguous()
        gh = (grad @ lora_b).mul_(s)  # d/dh, (N, r)
        grad_b = (grad.t() @ h).mul_(s) if ctx.needs_input_grad[5] else None
        grad_a = gh.t() @ xd if ctx.needs_input_grad[4] else None
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x = grad @ weight
            if ctx.same:
                grad_x.addmm_(gh, lora_a)  # the adapter's half summed in place
            else:
                grad_xd = gh @ lora_a
        return grad_x, grad_xd, None, None, grad_a, grad_b, None


def _plain_adapter(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The one active adapter's name where `layer(x)` is plain LoRA this function computes exactly;
    None where PEFT's forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:  # DoRA and other variants
        return None
    base, a, b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if not (type(base) is nn.Linear and type(a) is nn.Linear and type(b) is nn.Linear):
        return None
    if a.bias is not None or b.bias is not None or base.weight.requires_grad:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    dtypes = {x.dtype, base.weight.dtype, a.weight.dtype, b.weight.dtype}
    return name if len(dtypes) == 1 else None


def _fused_forward(self, x, *args, **kwargs):
    """Bound as a PEFT lora.Linear's forward (types.MethodType, so a deepcopy binds to the copy)."""
    name = _plain_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    x2 = x.reshape(-1, x.shape[-1])
    xd = x2 if isinstance(dropout, nn.Identity) else dropout(x2)
    base = self.base_layer
    out = LoraLinearFunction.apply(
        x2, xd, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    )
    return out.view(*x.shape[:-1], out.shape[-1])


def _lora_linears(model: nn.Module):
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if type(m) is Linear]


def fuse_lora_layers(model: nn.Module) -> int:
    """Install the fused forward on every PEFT lora.Linear of `model`; returns how many."""
    layers = _lora_linears(model)
    for m in layers:
        m.forward = types.MethodType(_fused_forward, m)
    return len(layers)


def unfuse_lora_layers(model: nn.Module) -> None:
    """Back to PEFT's forward (the benchmark's baseline)."""
    for m in _lora_linears(model):
        m.__dict__.pop("forward", None)
