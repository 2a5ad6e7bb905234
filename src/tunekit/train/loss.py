"""Causal-LM loss that projects only the positions that carry loss onto the vocabulary.

With a 49k-token vocabulary the output projection is a fifth of the model's FLOPs, and its
(B, T, V) logits dominate activation memory. Prompt tokens carry no loss, so their logits are never
needed: we run the decoder, gather the hidden states of the positions whose next token is a target,
and project only those. The result equals `model(..., labels=...).loss` (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunekit.data.tokenize import IGNORE_INDEX
from tunekit.models.device import autocast, model_device


def _decoder_and_head(model):
    from tunekit.train import distributed

    if distributed.sharded(model):
        # FSDP gathers the embeddings, final norm and head in the whole model's forward only.
        return None, None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    # Models that transform logits after the projection (soft-capping, scaling) take the standard path.
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None, None
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def loss_sum(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over target tokens, and their count. Inputs are (B, T), on any device:
    they move to the model's, and the forward runs under `autocast` (bf16 on CUDA, fp32 on CPU)."""
    device = model_device(model)
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    targets = labels[:, 1:]  # (B, T-1): the token each position predicts
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    decoder, head = _decoder_and_head(model)
    with autocast(device):
        if decoder is None:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"), n
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        h = hidden[:, :-1][keep]  # (N, H)
        logits = head(h).float()  # (N, V)
        return F.cross_entropy(logits, targets[keep], reduction="sum"), n
