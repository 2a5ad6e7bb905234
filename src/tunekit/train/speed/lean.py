"""Lean activations: cheap tensors that autograd would keep are recomputed in the backward instead.

Without checkpointing, autograd keeps per token per decoder layer every tensor some backward needs.
Four of them are pointwise functions of tensors it keeps anyway:

- the input norm's output, which the q/k/v projections keep for their weight (or adapter) gradients,
  a function of the norm's input (kept by the norm itself);
- the same for the MLP's norm and the gate/up projections;
- act(gate), kept for the gradient of `act(gate) * up`, a function of gate (kept by act's backward);
- act(gate) * up, kept for the down projection's gradient, a function of gate and up (kept).

On a llama-class model that is 2 x hidden + 2 x intermediate of the 6 x hidden + 4 x intermediate +
2 x kv elements a LoRA run keeps: about 40% of the activations (the bulk of the peak at longer rows),
for a few pointwise ops per layer in the backward. Unlike checkpointing, no matmul is recomputed.

The mechanism is `torch.autograd.graph.saved_tensors_hooks`: while a decoder layer runs forward, the
pack hook swaps a saved tensor that is one of the registered targets (or a contiguous view of one)
for a recipe, and the unpack hook runs the recipe in the backward. The recipes run the same ops on the
same inputs, so the values (and the gradients) are bit for bit the same (tested, for each family of
tests/test_architectures.py; build_model installs it only on those: train/speed/support.py). Layers
run under another saved-tensor hook (gradient checkpointing, activation offloading) are left to it.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from tunekit.models.load import decoder_layers

# A decoder layer's norms, by the names transformers uses for llama, mistral, qwen2/3, gemma 1-3, phi3
# and most others. Registering a norm whose output nothing saves (Gemma 2's post-attention norm feeds
# the residual sum) costs nothing: no saved tensor matches it.
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")


class _Cell:
    """One target's recipe, shared by every saved copy of it (q, k and v each keep the input norm's
    output): recomputed once in the backward and held until the last copy has been unpacked."""

    __slots__ = ("fn", "pending", "value")

    def __init__(self, fn):
        self.fn, self.pending, self.value = fn, 0, None

    def get(self) -> torch.Tensor:
        value = self.value if self.value is not None else self.fn()
        self.pending -= 1  # below zero (a graph run twice): recomputed at each unpack, still exact
        self.value = value if self.pending > 0 else None
        return value


class _Recipe:
    """A saved tensor replaced by its target's cell (and the view of the target autograd saved)."""

    __slots__ = ("cell", "shape")

    def __init__(self, cell: _Cell, shape: torch.Size):
        self.cell, self.shape = cell, shape


class LayerSaves:
    """The registered targets of one decoder layer's forward, and the pack/unpack hooks for them."""

    def __init__(self):
        self.targets: list[tuple[torch.Tensor, _Cell]] = []

    def add(self, target: torch.Tensor, fn) -> None:
        # The target stays referenced until the layer's forward returns: its address cannot be reused
        # by another tensor meanwhile, so matching by address is exact.
        self.targets.append((target, _Cell(fn)))

    def pack(self, t: torch.Tensor):
        for target, cell in self.targets:
            if (
                t.data_ptr() == target.data_ptr()
                and t.numel() == target.numel()
                and t.dtype == target.dtype
                and t.device == target.device
                and t.is_contiguous()
                and target.is_contiguous()
            ):
                cell.pending += 1
                return _Recipe(cell, t.shape)
        return t

    @staticmethod
    def unpack(saved):
        if isinstance(saved, _Recipe):
            with torch.no_grad():
                return saved.cell.get().view(saved.shape)
        return saved


def _other_hooks_active() -> bool:
    """Whether a saved-tensor hook (checkpointing's, offloading's) is already managing this forward."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class _LayerHooks:
    """Module hooks on one decoder layer: open its saved-tensor hooks, register targets, close."""

    def __init__(self):
        self.saves: LayerSaves | None = None
        self.ctx = None

    def enter(self, module, args, kwargs=None):
        if self.ctx is not None or not torch.is_grad_enabled() or _other_hooks_active():
            return
        self.saves = LayerSaves()
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.saves.pack, self.saves.unpack)
        self.ctx.__enter__()

    def exit(self, module, args, output):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            # Every tensor saved in this forward holds a reference to the pack hook, hence to
            # `saves`, until its backward: the targets must go now, or they would all stay alive.
            self.saves.targets.clear()
            self.ctx, self.saves = None, None

    def norm_output(self, norm, args, output):
        if self.saves is not None and args and isinstance(output, torch.Tensor):
            x = args[0]
            # forward(), not __call__: the recompute must not run these hooks again.
            self.saves.add(output, lambda: norm.forward(x))


def _lean_mlp_forward(mlp, x):
    """`down(act(gate(x)) * up(x))`, with act(gate) and the product registered as recipes. Bound to
    the module with types.MethodType, so that a deepcopy of the model binds to the copy."""
    saves = mlp._lean_hooks.saves
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    act = mlp.act_fn(gate)
    if saves is not None:
        saves.add(act, lambda: mlp.act_fn(gate))
    prod = act * up
    if saves is not None:
        saves.add(prod, lambda: mlp.act_fn(gate) * up)
    return mlp.down_proj(prod)


def _is_gated_mlp(mlp: nn.Module) -> bool:
    """Whether `mlp.forward` computes down(act(gate(x)) * up(x)): checked on a random input, since
    classes that have these attributes (with a bias, a dropout, a scaling) compute other things."""
    if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    try:
        w = next(mlp.parameters())
        width = getattr(mlp.gate_proj, "in_features", None)
        if width is None or w.device.type == "meta":
            return False
        x = torch.randn(
            1, 2, width, device=w.device, generator=torch.Generator(device=w.device).manual_seed(0)
        )
        x = x.to(w.dtype if w.is_floating_point() else torch.float32)
        with torch.no_grad():
            expected = mlp(x)
            got = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return torch.equal(expected, got)
    except Exception:  # an MLP we cannot probe is left as it is
        return False


def enable_lean_activations(model: nn.Module) -> int:
    """Install the hooks on every decoder layer of `model` (a transformers model, peft-wrapped or not).

    Returns the number of layers hooked; 0 where the decoder layers cannot be found. The model's
    outputs and gradients do not change; only what is kept between forward and backward does.
    """
    layers = decoder_layers(model)
    probed: dict[type, bool] = {}  # one probe per MLP class
    for layer in layers:
        hooks = _LayerHooks()
        layer.register_forward_pre_hook(hooks.enter)
        layer.register_forward_hook(hooks.exit, always_call=True)
        for name in NORMS:
            if isinstance(getattr(layer, name, None), nn.Module):
                getattr(layer, name).register_forward_hook(hooks.norm_output)
        mlp = getattr(layer, "mlp", None)
        if mlp is not None:
            kind = type(mlp)
            if kind not in probed:
                probed[kind] = _is_gated_mlp(mlp)
            if probed[kind]:
                mlp._lean_hooks = hooks
                mlp.forward = types.MethodType(_lean_mlp_forward, mlp)
    return len(layers)
