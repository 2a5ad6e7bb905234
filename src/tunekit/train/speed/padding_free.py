"""Padding-free batches: a batch's examples laid end to end in one row, attention kept within each.

A padded (B, T) batch spends every projection, norm and MLP on its padding too. Here the decoder runs
on one row of the batch's real tokens only: position ids restart at each example, and attention runs
example by example (SDPA with `is_causal` on each segment), so no token sees another example's and
no (T x T) mask is built. The loss is the same sum over the same targets; values differ from the
padded forward's only by float rounding (tested).

The mechanism is transformers' attention interface: `enable_padding_free` registers
`segment_attention` under a name of its own and points the model's config at it. It computes
segment by segment when the forward carries `tunekit_segments` (the segments' boundaries, passed through
the model's kwargs as flash-attention's varlen kwargs are) and is SDPA, mask and all, otherwise, so
generation, evaluation and every other forward are unchanged. Gradient checkpointing recomputes a
layer with the kwargs it ran with, so it stays within the segments too. A layer with a sliding
window (Mistral, Gemma 2/3's local layers, Qwen2 with use_sliding_window) gets the window as a banded
causal mask on each segment longer than it, as transformers' own mask bands it. Models the kernel
would compute otherwise keep padded batches (train/speed/support.padding_free_reason): another
attention implementation (eager, flash-attention), soft-capped or bidirectional attention, layers that
do not pass kwargs down to attention, an architecture not verified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunekit.data.tokenize import IGNORE_INDEX
from tunekit.models.load import unwrap_peft
from tunekit.train.speed.support import padding_free_reason

NAME = "tunekit_padding_free"
_sdpa = F.scaled_dot_product_attention  # the segment path's kernel (a name the tests can watch)


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature; (B, H, T, D) in, (B, T, H, D) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("tunekit_segments", None)
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _refuse_what_it_cannot_compute(module, kwargs)
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        band = banded_causal_mask(e - s, window, query.device)
        outs.append(
            _sdpa(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                attn_mask=band,
                dropout_p=dropout,
                scale=scaling,
                is_causal=band is None,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def banded_causal_mask(n: int, window: int | None, device) -> torch.Tensor | None:
    """(n, n) True where query i may attend key j: j <= i and i - j < window, transformers' sliding
    window (masking_utils.sliding_window_overlay); None where the window is wider than the segment and
    plain causal attention is the same thing."""
    if window is None or n <= window:
        return None
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]  # (n, n): query minus key position
    return (d >= 0) & (d < window)


def _refuse_what_it_cannot_compute(module, kwargs) -> None:
    """The kernel is causal softmax attention with an optional window: a layer that asks for more
    stops the run rather than getting something else (support.padding_free_reason keeps such models
    off this path; this catches a layer of an unexpected kind)."""
    extra = [k for k in ("softcap", "s_aux", "sinks") if kwargs.get(k) is not None]
    if not getattr(module, "is_causal", True):
        extra.append("non-causal attention")
    if extra:
        raise RuntimeError(
            f"train.padding_free: {type(module).__name__} needs {', '.join(extra)}, which the segment "
            "kernel does not compute; set train.padding_free: false"
        )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    # The padded path builds the mask SDPA would get; the packed path gets one too (transformers sees
    # restarting position ids) and does not read it.
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable_padding_free(model) -> bool:
    """Point `model`'s attention at `segment_attention` where that is exact (its attention is SDPA,
    its layers pass kwargs down to it, its architecture is verified: support.padding_free_reason);
    returns whether it did."""
    if padding_free_reason(model) is not None:
        return False
    _register()
    unwrap_peft(model).config._attn_implementation = NAME
    return True


def enabled(model) -> bool:
    cfg = getattr(unwrap_peft(model), "config", None)
    return getattr(cfg, "_attn_implementation", None) == NAME


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """(B, T) right-padded tensors -> (1, N) ids, position ids and labels of the real tokens, and
    the segments' boundaries [0, n1, n1 + n2, ..., N]. Each segment's first label is set to ignore:
    in the padded batch no position predicts it, and here the previous example's last would."""
    mask = attention_mask.bool()
    lengths = mask.sum(1).tolist()
    ids, labs = input_ids[mask], labels[mask].clone()
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    labs[bounds[:-1]] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in lengths]).to(input_ids.device)
    return ids[None], positions[None], labs[None], bounds


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row its tokens, then padding: what `pack` lays end to end without reordering."""
    m = attention_mask
    return bool(m[:, 0].all()) and bool((m[:, 1:] <= m[:, :-1]).all())
