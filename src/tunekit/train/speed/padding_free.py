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
layer with the kwargs it ran with, so it stays within the segments too. Models that use another
attention implementation (eager, flash-attention) or do not pass kwargs down to attention keep
padded batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunekit.data.tokenize import IGNORE_INDEX
from tunekit.models.load import unwrap_peft

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
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        outs.append(
            _sdpa(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    # The padded path builds the mask SDPA would get; the packed path gets one too (transformers sees
    # restarting position ids) and does not read it.
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable_padding_free(model) -> bool:
    """Point `model`'s attention at `segment_attention` where its attention is SDPA and its layers
    pass kwargs down to it; returns whether it did."""
    base = unwrap_peft(model)
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if not getattr(base, "_supports_attention_backend", False):
        return False
    _register()
    cfg._attn_implementation = NAME
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
