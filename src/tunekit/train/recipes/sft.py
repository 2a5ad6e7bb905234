"""Supervised fine-tuning (`task: sft`): the recipe, top to bottom.

Run as: `tunekit train CONFIG.yaml` (task: sft is the default) or `tunekit.fine_tune(load_config(...))`.

the run session (train/session.py: data check, run dir, splits) -> model as `method` says ->
tokenize (loss on assistant tokens only) -> the shared loop (train/loop.py) -> save the adapter or
model -> summary.

With `data.streaming` (large data sets) the train split is an `ExampleStream` rather than a list,
checked and split one row at a time (data/stream.py), and tokenized into a memory-mapped token
store (`tokenize_stored`) that the loop indexes like the list it otherwise gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunekit.data.stream import ExampleStream
from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunekit.errors import TunekitError
from tunekit.models import load_tokenizer, resolve_model
from tunekit.tasks import Task
from tunekit.train import distributed
from tunekit.train.batching import collate, sequential_batches
from tunekit.train.loop import Recipe, run_loop
from tunekit.train.loss import loss_sum
from tunekit.train.self_replay import replay_for_training
from tunekit.train.setup import build_model, init_from_run, save_trained
from tunekit.train.tokens import tokenize_cached, tokenize_stored

if TYPE_CHECKING:
    from tunekit.train.session import RunSession


def train_sft(run: RunSession) -> Path:
    """Fine-tune `cfg.model` (full, LoRA, DoRA or QLoRA) on the run's splits; returns the run directory."""
    cfg, splits, tc = run.cfg, run.splits, run.cfg.train
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.chat_template)
    # data.replay (train/self_replay.py): general examples that join the training examples only (the
    # split files stay the task's). Drawn before the model is built: `self` may load the base to answer.
    extra = replay_for_training(cfg, tokenizer, model_path, len(splits["train"]), run.quiet)
    n_replay = len(extra)
    model, params = build_model(cfg, model_path, tokenizer=tokenizer, quiet=run.quiet)
    if tc.init_from is not None and not run.resume:
        init_from_run(model, tc.init_from, cfg.method, run.quiet)

    if isinstance(splits["train"], ExampleStream):
        # data.streaming: the train split goes from data/train.jsonl into a memory-mapped token store.
        train_data = tokenize_stored(
            tokenizer, splits["train"], extra, tc.max_length, "train", run.dir, run.quiet
        )
        lengths = train_data.lengths  # (examples,) int32
    else:
        train_data = tokenize_cached(tokenizer, splits["train"] + extra, tc.max_length, "train", run.dir)
        lengths = [len(t.input_ids) for t in train_data]
    val_data = tokenize_cached(tokenizer, splits["validation"], tc.max_length, "validation", run.dir)
    if not len(train_data):
        raise TunekitError("data.train: no example has target tokens within train.max_length")
    pad_id = tokenizer.pad_token_id
    recipe = Recipe(
        train=train_data,
        validation=val_data,
        lengths=lengths,
        collate=lambda items: collate(items, pad_id),
        step=lambda m, batches: (accumulate_gradients(m, batches, tc.loss_chunk_tokens), {}),
        validate=lambda m, data: {"val_loss": evaluate_loss(m, data, pad_id, cfg.eval.batch_size)},
    )
    run.announce(model, params, len(train_data), len(val_data))
    result = run_loop(model, params, recipe, tc, run.dir, run.quiet, resume=run.resume)
    saved = save_trained(model, tokenizer, run.dir, cfg.method)
    run.finish(result, model_path=model_path, params=params, saved=saved, replay_examples=n_replay)
    return run.dir


def accumulate_gradients(
    model, batches: list[dict[str, torch.Tensor]], loss_chunk: int | None = None
) -> float:
    """Forward and backward over the micro-batches of one optimizer step; returns the mean loss.
    loss_chunk: `train.loss_chunk_tokens` (see loss.ChunkedLinearCrossEntropy).

    Each micro-batch's summed loss is divided by the target tokens of the whole step, so k
    micro-batches of n examples give the same gradient as one batch of k*n (tested).
    """
    n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    # Several processes: normalise by the step's global target count (per process), so averaging
    # the gradients across processes gives exactly the one-process gradient.
    n_targets = distributed.sum_int(n_targets) / distributed.world()
    total = 0.0
    for b in batches:
        s, _ = loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"], chunk=loss_chunk)
        (s / n_targets).backward()
        total += float(s.detach())
    return total / n_targets


@torch.no_grad()
def evaluate_loss(model, data: list[TokenizedExample], pad_id: int, batch_size: int = 16) -> float:
    """Mean per-token loss over `data` (dropout off)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for idx in sequential_batches(len(data), batch_size):
        b = collate([data[i] for i in idx], pad_id)
        s, k = loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"])
        total, n = total + float(s), n + k
    model.train(was_training)
    return total / max(n, 1)


TASK = Task(
    name="sft",
    summary="supervised fine-tuning: the language model, loss on assistant tokens",
    data="conversations",
    recipe=train_sft,
    evaluation="tunekit.eval.evaluate:evaluate_generation",
    generative=True,
    eval_options=("few_shot", "probe", "metrics", "label_scoring"),
    streaming=True,
    loss_chunked=True,
    init_from=True,
    replay=True,
)
