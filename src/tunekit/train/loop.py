"""The optimisation loop every gradient-based task shares: sft, classify, reward and dpo.

A task hands the loop a `Recipe`: its tokenized items, how to batch them, and how to compute the
loss of one optimizer step. The loop owns everything else, identically for every task: epochs and
length-grouped batches, AdamW, warmup + decay, clipping, the NaN guard, validation, metrics.jsonl
and the progress display.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tunekit.config import TrainConfig
from tunekit.console import err as console
from tunekit.errors import TunekitError
from tunekit.train.batching import length_grouped_batches


@dataclass
class Recipe:
    """What a training task gives the loop."""

    train: list
    validation: list
    lengths: list[int]  # tokens of each train item: batches group similar lengths
    collate: Callable[[list], dict[str, torch.Tensor]]
    # Forward + backward over the micro-batches of one optimizer step; returns the step's mean loss
    # and any extra per-step metrics (e.g. {"accuracy": ...}).
    step: Callable[[Any, list[dict[str, torch.Tensor]]], tuple[float, dict[str, float]]]
    # Validation metrics with the model in eval mode, e.g. {"val_loss": ..., "val_accuracy": ...}.
    validate: Callable[[Any, list], dict[str, float]] | None = None
    n_tokens: Callable[[dict[str, torch.Tensor]], int] = field(
        default=lambda b: int(b["attention_mask"].sum())
    )


@dataclass
class LoopResult:
    steps: int
    epochs: float
    steps_per_epoch: int
    final_loss: float
    val: dict[str, float]
    tokens: int
    train_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)


def lr_at(step: int, total: int, warmup: int, peak: float, kind: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return peak * (1 - progress)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def plan_steps(n_items: int, tc: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps): an epoch is ceil(N / (batch_size * grad_accum))."""
    micro_per_epoch = math.ceil(n_items / tc.batch_size)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / tc.grad_accum))
    return steps_per_epoch, tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = [p.grad.norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def run_loop(
    model, params: list[torch.Tensor], recipe: Recipe, tc: TrainConfig, run_dir: Path, quiet: bool = False
) -> LoopResult:
    """Train `params` of `model` on `recipe` as `tc` says; logs to run_dir/metrics.jsonl."""
    steps_per_epoch, total_steps = plan_steps(len(recipe.train), tc)
    warmup = int(tc.warmup_ratio * total_steps)
    eval_every = tc.eval_every or steps_per_epoch
    opt = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)

    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    micro_batches: list[list[int]] = []
    epoch = step = tokens_total = 0
    t_train, loss, last_val = 0.0, float("nan"), {}
    window: dict[str, float] = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )
    with progress:
        bar = progress.add_task("train", total=total_steps, info="")
        while step < total_steps:
            if len(micro_batches) < tc.grad_accum:
                # A new epoch: reshuffle with a seed derived from the epoch, so any run is replayable.
                micro_batches += length_grouped_batches(recipe.lengths, tc.batch_size, tc.seed + epoch)
                epoch += 1
            group = [micro_batches.pop(0) for _ in range(tc.grad_accum)]
            t0 = time.perf_counter()
            batches = [recipe.collate([recipe.train[i] for i in idx]) for idx in group]
            loss, extra = recipe.step(model, batches)
            lr = lr_at(step, total_steps, warmup, tc.learning_rate, tc.lr_scheduler)
            for g in opt.param_groups:
                g["lr"] = lr
            grad_norm = _grad_norm(params, tc.max_grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TunekitError(
                    f"step {step + 1}: the loss or gradient is not finite (loss={loss}, grad_norm={grad_norm}). "
                    "Lower train.learning_rate or check the data for broken examples."
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_tokens = sum(recipe.n_tokens(b) for b in batches)
            dt = time.perf_counter() - t0
            tokens_total += n_tokens
            t_train += dt
            for k, v in (("loss", loss), ("n", 1), ("tokens", n_tokens), ("time", dt)):
                window[k] += v
            for k, v in extra.items():
                window[k] = window.get(k, 0.0) + v
            record = None
            if step % tc.log_every == 0 or step == total_steps:
                n = window.pop("n")
                record = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "loss": window.pop("loss") / n,
                    "learning_rate": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": window.pop("tokens") / window.pop("time"),
                } | {k: v / n for k, v in window.items()}
                window = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
            if recipe.validation and recipe.validate and (step % eval_every == 0 or step == total_steps):
                was_training = model.training
                model.eval()
                with torch.no_grad():
                    last_val = recipe.validate(model, recipe.validation)
                model.train(was_training)
                record = (record or {"step": step, "epoch": round(step / steps_per_epoch, 4)}) | last_val
                if not quiet:
                    shown = ", ".join(
                        f"{k.replace('val_', 'validation ')} {v:.4f}" for k, v in last_val.items()
                    )
                    progress.console.print(f"step {step}: train loss {loss:.4f}, {shown}")
            if record:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            info = f"loss {loss:.4f}  {tokens_total / t_train:.0f} tok/s"
            progress.update(bar, advance=1, info=info)
            if not quiet and not console.is_terminal and (step % max(1, total_steps // 10) == 0):
                # Logs and CI have no live bar: print a line at every tenth of the run instead.
                console.print(f"step {step}/{total_steps}: {info}, {t_train:.0f}s")

    return LoopResult(
        steps=step,
        epochs=round(step / steps_per_epoch, 4),
        steps_per_epoch=steps_per_epoch,
        final_loss=loss,
        val=last_val,
        tokens=tokens_total,
        train_seconds=t_train,
    )
