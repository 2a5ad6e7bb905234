"""Batched greedy generation for evaluation, stopping where serve and chat stop (models/stops.py)."""

from __future__ import annotations

import torch

from tunekit.data.tokenize import render_prompt
from tunekit.models.device import autocast, model_device
from tunekit.models.stops import reply_text, stop_token_ids


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
    **sampling,
) -> list[list[int]]:
    """The new token ids for each rendered prompt, in input order: greedy, or sampled with the
    `model.generate` options in `sampling` (do_sample, temperature, top_p, ...).

    Prompts are sorted by length so a batch pads little, and padded on the left so every row's
    generation starts right after its own prompt. The token ids go to the model's device, and
    generation runs under `autocast` (bf16 on CUDA, fp32 on CPU).
    """
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [prompts[i] for i in idx],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(device)
        with autocast(device):
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
                **(sampling or {"do_sample": False}),
            )
        new = gen[:, enc["input_ids"].shape[1] :].cpu()
        for i, row in zip(idx, new, strict=True):
            out[i] = row.tolist()
    return out
