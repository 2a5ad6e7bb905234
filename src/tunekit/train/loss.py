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
from tunekit.models.load import unwrap_peft
from tunekit.train.speed import padding_free
from tunekit.train.speed.support import head_split_reason


def _decoder_and_head(model):
    from tunekit.train import distributed

    if distributed.sharded(model):
        # FSDP gathers the embeddings, final norm and head in the whole model's forward only.
        return None, None
    base = unwrap_peft(model)
    # Models that transform logits after the projection (soft-capping, scaling), and architectures not
    # verified, take the standard path (train/speed/support.py).
    if head_split_reason(base) is not None:
        return None, None
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(h @ W.T, targets)) without the (N, V) logits ever existing at once.

    The forward walks `chunk` rows at a time: logits, their log-sum-exp and loss, then at once the
    gradient (softmax minus one-hot) and from it dL/dh and dL/dW; only those two are kept for the
    backward, which scales them by the incoming gradient. Peak: chunk x V instead of about three
    N x V tensors (the log-softmax, its gradient and the logits' gradient), the same matmuls.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            logits = (hc @ weight.t()).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(tc), device=tc.device), tc] -= 1  # d loss / d logits
            probs = probs.to(h.dtype)
            if want_h:
                grad_h[s : s + chunk] = probs @ weight
            if want_w:
                grad_w.addmm_(probs.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out if grad_h is not None else None,
            grad_w * grad_out if grad_w is not None else None,
            None,
            None,
        )


def _chunkable(head, device: torch.device) -> bool:
    """A plain bias-free linear head outside autocast: what the chunked loss computes exactly."""
    return type(head) is torch.nn.Linear and head.bias is None and not torch.is_autocast_enabled(device.type)


def target_states(
    model, input_ids, attention_mask, keep, **forward_kwargs
) -> tuple[torch.Tensor, torch.nn.Module | None]:
    """The positions whose next token is a target (`keep`, (B, T-1)), run forward: their (N, H)
    hidden states and the output head, where the model splits into decoder and head; otherwise their
    (N, V) logits from the whole model, and None. Call under `autocast`, with inputs on the model's
    device. use_cache=False: transformers otherwise builds a KV cache in training too, which holds
    every layer's keys and values until the forward returns; nothing reads it. forward_kwargs go to
    the model's forward (padding-free batches: position ids and segment bounds)."""
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs
        ).logits
        return logits[:, :-1][keep], None
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs
    ).last_hidden_state
    return hidden[:, :-1][keep], head


def loss_sum(
    model, input_ids, attention_mask, labels, chunk: int | None = None, **packed
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over target tokens, and their count. Inputs are (B, T), on any device:
    they move to the model's, and the forward runs under `autocast` (bf16 on CUDA, fp32 on CPU).
    chunk (`train.loss_chunk_tokens`): project and take the loss gradient that many target tokens at
    a time (ChunkedLinearCrossEntropy), where the head allows it. packed: rows of several documents
    (task: pretrain, data/packing.py), with attention_mask None: their position ids (and segments)
    go to the forward as they are."""
    device = model_device(model)
    input_ids, labels = input_ids.to(device), labels.to(device)
    extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    if attention_mask is not None:  # None: packed rows, whose attention follows their position ids
        attention_mask = attention_mask.to(device)
        if (
            padding_free.enabled(model)
            and not attention_mask.all()
            and padding_free.right_padded(attention_mask)
        ):
            input_ids, positions, labels, bounds = padding_free.pack(input_ids, attention_mask, labels)
            attention_mask, extra = None, {"position_ids": positions, "tunekit_segments": bounds}
    targets = labels[:, 1:]  # (B, T-1): the token each position predicts
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    with autocast(device):
        h, head = target_states(model, input_ids, attention_mask, keep, **extra)
        if head is None:  # h are already the logits
            return F.cross_entropy(h.float(), targets[keep], reduction="sum"), n
        if chunk and torch.is_grad_enabled() and _chunkable(head, device):
            return ChunkedLinearCrossEntropy.apply(h, head.weight, targets[keep], chunk), n
        logits = head(h).float()  # (N, V)
        return F.cross_entropy(logits, targets[keep], reduction="sum"), n
