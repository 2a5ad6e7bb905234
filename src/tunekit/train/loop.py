"""The optimisation loop every gradient-based task shares: sft, classify, reward and dpo.

A task hands the loop a `Recipe`: its tokenized items, how to batch them, and how to compute the
loss of one optimizer step. The loop owns everything else, identically for every task: epochs and
length-grouped batches, AdamW, warmup + decay, clipping, the NaN guard, validation, metrics.jsonl
and the progress display.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tunekit.config import TrainConfig, identity_hash, load_config, run_identity
from tunekit.console import err as console
from tunekit.errors import Interrupted, TunekitError
from tunekit.io import atomic_write_text
from tunekit.runs import trackers
from tunekit.runs.directory import append_metrics
from tunekit.train import distributed, signals
from tunekit.train.batching import length_grouped_batches
from tunekit.train.budget import BudgetClock, BudgetPlan, measure_validation, notify_validation, plan_budget
from tunekit.train.checkpoint import (
    checkpoint_bytes,
    ensure_free_space,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


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
    # The validation metric that picks the best weights (early stopping keeps them): a classifier is
    # judged by its accuracy, which can still rise while its loss does (confident mistakes).
    best_metric: str = "val_loss"


@dataclass
class LoopResult:
    steps: int
    epochs: float
    steps_per_epoch: int
    final_loss: float
    val: dict[str, float]
    tokens: int
    train_seconds: float
    stopped_early: bool = False  # train.early_stopping_patience ended the run
    # The best validation (recipe.best_metric): its weights are kept when stopping early.
    best_step: int | None = None
    best_val_loss: float | None = None
    best_metric: dict[str, float] | None = None  # {recipe.best_metric: its best value}
    budget: dict | None = None  # train.time_budget's plan and outcome (train/budget.py)

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
    """(steps per epoch, total optimizer steps): an epoch is ceil(N / global batch), the global batch
    being batch_size x grad_accum x the number of processes."""
    steps_per_epoch = max(1, math.ceil(n_items / (tc.batch_size * tc.grad_accum * distributed.world())))
    return steps_per_epoch, tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))


def _validate(model, recipe: Recipe, items: list, fsdp: bool) -> dict[str, float]:
    """The recipe's validation metrics over `items`, the model in eval mode and without gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = recipe.validate(model, items)
    model.train(was_training)
    if fsdp:
        distributed.reshard(model)  # a no-grad forward leaves the root gathered
    return metrics


def _budget_plan(
    clock: BudgetClock, step: int, total_steps: int, every: tuple[int, int], save_every: int
) -> BudgetPlan | None:
    """Plan a budgeted run from its measured times, or re-plan it (after a validation or a checkpoint
    that took longer than planned): None when the plan stands. A re-plan keeps the cadence and only
    ever ends the run sooner. Every rank plans from the same (averaged) figures, so all stop at the
    same step. `every` is (steps per epoch, the configured validation cadence)."""
    step_s, val_s, ckpt_s = clock.figures()
    step_s, ckpt_s, elapsed = (distributed.mean(x) for x in (step_s, ckpt_s, clock.elapsed()))
    val_s = None if val_s is None else distributed.mean(val_s)
    old = clock.plan
    plan = plan_budget(
        clock.budget_s,
        elapsed,
        step,
        step_s,
        val_s,
        old.config_steps if old else total_steps,
        *every,
        ckpt_s=ckpt_s,
        save_every=save_every,
        eval_every=old.eval_every if old else None,
        pending=old is None,  # a re-plan comes after this step's validation and checkpoint
    )
    if old is not None:
        if plan.total_steps >= old.total_steps:
            return None
        plan.measured_at, clock.replans = old.measured_at, clock.replans + 1
    clock.plan = plan
    return plan


