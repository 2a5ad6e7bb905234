"""Batches for causal-LM training: length-grouped, dynamically padded, deterministic by seed."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Index batches of similar lengths, so little compute is spent on padding.

    Shuffle, cut into mega-batches of 32 batches, sort each by length, cut into batches and shuffle
    the batches: the order stays random, but each batch holds neighbours in length.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 32
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda k: lengths[k], reverse=True)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[TokenizedExample], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest example: input_ids, attention_mask and labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)

    def pad(row: list[int], value: int) -> list[int]:
        fill = [value] * (width - len(row))
        return fill + row if left else row + fill

    ids = [pad(e.input_ids, pad_id) for e in examples]
    mask = [pad([1] * len(e.input_ids), 0) for e in examples]
    labels = [pad(e.labels, IGNORE_INDEX) for e in examples]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def sequential_batches(n: int, batch_size: int) -> Iterator[list[int]]:
    for i in range(0, n, batch_size):
        yield list(range(i, min(n, i + batch_size)))
