"""Supervised fine-tuning with LoRA: the recipe, top to bottom.

Run as: `tunekit train CONFIG.yaml` or `tunekit.train_sft(load_config("CONFIG.yaml"))`.

setup (run dir, data splits, model + LoRA) -> tokenize -> loop (length-grouped batches,
AdamW, warmup + decay, clipping, validation loss) -> save the adapter -> summary.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tunekit.config import Config, LoraConfig
from tunekit.console import err as console
from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_example
from tunekit.errors import DataError, TunekitError
from tunekit.io import atomic_write_json
from tunekit.models import load_model, load_tokenizer, resolve_model
from tunekit.run_dir import create_run_dir, prepare_splits
from tunekit.train.batching import collate, length_grouped_batches, sequential_batches
from tunekit.train.loss import loss_sum


def add_lora(model, lora: LoraConfig, seed: int):
    """Wrap `model` with fresh LoRA adapters (PEFT). Only the adapters will train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)  # adapter init is random: make it reproducible
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise TunekitError(f"lora.target_modules: {e}") from None


def tokenize_all(tokenizer, examples, max_length: int, name: str) -> list[TokenizedExample]:
    """Tokenize a split; examples left with no target tokens after truncation are reported and skipped."""
    out, empty, cut = [], [], 0
    for ex in examples:
        t = tokenize_example(tokenizer, ex, max_length)
        cut += t.truncated > 0
        if t.n_loss_tokens == 0:
            empty.append(ex.where)
        else:
            out.append(t)
    if cut:
        console.print(f"[yellow]{name}: {cut} example(s) longer than train.max_length={max_length} were cut")
    if empty:
        console.print(
            f"[yellow]{name}: {len(empty)} example(s) have no target tokens within train.max_length "
            f"and are not trained on: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}"
        )
    return out


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