def _follow(plan: BudgetPlan, tc: TrainConfig, eval_every: int) -> tuple[int, int, int]:
    """(total steps, warmup steps, validation cadence) of a budget's plan: the learning-rate schedule is
    rebuilt on the plan's last step, so its decay ends there instead of being cut off mid-way."""
    return plan.total_steps, int(tc.warmup_ratio * plan.total_steps), plan.eval_every or eval_every


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The global L2 norm of the gradients, after clipping them to `max_norm` when it is set."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    # FSDP: each rank holds a shard of every gradient (a DTensor); the norm is over all the shards.
    norm = distributed.full_tensor(torch.nn.utils.get_total_norm(grads))
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step`: a resumed run rewrites what came after its checkpoint. A line
    that does not parse (half written by a version that did not append whole lines, killed or out
    of disk mid-line) is dropped; the file is replaced atomically."""
    if not path.is_file():
        atomic_write_text(path, "")
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _tokenizer_bytes(model) -> int:
    """The tokenizer files the final save copies next to the weights, measured in the model's folder;
    a generous allowance when the model does not come from a folder."""
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if not folder.is_dir():
        return 64 * 2**20
    names = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template", "spiece")
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.startswith(names))


def needed_bytes(model, params, tc: TrainConfig, total_steps: int, n_items: int) -> int:
    """The disk a run fills from step 1 to its end: the kept checkpoints plus the one being written
    (weights, AdamW's moments, and state.json holding the data order still to come), the final
    model (the trained weights and the tokenizer), metrics.jsonl and the summary."""
    kept = min(tc.save_total_limit or total_steps, total_steps) + 1
    per_checkpoint = checkpoint_bytes(params) + 16 * n_items + 2**20
    weights = sum(p.numel() * p.element_size() for p in params)
    return kept * per_checkpoint + weights + _tokenizer_bytes(model) + 512 * total_steps + 2**20


def _identity(run_dir: Path, tc: TrainConfig) -> dict | None:
    """The run's identity (config.run_identity) from the config.yaml its session wrote, with this
    run's global batch; None outside a run directory."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    return run_identity(load_config(path), tc.batch_size * tc.grad_accum * distributed.world())


def run_loop(
    model,
    params: list[torch.Tensor],
    recipe: Recipe,
    tc: TrainConfig,
    run_dir: Path,
    quiet: bool = False,
    resume: bool = False,
) -> LoopResult:
    """Train `params` of `model` on `recipe` as `tc` says; logs to run_dir/metrics.jsonl.

    Checkpoints go to run_dir/checkpoints every `tc.save_steps` (default: each epoch) and at the end.
    With `resume`, the newest complete checkpoint restores the weights, optimizer, RNGs and data
    order, so the losses after it equal an uninterrupted run's.
    """
    steps_per_epoch, total_steps = plan_steps(len(recipe.train), tc)
    warmup = int(tc.warmup_ratio * total_steps)
    eval_every = tc.eval_every or steps_per_epoch
    opt = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)

    main = distributed.is_main()  # rank 0 alone writes files and prints
    quiet = quiet or not main
    fsdp = distributed.sharded(model)  # FSDP reduces the gradients itself, in backward
    if fsdp:
        distributed.reshard(model)  # e.g. after DPO's no-grad reference pass
    global_batch = tc.batch_size * tc.grad_accum * distributed.world()
    short = len(recipe.train) % global_batch  # examples in the last step of an epoch, if it is short
    if fsdp and 0 < short < distributed.world() and main:
        console.print(
            f"[yellow]fsdp: the last step of each epoch has {short} example(s) for {distributed.world()} "
            "processes; every process needs one, so that step repeats some. Change train.batch_size or "
            "the number of processes to avoid it."
        )
    metrics_path = run_dir / "metrics.jsonl"
    step_groups: list[list[int]] = []
    epoch = step = tokens_total = 0
    t_train, loss, last_val = 0.0, float("nan"), {}
    stopper = EarlyStopping(params, tc.early_stopping_patience, recipe.best_metric)
    clock = BudgetClock(tc.time_budget) if tc.time_budget else None
    window: dict[str, float] = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        step, epoch, step_groups = state["step"], state["epoch"], state["step_groups"]
        tokens_total, t_train, loss, last_val = state["tokens"], state["seconds"], state["loss"], state["val"]
        window = state["window"]
        if main:
            _truncate_metrics(metrics_path, step)
        if clock is not None:  # the budget's plan and clock carry on where the checkpoint left them
            clock = BudgetClock.from_state(clock.budget_s, state.get("budget"))
            if clock.plan is not None:
                total_steps, warmup, eval_every = _follow(clock.plan, tc, eval_every)
        if state["total_steps"] != total_steps:
            console.print(
                f"[yellow]resume: the run was planned for {state['total_steps']} steps, now {total_steps}; "
                "the learning-rate schedule follows the new plan"
            )
        if not quiet:
            console.print(f"resuming from {ckpt} (step {step} of {total_steps})")
    else:
        if resume and not quiet:
            console.print(f"resume: no checkpoint in {run_dir / 'checkpoints'}; starting at step 0")
        if main:
            metrics_path.write_text("")
    save_every = tc.save_steps or steps_per_epoch
    # Everything the run writes from here to its end: check the room before step 1.
    if main:
        ensure_free_space(run_dir, needed_bytes(model, params, tc, total_steps, len(recipe.train)))
    identity = _identity(run_dir, tc)

    def checkpoint() -> Path:
        state = {
            "step": step,
            "epoch": epoch,
            "step_groups": step_groups,
            "total_steps": total_steps,
            "tokens": tokens_total,
            "seconds": t_train,
            "loss": loss,
            "val": last_val,
            "window": window,
            "budget": clock.state() if clock else None,
        }
        if identity is not None:  # resume refuses a checkpoint of another config (train/session.py)
            state |= {"config": identity, "config_hash": identity_hash(identity)}
        path = save_checkpoint(run_dir, model, opt, state, tc.save_total_limit)  # every rank: FSDP gathers
        distributed.barrier()  # no rank runs ahead of a checkpoint that may be resumed
        return path

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )
    if clock is not None:
        clock.start()
    with signals.deferred() as stop, progress:
        bar = progress.add_task("train", total=total_steps, completed=step, info="")
        while step < total_steps:
            if not step_groups:
                # A new epoch: reshuffle with a seed derived from the epoch, so any run is replayable.
                # Groups are formed per optimizer step and then cut into micro-batches, so batch 8 x
                # accumulation 1 and batch 1 x accumulation 8 see the same examples at each step.
                step_groups = length_grouped_batches(recipe.lengths, global_batch, tc.seed + epoch)
                epoch += 1
            group = distributed.micro_batches(step_groups.pop(0), tc.batch_size, even=fsdp)
            t0 = time.perf_counter()
            batches = [recipe.collate([recipe.train[i] for i in idx]) for idx in group]
            loss, extra = recipe.step(model, batches)
            if distributed.active():
                if not fsdp:  # ddp; FSDP has reduce-scattered the gradients (a mean too) in backward
                    distributed.average_gradients(params)
                loss = distributed.mean(loss)
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
            n_tokens = distributed.sum_int(sum(recipe.n_tokens(b) for b in batches))
            dt = time.perf_counter() - t0
            tokens_total += n_tokens
            t_train += dt
            if clock is not None:
                clock.timed_step(dt)
                if clock.wants_plan(step, total_steps):
                    if recipe.validation and recipe.validate:
                        clock.val_estimate = measure_validation(
                            lambda items: _validate(model, recipe, items, fsdp), recipe.validation
                        )
                    plan = _budget_plan(clock, step, total_steps, (steps_per_epoch, eval_every), save_every)
                    total_steps, warmup, eval_every = _follow(plan, tc, eval_every)
                    progress.update(bar, total=total_steps)
                    if not quiet:
                        progress.console.print(plan.line())
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
                t_val = time.perf_counter()
                last_val = _validate(model, recipe, recipe.validation, fsdp)
                if clock is not None:
                    clock.val_times.append(time.perf_counter() - t_val)
                record = (record or {"step": step, "epoch": round(step / steps_per_epoch, 4)}) | last_val
                if not quiet:
                    shown = ", ".join(
                        f"{k.replace('val_', 'validation ')} {v:.4f}" for k, v in last_val.items()
                    )
                    progress.console.print(f"step {step}: train loss {loss:.4f}, {shown}")
                if stopper.metric in last_val and stopper.update(step, last_val, loss) and not quiet:
                    progress.console.print(f"[yellow]{stopper.warning}")
                notify_validation(step, last_val)  # e.g. tunekit tune's pruner, which may end the run
            if record and main:
                append_metrics(metrics_path, record)
                trackers.log_metrics(run_dir, record, total_steps)  # registry, TensorBoard, MLflow
            info = f"loss {loss:.4f}  {tokens_total / t_train:.0f} tok/s"
            progress.update(bar, advance=1, info=info)
            if not quiet and not console.is_terminal and (step % max(1, total_steps // 10) == 0):
                # Logs and CI have no live bar: print a line at every tenth of the run instead.
                console.print(f"step {step}/{total_steps}: {info}, {t_train:.0f}s")
            stop.signum = distributed.max_int(stop.signum or 0) or None  # every rank stops together
            if step % save_every == 0 or step == total_steps or stop.signum:
                t_save = time.perf_counter()
                saved = checkpoint()
                if clock is not None:
                    clock.ckpt_times.append(time.perf_counter() - t_save)
                if stop.signum:
                    raise Interrupted(
                        f"{signal.Signals(stop.signum).name} at step {step} of {total_steps}: checkpoint "
                        f"saved to {saved}. Resume with `tunekit resume {run_dir}` "
                        "(or `tunekit train CONFIG --resume`).",
                        exit_code=128 + stop.signum,
                    )
            heavy = step % eval_every == 0 or step % save_every == 0  # a validation or checkpoint ran
            if clock is not None and clock.plan is not None and heavy and step < total_steps:
                replan = _budget_plan(clock, step, total_steps, (steps_per_epoch, eval_every), save_every)
                if replan is not None:
                    total_steps, warmup, eval_every = _follow(replan, tc, eval_every)
                    progress.update(bar, total=total_steps)
                    if not quiet:
                        progress.console.print(f"time budget: slower than planned; {replan.line()}")
            if clock is not None and step < total_steps and distributed.max_int(int(clock.over())):
                # The safety stop: the plan was too hopeful (slower steps later, a busy machine).
                clock.ended_training = True
                if step % save_every:
                    checkpoint()
                if not quiet:
                    progress.console.print(
                        f"[yellow]time budget: the deadline came at step {step} of {total_steps}; "
                        "checkpoint saved, training ends here"
                    )
                break
            if stopper.should_stop:
                if not quiet:
                    progress.console.print(
                        f"early stopping: no better {stopper.metric.replace('val_', 'validation ')} in "
                        f"{tc.early_stopping_patience} validations; keeping the weights of step {stopper.best_step}"
                    )
                break

    stopper.restore_best()
    return LoopResult(
        steps=step,
        epochs=round(step / steps_per_epoch, 4),
        steps_per_epoch=steps_per_epoch,
        final_loss=loss,
        val=last_val,
        tokens=tokens_total,
        train_seconds=t_train,
        stopped_early=stopper.should_stop,
        best_step=stopper.best_step,
        best_val_loss=stopper.best if stopper.metric == "val_loss" else None,
        best_metric={stopper.metric: stopper.best} if stopper.best is not None else None,
        budget=clock.record(t_train) if clock else None,
    )


class EarlyStopping:
    """Tracks the best validation loss; with `patience` set, snapshots the trainable weights at each
    new best and says when `patience` validations in a row brought no improvement.

    The snapshot is of the trainable parameters only (a LoRA adapter is a few MB; for a full
    fine-tune they are every weight), copied to CPU. It also notices overfitting (validation loss
    rising while training loss falls) and warns once. A resumed run starts tracking afresh.
    """

    def __init__(self, params: list[torch.Tensor], patience: int | None, metric: str = "val_loss"):
        self.params, self.patience, self.metric = params, patience, metric
        self.best, self.best_step, self.bad, self.snapshot = None, None, 0, None
        self.best_loss = math.inf  # the validation loss at the best step (breaks ties of a score)
        self.prev: tuple[float, float] | None = None  # (val loss, train loss) at the last validation
        self.warning, self.warned = "", False

    def better(self, val: dict[str, float]) -> bool:
        """A loss is better lower; an accuracy (or any other score) higher, and at an equal score the
        lower validation loss wins (a classifier that is as often right but surer of it)."""
        if self.best is None:
            return True
        value = val[self.metric]
        if self.metric.endswith("loss"):
            return value < self.best
        tie_break = val.get("val_loss", math.inf) < self.best_loss
        return value > self.best or (value == self.best and tie_break)

    def update(self, step: int, val: dict[str, float], train_loss: float) -> bool:
        """Record a validation; returns True when an overfitting warning should be shown now."""
        if self.better(val):
            self.best, self.best_step, self.bad = val[self.metric], step, 0
            self.best_loss = val.get("val_loss", math.inf)
            if self.patience:
                self.snapshot = [p.detach().to("cpu", copy=True) for p in self.params]
        else:
            self.bad += 1
        show, val_loss = False, val.get("val_loss", float("nan"))
        if self.prev and val_loss > self.prev[0] and train_loss < self.prev[1] and not self.warned:
            self.warning = (
                f"step {step}: validation loss rose ({self.prev[0]:.4f} -> {val_loss:.4f}) while training "
                f"loss fell ({self.prev[1]:.4f} -> {train_loss:.4f}): the model may be overfitting; consider "
                "train.early_stopping_patience or fewer epochs"
            )
            self.warned = show = True
        self.prev = (val_loss, train_loss)
        return show

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad >= self.patience

    @torch.no_grad()
    def restore_best(self) -> None:
        """Put the best validation step's weights back (only when patience is set)."""
        if self.snapshot is not None and self.bad:
            for p, saved in zip(self.params, self.snapshot, strict=True):
                p.copy_(saved.to(p.device))
