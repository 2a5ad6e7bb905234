"""Text classification (`task: classify`): a label head on the model, top to bottom.

Run as: `tunekit train examples/banking77_classifier.yaml` or `tunekit.fine_tune(load_config(...))`.

Unlike `task: sft` on the same data (which teaches the model to *write* the label), this puts a
sequence-classification head (one output per label) on the model: one forward pass per text, no
generation, and every prediction is a valid label. The input is the prompt's text (for the
classification format, the `text` column); the head reads the last token, which in a causal
model has seen the whole text. Cross-entropy over the labels; validation loss and accuracy in the
loop. The label order is written to labels.json: output i of the head is labels[i].
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tunekit.console import err as console
from tunekit.data.example import Example
from tunekit.errors import DataError
from tunekit.models import load_tokenizer, resolve_model
from tunekit.models.device import autocast, model_device
from tunekit.tasks import Task
from tunekit.train.loop import Recipe, run_loop
from tunekit.train.setup import build_model, save_trained, write_labels

if TYPE_CHECKING:
    from tunekit.train.session import RunSession


def train_classify(run: RunSession) -> Path:
    """Train a classifier (full, LoRA, DoRA or QLoRA) on labelled text; returns the run directory."""
    cfg, splits, run_dir, quiet = run.cfg, run.splits, run.dir, run.quiet
    labels = cfg.data.labels or sorted({ex.label for ex in splits["train"]})
    check_label_set(splits, labels)
    write_labels(run_dir, labels)

    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.chat_template)
    model, params = build_model(
        cfg, model_path, head="score", num_labels=len(labels), labels=labels, tokenizer=tokenizer, quiet=quiet
    )

    tc = cfg.train
    index = {lab: i for i, lab in enumerate(labels)}
    train = encode_all(tokenizer, splits["train"], index, tc.max_length, "train", quiet)
    val = encode_all(tokenizer, splits["validation"], index, tc.max_length, "validation", quiet)
    pad_id = tokenizer.pad_token_id
    recipe = Recipe(
        train=train,
        validation=val,
        lengths=[len(ids) for ids, _ in train],
        collate=lambda items: collate_labelled(items, pad_id),
        step=cross_entropy_step,
        validate=lambda m, data: validate_labelled(m, data, pad_id, cfg.eval.batch_size),
        best_metric="val_accuracy",
    )
    run.announce(model, params, len(train), len(val))
    if not quiet:
        console.print(f"classify: {len(labels)} labels (written to {run_dir / 'labels.json'})")
    result = run_loop(model, params, recipe, tc, run_dir, quiet, resume=run.resume)
    saved = save_trained(model, tokenizer, run_dir, cfg.method)
    run.finish(result, model_path=model_path, params=params, saved=saved, labels=len(labels))
    return run_dir


def check_label_set(splits: dict[str, list[Example]], labels: list[str]) -> None:
    """A validation or test label the head has no output for could never be predicted: say so now."""
    known = set(labels)
    for name, examples in splits.items():
        unknown = [ex for ex in examples if ex.label not in known]
        if unknown:
            ex = unknown[0]
            raise DataError(
                [
                    f"{ex.where}: label {ex.label!r} ({len(unknown)} {name} example(s)) is not among the "
                    f"{len(labels)} labels of the train split; add it to data.labels and to the train data"
                ],
                header="data: labels outside the label set",
            )


def input_text(ex: Example) -> str:
    """What the classifier reads: the prompt's text (the user's message for classification data)."""
    return "\n\n".join(m.content for m in ex.prompt)


def encode(tokenizer, ex: Example, max_length: int) -> list[int]:
    """Token ids of the input text, cut at max_length (an empty text reads as one eos token)."""
    return tokenizer(input_text(ex), add_special_tokens=False)["input_ids"][:max_length] or [
        tokenizer.eos_token_id
    ]


def encode_all(tokenizer, examples, index: dict[str, int], max_length: int, name: str, quiet: bool):
    """(token ids, label index) per example; texts longer than max_length are cut (reported)."""
    out, cut = [], 0
    for ex in examples:
        ids = encode(tokenizer, ex, max_length + 1)
        cut += len(ids) > max_length
        out.append((ids[:max_length], index[ex.label]))
    if cut and not quiet:
        console.print(f"[yellow]{name}: {cut} text(s) longer than train.max_length={max_length} were cut")
    return out


def collate_labelled(items: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) input_ids and attention_mask padded on the right, and (B,) label indices. The head
    reads the last token that is not `pad_id`."""
    width = max(len(ids) for ids, _ in items)
    return {
        "input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in items]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in items]),
        "labels": torch.tensor([y for _, y in items]),
    }


def class_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, num_labels) logits in fp32, on the model's device (the inputs move there; the forward
    runs under `autocast`: bf16 on CUDA, fp32 on CPU)."""
    device = model_device(model)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (B, T)
    with autocast(device):
        return model(input_ids=ids, attention_mask=mask).logits.float()


def cross_entropy_step(model, batches: list[dict[str, torch.Tensor]]) -> tuple[float, dict[str, float]]:
    """Forward + backward over one optimizer step's micro-batches; the loss is the mean over every
    example of the step, so gradient accumulation matches one big batch."""
    n = sum(len(b["labels"]) for b in batches)
    total, correct = 0.0, 0
    for b in batches:
        logits = class_logits(model, b)
        labels = b["labels"].to(logits.device)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        (loss / n).backward()
        total += float(loss.detach())
        correct += int((logits.argmax(-1) == labels).sum())
    return total / n, {"accuracy": correct / n}


@torch.no_grad()
def validate_labelled(model, data, pad_id: int, batch_size: int) -> dict[str, float]:
    total, correct = 0.0, 0
    for i in range(0, len(data), batch_size):
        b = collate_labelled(data[i : i + batch_size], pad_id)
        logits = class_logits(model, b)
        labels = b["labels"].to(logits.device)
        total += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    n = max(len(data), 1)
    return {"val_loss": total / n, "val_accuracy": correct / n}


TASK = Task(
    name="classify",
    summary="a label head on the model: one forward pass per text, no generation",
    data="labels",
    recipe=train_classify,
    evaluation="tunekit.eval.classify:evaluate_classifier",
    generative=False,
)
