"""Continued pre-training on raw text (`task: pretrain`): the recipe, top to bottom.

Run as: `tunekit train examples/pretrain_wikisql.yaml` (data of `{"text": ...}` rows).

the run session (data check, run dir, splits) -> model as `method` says (full or lora) -> each
document tokenized as it is (no chat template), cut into chunks of train.max_length and packed into
rows of that length (data/packing.py), attention kept within each document -> the shared loop
(train/loop.py), loss on every token after each document's first -> save -> summary.

Why a task of its own rather than sft on text rows: sft renders conversations through the chat
template and learns the answers; here there is no template and no prompt, the rows are packed across
documents, and the evaluation is perplexity on held-out documents (eval/perplexity.py), not answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunekit.console import err as console
from tunekit.data.packing import Chunk, PackedRow, document_text, pack_documents
from tunekit.data.tokenize import IGNORE_INDEX
from tunekit.errors import TunekitError
from tunekit.models import load_tokenizer, resolve_model
from tunekit.models.device import autocast, model_device
from tunekit.models.load import unwrap_peft
from tunekit.tasks import Task
from tunekit.train import distributed
from tunekit.train.batching import sequential_batches
from tunekit.train.loop import Recipe, run_loop
from tunekit.train.loss import loss_sum
from tunekit.train.setup import build_model, save_trained
from tunekit.train.speed import padding_free

if TYPE_CHECKING:
    from tunekit.train.session import RunSession


def train_pretrain(run: RunSession) -> Path:
    """Train `cfg.model` (full or LoRA) on the run's documents; returns the run directory."""
    cfg, splits, tc = run.cfg, run.splits, run.cfg.train
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.chat_template)
    model, params = build_model(cfg, model_path, tokenizer=tokenizer, quiet=run.quiet)
    train_rows, train_stats = pack_documents(tokenizer, documents(splits["train"]), tc.max_length)
    val_rows, val_stats = pack_documents(tokenizer, documents(splits["validation"]), tc.max_length)
    if not train_rows:
        raise TunekitError("data.train: no document to train on")
    if not run.quiet and distributed.is_main():
        console.print(train_stats.line("train"))
        console.print(val_stats.line("validation"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    check_packing(model, pad_id)
    recipe = Recipe(
        train=train_rows,
        validation=val_rows,
        lengths=[len(r.input_ids) for r in train_rows],
        collate=lambda rows: collate_rows(rows, pad_id),
        step=lambda m, batches: (accumulate_gradients(m, batches, tc.loss_chunk_tokens), {}),
        validate=lambda m, rows: {"val_loss": evaluate_rows(m, rows, pad_id, cfg.eval.batch_size)},
        n_tokens=lambda b: int(b["real"].sum()),
    )
    run.announce(model, params, len(train_rows), len(val_rows))
    result = run_loop(model, params, recipe, tc, run.dir, run.quiet, resume=run.resume)
    saved = save_trained(model, tokenizer, run.dir, cfg.method)
    packing = {"train": train_stats.to_dict(), "validation": val_stats.to_dict()}
    run.finish(result, model_path=model_path, params=params, saved=saved, packing=packing)
    return run.dir


def documents(examples) -> list[str]:
    """The texts of a split's document rows (the run session checked that every row is one)."""
    return [document_text(ex) for ex in examples]


def collate_rows(rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) input_ids, labels, position_ids and `real` (1 on tokens, 0 on padding), T the longest
    row. The padding after a row's last chunk is a segment of its own (position ids from 0, no
    labels), so nothing attends across it either."""
    width = max(len(r.input_ids) for r in rows)
    out = {"input_ids": [], "labels": [], "position_ids": [], "real": []}
    for r in rows:
        fill = width - len(r.input_ids)
        out["input_ids"].append(r.input_ids + [pad_id] * fill)
        out["labels"].append(r.labels + [IGNORE_INDEX] * fill)
        out["position_ids"].append(r.position_ids + list(range(fill)))
        out["real"].append([1] * len(r.input_ids) + [0] * fill)
    return {k: torch.tensor(v) for k, v in out.items()}


def packed_inputs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input_ids, labels, forward kwargs) of a batch of packed rows, attention within each segment.

    With train.padding_free (train/speed/padding_free.py) the batch's real tokens run as one (1, N)
    row, segment by segment; otherwise as (B, T) rows whose restarting position ids make transformers
    build the block-diagonal causal mask. Both give each document's own logits (tested, and checked
    on the run's own model by `check_packing`)."""
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    if not padding_free.enabled(model):
        return ids, labels, {"position_ids": positions}
    real = batch["real"].bool()
    ids, labels, positions = ids[real][None], labels[real][None], positions[real][None]  # (1, N)
    bounds = (positions[0] == 0).nonzero().flatten().tolist() + [positions.shape[1]]
    return ids, labels, {"position_ids": positions, "tunekit_segments": bounds}


def packed_loss_sum(
    model, batch: dict[str, torch.Tensor], chunk: int | None = None
) -> tuple[torch.Tensor, int]:
    """Summed loss over a batch of packed rows (`packed_inputs`), and its target count."""
    ids, labels, kwargs = packed_inputs(model, batch)
    return loss_sum(model, ids, None, labels, chunk, **kwargs)


@torch.no_grad()
def check_packing(model, pad_id: int, tolerance: float = 0.05) -> None:
    """Two short documents packed in one row must give the logits each gives alone, on the run's own
    model and kernel: its attention honours the restarting position ids. Two small forwards before
    training, so an architecture whose mask ignores them stops the run (a TunekitError naming the
    model) rather than training across documents. tolerance: of the logits' largest magnitude,
    room for bf16 rounding on CUDA; a leak moves them by far more."""
    first, second = list(range(10, 22)), list(range(30, 37))  # (12 and 7 ordinary token ids)
    row = PackedRow()
    row.add(Chunk(0, first, True))
    row.add(Chunk(1, second, True))
    was_training, device = model.training, model_device(model)
    model.eval()
    with autocast(device):
        ids, _, kwargs = packed_inputs(model, collate_rows([row], pad_id))
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        packed = model(input_ids=ids.to(device), use_cache=False, **kwargs).logits[0].float()
        alone = [model(input_ids=torch.tensor([d], device=device)).logits[0].float() for d in (first, second)]
    model.train(was_training)
    want = torch.cat(alone)
    off = float((packed - want).abs().max())
    if off > tolerance * float(want.abs().max()):
        name = type(unwrap_peft(model)).__name__
        raise TunekitError(
            f"task: pretrain: {name} attends across the documents of a packed row (logits off by {off:.3g}): "
            "its attention mask ignores restarting position ids; use a model whose mask follows them "
            "(transformers' create_causal_mask), or train.padding_free: true on a verified architecture"
        )


def accumulate_gradients(
    model, batches: list[dict[str, torch.Tensor]], loss_chunk: int | None = None
) -> float:
    """Forward and backward over the micro-batches of one optimizer step; returns the mean loss per
    target token. As sft's: each micro-batch's summed loss is divided by the step's global target count."""
    n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    n_targets = distributed.sum_int(n_targets) / distributed.world()
    total = 0.0
    for b in batches:
        s, _ = packed_loss_sum(model, b, loss_chunk)
        (s / n_targets).backward()
        total += float(s.detach())
    return total / n_targets


@torch.no_grad()
def evaluate_rows(model, rows: list[PackedRow], pad_id: int, batch_size: int = 16) -> float:
    """Mean per-token loss over packed rows (dropout off)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for idx in sequential_batches(len(rows), batch_size):
        s, k = packed_loss_sum(model, collate_rows([rows[i] for i in idx], pad_id))
        total, n = total + float(s), n + k
    model.train(was_training)
    return total / max(n, 1)


TASK = Task(
    name="pretrain",
    summary="continued pre-training on raw text: documents packed into rows, loss on every token",
    data="documents",
    recipe=train_pretrain,
    evaluation="tunekit.eval.perplexity:evaluate_perplexity",
    generative=True,
    methods=("full", "lora"),
    multi_process=False,
    loss_chunked=True,
)
