"""Reward model (`task: reward`): learn a scalar score that prefers the chosen answer, top to bottom.

Run as: `tunekit train examples/reward_pairs.yaml` or `tunekit.fine_tune(load_config(...))`.

A preference pair (prompt, chosen, rejected) becomes two full conversations, rendered with the
model's chat template. One score head (num_labels=1) reads each conversation's last token, and the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) pushes the chosen score above the rejected
one. Chosen and rejected of a pair go through the model in the same (2B, T) forward pass. Validation reports pairwise accuracy (how often the
chosen answer scores higher) and the loss.

The scoring helpers at the bottom (`load_reward_model`, `score_texts`, `pairwise_accuracy`) are
what evaluation and RL (train/recipes/rl.py, eval/preference.py) use to read a trained reward model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tunekit.data.example import Example, Message
from tunekit.data.needs import require
from tunekit.data.tokenize import render
from tunekit.errors import TunekitError
from tunekit.models import load_tokenizer, resolve_model
from tunekit.models.device import autocast, model_device, to_device
from tunekit.tasks import Task
from tunekit.train.loop import Recipe, run_loop
from tunekit.train.setup import build_model, load_trained, save_trained

if TYPE_CHECKING:
    from tunekit.train.session import RunSession


def train_reward(run: RunSession) -> Path:
    """Train a reward model (full, LoRA, DoRA or QLoRA) on preference pairs; returns the run directory."""
    cfg, splits, run_dir, quiet = run.cfg, run.splits, run.dir, run.quiet

    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.chat_template)
    model, params = build_model(cfg, model_path, head="score", num_labels=1, tokenizer=tokenizer, quiet=quiet)

    tc = cfg.train
    train_pairs = [tokenize_pair(tokenizer, ex, tc.max_length) for ex in splits["train"]]
    val_pairs = [tokenize_pair(tokenizer, ex, tc.max_length) for ex in splits["validation"]]
    pad_id = tokenizer.pad_token_id
    recipe = Recipe(
        train=train_pairs,
        validation=val_pairs,
        lengths=[max(len(c), len(r)) for c, r in train_pairs],
        collate=lambda pairs: collate_pairs(pairs, pad_id),
        step=bradley_terry_step,
        validate=lambda m, pairs: validate_pairs(m, pairs, pad_id, cfg.eval.batch_size),
    )
    run.announce(model, params, len(train_pairs), len(val_pairs))
    result = run_loop(model, params, recipe, tc, run_dir, quiet, resume=run.resume)
    saved = save_trained(model, tokenizer, run_dir, cfg.method)
    run.finish(result, model_path=model_path, params=params, saved=saved)
    return run_dir


def encode(tokenizer, messages, max_length: int | None) -> list[int]:
    """Token ids of a whole rendered conversation. Too long: keep the last `max_length` tokens,
    because the answer (the part that is scored) sits at the end."""
    ids = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length else ids


def tokenize_pair(tokenizer, ex: Example, max_length: int | None) -> tuple[list[int], list[int]]:
    prompt, chosen, rejected = ex.pair()
    return encode(tokenizer, prompt + chosen, max_length), encode(tokenizer, prompt + rejected, max_length)


def pad_right(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) input_ids and attention_mask, padded on the right. The score head reads the last
    token that is not `pad_id`."""
    width = max(len(r) for r in rows)
    ids = [r + [pad_id] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def collate_pairs(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One (2B, T) batch: rows 0..B-1 are the chosen conversations, rows B..2B-1 the rejected."""
    return pad_right([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), from one forward pass over the (2B, T) batch, on the
    model's device (the batch moves there; the forward runs under `autocast`)."""
    scores = _scores(model, batch)
    half = scores.shape[0] // 2
    return scores[:half].float(), scores[half:].float()


def _scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) score-head outputs for a (B, T) batch, on the model's device."""
    device = model_device(model)
    batch = to_device(batch, device)
    with autocast(device):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


def bradley_terry_step(model, batches: list[dict[str, torch.Tensor]]) -> tuple[float, dict[str, float]]:
    """Forward + backward over one optimizer step's micro-batches. The loss is the mean over every
    pair of the step, so gradient accumulation matches one big batch."""
    n_pairs = sum(b["input_ids"].shape[0] // 2 for b in batches)
    total, correct = 0.0, 0
    for b in batches:
        r_c, r_r = pair_rewards(model, b)
        loss = -F.logsigmoid(r_c - r_r).sum()
        (loss / n_pairs).backward()
        total += float(loss.detach())
        correct += int((r_c > r_r).sum())
    return total / n_pairs, {"accuracy": correct / n_pairs}


@torch.no_grad()
def validate_pairs(model, pairs, pad_id: int, batch_size: int) -> dict[str, float]:
    """Validation loss and pairwise accuracy (a tie counts as wrong)."""
    total, correct = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        r_c, r_r = pair_rewards(model, collate_pairs(pairs[i : i + batch_size], pad_id))
        total += float(-F.logsigmoid(r_c - r_r).sum())
        correct += int((r_c > r_r).sum())
    n = max(len(pairs), 1)
    return {"val_loss": total / n, "val_accuracy": correct / n}


# ---------------------------------------------------------------------------------------------
# Reading a trained reward model: what evaluation and RL use.


def load_reward_model(run_dir: str | Path):
    """The reward model of a `task: reward` run, in eval mode, and its tokenizer."""
    from tunekit.runs.directory import load_run_config

    cfg = load_run_config(run_dir)
    if cfg.task != "reward":
        raise TunekitError(f"{run_dir}: a task: {cfg.task} run, not a reward model (task: reward)")
    model, tokenizer, _ = load_trained(run_dir, head="score")
    return model, tokenizer


def _messages(conversation) -> list[Message]:
    if isinstance(conversation, Example):
        return list(conversation.messages)
    return [Message(m["role"], m["content"]) for m in conversation]


@torch.no_grad()
def score_texts(
    model, tokenizer, conversations, batch_size: int = 16, max_length: int | None = None
) -> list[float]:
    """The reward of each full conversation (prompt + response), rendered with the chat template.

    `conversations` is a list of message lists ([{role, content}, ...]) or of Examples (their
    `messages`: the prompt and the chosen answer).
    """
    was_training = model.training
    model.eval()
    rows = [encode(tokenizer, _messages(c), max_length) for c in conversations]
    scores: list[float] = []
    for i in range(0, len(rows), batch_size):
        out = _scores(model, pad_right(rows[i : i + batch_size], tokenizer.pad_token_id))
        scores += [float(s) for s in out.float().cpu()]
    model.train(was_training)
    return scores


def pairwise_accuracy(
    model, tokenizer, examples: list[Example], batch_size: int = 16, max_length: int | None = None
) -> dict[str, float]:
    """On preference Examples: how often the chosen answer outscores the rejected one (ties are
    wrong), and the mean margin r_chosen - r_rejected."""
    require("pairs", examples, "evaluation", "reward")
    chosen, rejected = [], []
    for ex in examples:
        prompt, c, r = ex.pair()
        chosen.append(prompt + c)
        rejected.append(prompt + r)
    as_dicts = [[{"role": m.role, "content": m.content} for m in conv] for conv in chosen + rejected]
    scores = score_texts(model, tokenizer, as_dicts, batch_size, max_length)
    n = len(examples)
    margins = [scores[i] - scores[n + i] for i in range(n)]
    return {
        "accuracy": sum(m > 0 for m in margins) / max(n, 1),
        "mean_margin": sum(margins) / max(n, 1),
    }


TASK = Task(
    name="reward",
    summary="a reward model: a one-output score head trained on preference pairs (Bradley-Terry)",
    data="pairs",
    recipe=train_reward,
    evaluation="tunekit.eval.preference:evaluate_reward",
    generative=False,
)
