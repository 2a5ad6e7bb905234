"""Batched greedy generation for evaluation, stopping where serve and chat stop (models/stops.py).

Every prompt of an evaluation starts with the same tokens: the chat template's system prompt and
`<|im_start|>user\\n`, and for the few-shot contender the shots too (hundreds of tokens). That
shared prefix is encoded once (`SharedPrefix`); each batch starts from a copy of its KV cache and
computes only the rest of each prompt. Rows are padded in the middle, between the prefix and their
own tokens, so the prefix sits at the same cache positions in every row; the position ids come from
the attention mask, so each token keeps the position it has in the plain left-padded batch and the
replies are the same (tests/test_eval_speed.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from tunekit.data.tokenize import render_prompt
from tunekit.models.device import autocast, model_device
from tunekit.models.stops import reply_text, stop_token_ids

# A shorter shared prefix saves less than copying its cache into each batch costs.
MIN_SHARED_PREFIX = 8


def generate(model, tokenizer, examples, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions for each example's prompt, in input order.

    A reply ends on the same stop tokens as in `tunekit serve` and `chat` (the chat template's
    end-of-turn token, then the eos ids), and its text is cut there the same way.
    """
    model.eval()
    prompts = [render_prompt(tokenizer, ex) for ex in examples]
    stops = stop_token_ids(tokenizer, model)
    rows = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, stops)
    return [reply_text(tokenizer, row, stops).strip() for row in rows]


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    stop_ids: list[int],
    share_prefix: bool = True,
    **sampling,
) -> list[list[int]]:
    """The new token ids for each rendered prompt, in input order: greedy, or sampled with the
    `model.generate` options in `sampling` (do_sample, temperature, top_p, ...).

    Prompts are sorted by length so a batch pads little. The prompts' common token prefix is
    encoded once and its KV cache reused by every batch (`share_prefix=False`: plain left-padded
    batches, the reference the tests compare with). The token ids go to the model's device, and
    generation runs under `autocast` (bf16 on CUDA, fp32 on CPU).
    """
    device = model_device(model)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    longest = max((len(x) for x in ids), default=0) + max_new_tokens
    prefix = SharedPrefix.build(model, ids, longest) if share_prefix else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, mask = pad_rows([ids[i] for i in idx], tokenizer.pad_token_id, prefix)
        extra = {} if prefix is None else {cache_kwarg(model): prefix.cache_for(len(idx))}
        with autocast(device):
            gen = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
                **extra,
                **(sampling or {"do_sample": False}),
            )
        new = gen[:, input_ids.shape[1] :].cpu()
        for i, row in zip(idx, new, strict=True):
            out[i] = row.tolist()
    return out


def pad_rows(rows: list[list[int]], pad_id: int, prefix: SharedPrefix | None = None):
    """(input_ids, attention_mask), both (B, T): rows padded on the left, or, with a shared prefix,
    padded between the prefix and each row's own tokens, so the prefix fills the same columns in
    every row and each row still ends in the last column."""
    p = 0 if prefix is None else len(prefix.ids)
    width = max(len(r) for r in rows) - p
    input_ids = torch.full((len(rows), p + width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), p + width), dtype=torch.long)
    input_ids[:, :p] = torch.tensor(prefix.ids if prefix else [], dtype=torch.long)
    mask[:, :p] = 1
    for b, r in enumerate(rows):
        own = r[p:]
        input_ids[b, p + width - len(own) :] = torch.tensor(own, dtype=torch.long)
        mask[b, p + width - len(own) :] = 1
    return input_ids, mask


@dataclass
class SharedPrefix:
    """The token prefix every prompt starts with, and its KV cache, computed once (batch 1)."""

    ids: list[int]
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, kv_heads, P, head_dim) each
    config: object  # the model's config, to build caches of its layer types

    @classmethod
    @torch.no_grad()
    def build(cls, model, rows: list[list[int]], longest: int) -> SharedPrefix | None:
        """The rows' common prefix, less one token so every row keeps a token of its own (its last
        position's logits come from a forward, never from the cache); None where it is too short
        to pay, or where the model's cache cannot be copied this way (`prefix_cache_supported`)."""
        if len(rows) < 2 or not prefix_cache_supported(model, longest):
            return None
        n = min(len(r) for r in rows) - 1
        first = rows[0]
        for r in rows[1:]:
            n = next((k for k in range(n) if r[k] != first[k]), n)
        if n < MIN_SHARED_PREFIX:
            return None
        device = model_device(model)
        with autocast(device):
            out = model(input_ids=torch.tensor([first[:n]], device=device), use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return cls(first[:n], kv, getattr(model, "config", None))

    def cache_for(self, batch: int):
        """A fresh DynamicCache holding the prefix once per row of a batch of `batch` rows: a forward
        appends to the cache it gets, so each batch needs its own."""
        from transformers import DynamicCache

        data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.keys_values]
        return DynamicCache(ddp_cache_data=data, config=self.config)


def prefix_cache_supported(model, longest: int) -> bool:
    """Whether the model's KV cache is one plain key/value tensor pair per layer, attention over
    every position (or a sliding window longer than `longest`, the longest prompt plus reply): the
    cache this module copies. Recurrent or linear-attention layers, or a window the replies would
    overrun, take the plain path (a window counts cache slots, and the middle padding adds some)."""
    from tunekit.models.load import unwrap_peft

    config = getattr(unwrap_peft(model), "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    text = config.get_text_config(decoder=True)
    declared = getattr(text, "layer_types", None)
    types = set(declared or ["full_attention"])
    if not types <= {"full_attention", "sliding_attention"}:
        return False
    window = getattr(text, "sliding_window", None)
    if window is None or window > longest:
        return True
    # A config with a window but no layer_types (Mistral) slides on every layer unless it says
    # otherwise (`use_sliding_window: false`).
    slides = "sliding_attention" in types if declared else getattr(text, "use_sliding_window", True)
    return not slides


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` since transformers 5.x renamed it, else
    `past_key_values` (the range pyproject allows has both)."""
    from tunekit.models.load import unwrap_peft

    base = unwrap_peft(model)
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