def accumulate_gradients(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Forward and backward over the micro-batches of one optimizer step; returns the mean loss.

    Each micro-batch's summed loss is divided by the target tokens of the whole step, so k
    micro-batches of n examples give the same gradient as one batch of k*n (tested).
    """
    n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    total = 0.0
    for b in batches:
        s, _ = loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"])
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


def check_before_training(cfg: Config, allow_data_errors: bool, quiet: bool) -> None:
    """Run `tunekit data check` on the config's data: refuse to train on errors unless allowed."""
    from tunekit.data.check import check_config

    report = check_config(cfg)
    unreadable = [f.unreadable for f in report.files if f.unreadable]
    if unreadable:
        raise TunekitError(unreadable[0])
    if not quiet and (report.warnings or report.duplicates or report.leakage):
        kinds = Counter(w.kind for w in report.warnings)
        console.print(
            "[yellow]data check:[/] "
            + ", ".join(
                [f"{n} {k}" for k, n in kinds.most_common()]
                + [f"{len(report.duplicates)} duplicate groups"] * bool(report.duplicates)
                + [f"{len(report.leakage)} leaked pairs between files"] * bool(report.leakage)
            )
            + " (details: tunekit data check --config CONFIG)"
        )
    if report.errors and not allow_data_errors:
        raise DataError(
            [str(p) for p in report.errors],
            header=f"data check: {report.rejected} of {report.kept + report.rejected} rows have errors; fix them, "
            "or train on the rest with --allow-data-errors",
        )
    if report.errors and not quiet:
        console.print(f"[yellow]--allow-data-errors: training without {report.rejected} rejected rows")


def train_sft(cfg: Config, quiet: bool = False, allow_data_errors: bool = False) -> Path:
    """Fine-tune `cfg.model` with LoRA on `cfg.data`; returns the run directory.

    The data is checked first (as `tunekit data check` does); rows with errors stop the run
    unless `allow_data_errors`, in which case they are left out and reported.
    """
    t_start = time.perf_counter()
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    check_before_training(cfg, allow_data_errors, quiet)
    run_dir = create_run_dir(cfg)
    splits = prepare_splits(cfg, run_dir, allow_errors=allow_data_errors)
    if not splits["train"]:
        raise TunekitError(f"data.train: {cfg.data.train} leaves no training examples after the split")

    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    model = add_lora(load_model(model_path), cfg.lora, cfg.train.seed)
    model.train()
    t_setup = time.perf_counter() - t_start

    tc = cfg.train
    train_data = tokenize_all(tokenizer, splits["train"], tc.max_length, "train")
    val_data = tokenize_all(tokenizer, splits["validation"], tc.max_length, "validation")
    if not train_data:
        raise TunekitError("data.train: no example has target tokens within train.max_length")
    pad_id = tokenizer.pad_token_id

    # Steps: an epoch is ceil(N / (batch_size * grad_accum)) optimizer steps.
    micro_per_epoch = math.ceil(len(train_data) / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    warmup = int(tc.warmup_ratio * total_steps)
    eval_every = tc.eval_every or steps_per_epoch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    if not quiet:
        console.print(
            f"train: {len(train_data)} examples, validation: {len(val_data)}, test: {len(splits['test'])}; "
            f"{total_steps} steps; trainable {n_trainable / 1e6:.2f}M of {n_total / 1e6:.1f}M parameters"
        )

    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    lengths = [len(t.input_ids) for t in train_data]
    micro_batches: list[list[int]] = []
    epoch = 0
    step = 0
    tokens_total, t_train, last_val = 0, 0.0, None
    window = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
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
        task = progress.add_task("train", total=total_steps, info="")
        while step < total_steps:
            if len(micro_batches) < tc.grad_accum:
                # A new epoch: reshuffle with a seed derived from the epoch, so any run is replayable.
                micro_batches += length_grouped_batches(lengths, tc.batch_size, tc.seed + epoch)
                epoch += 1
            group = [micro_batches.pop(0) for _ in range(tc.grad_accum)]
            t0 = time.perf_counter()
            batches = [collate([train_data[i] for i in idx], pad_id) for idx in group]
            loss = accumulate_gradients(model, batches)
            lr = lr_at(step, total_steps, warmup, tc.learning_rate, tc.lr_scheduler)
            for g in opt.param_groups:
                g["lr"] = lr
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm))
                if tc.max_grad_norm
                else float(
                    torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in params if p.grad is not None])
                    )
                )
            )
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TunekitError(
                    f"step {step + 1}: the loss or gradient is not finite (loss={loss}, grad_norm={grad_norm}). "
                    "Lower train.learning_rate or check the data for broken examples."
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            dt = time.perf_counter() - t0
            tokens_total += n_tokens
            t_train += dt
            for k, v in (("loss", loss), ("n", 1), ("tokens", n_tokens), ("time", dt)):
                window[k] += v
            record = None
            if step % tc.log_every == 0 or step == total_steps:
                record = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "loss": window["loss"] / window["n"],
                    "learning_rate": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": window["tokens"] / window["time"],
                }
                window = {"loss": 0.0, "n": 0, "tokens": 0, "time": 0.0}
            if val_data and (step % eval_every == 0 or step == total_steps):
                last_val = evaluate_loss(model, val_data, pad_id, cfg.eval.batch_size)
                record = record or {"step": step, "epoch": round(step / steps_per_epoch, 4)}
                record["val_loss"] = last_val
                if not quiet:
                    progress.console.print(
                        f"step {step}: train loss {loss:.4f}, validation loss {last_val:.4f}"
                    )
            if record:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            info = f"loss {loss:.4f}  {tokens_total / t_train:.0f} tok/s"
            progress.update(task, advance=1, info=info)
            if not quiet and not console.is_terminal and (step % max(1, total_steps // 10) == 0):
                # Logs and CI have no live bar: print a line at every tenth of the run instead.
                console.print(f"step {step}/{total_steps}: {info}, {t_train:.0f}s")

    adapter_dir = run_dir / "adapter"
    _save_adapter(model, tokenizer, adapter_dir)
    summary = {
        "model": cfg.model,
        "model_path": str(model_path),
        "method": cfg.method,
        "steps": step,
        "epochs": round(step / steps_per_epoch, 4),
        "train_examples": len(train_data),
        "validation_examples": len(val_data),
        "test_examples": len(splits["test"]),
        "trainable_parameters": n_trainable,
        "final_train_loss": loss,
        "final_val_loss": last_val,
        "tokens": tokens_total,
        "tokens_per_s": tokens_total / t_train,
        "train_seconds": t_train,
        "setup_seconds": t_setup,
        "wall_seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(run_dir / "train_summary.json", summary)
    if not quiet:
        console.print(
            f"trained {step} steps in {t_train:.0f}s ({summary['tokens_per_s']:.0f} tokens/s); "
            f"final train loss {loss:.4f}"
            + (f", validation loss {last_val:.4f}" if last_val is not None else "")
            + f"; adapter -> {adapter_dir}"
        )
    return run_dir


def _save_adapter(model, tokenizer, adapter_dir: Path) -> None:
    """Save adapter + tokenizer into a temporary folder, then rename it into place."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(dir=adapter_dir.parent, prefix=".adapter."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    tmp.rename(adapter_dir)
