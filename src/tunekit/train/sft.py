"""Supervised fine-tuning (`task: sft`): the recipe, top to bottom.

Run as: `tunekit train CONFIG.yaml` or `tunekit.train_sft(load_config("CONFIG.yaml"))`.

setup (run dir, data splits, model as `method` says) -> tokenize (loss on assistant tokens only)
-> the shared loop (train/loop.py) -> save the adapter or model -> summary. The helpers at the
bottom (start_run, announce, finish_run) are what every task's recipe file shares.

With `data.streaming` (large data sets) the train split is an `ExampleStream` rather than a list,
checked and split one row at a time (data/stream.py), and tokenized into a memory-mapped token
store (`tokenize_stored`) that the loop indexes like the list it otherwise gets.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch

from tunekit.config import Config
from tunekit.console import err as console
from tunekit.data.replay import mix_replay, replay_examples
from tunekit.data.stream import ExampleStream, TokenStore, build_token_store, hash_file
from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_example
from tunekit.errors import ConfigError, DataError, TunekitError
from tunekit.io import atomic_write_json, atomic_write_jsonl
from tunekit.models import load_tokenizer, resolve_model
from tunekit.models.device import cuda_peak_memory
from tunekit.run_dir import create_run_dir, prepare_splits, read_run_splits
from tunekit.train import distributed, trackers
from tunekit.train.batching import collate, sequential_batches
from tunekit.train.loop import Recipe, lr_at, plan_steps, run_loop  # noqa: F401  (lr_at: re-exported)
from tunekit.train.loss import loss_sum
from tunekit.train.setup import add_lora, build_model, save_trained  # noqa: F401  (add_lora: re-exported)

STREAMING_HELD_OUT_WARN = 50_000  # held-out examples a streaming run keeps in memory before it warns


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
    report_tokenized(name, max_length, cut, len(empty), empty[:5])
    return out


def report_tokenized(name: str, max_length: int, cut: int, n_empty: int, first_empty: list[str]) -> None:
    """Say how many examples max_length cut, and which were left with nothing to learn."""
    if cut:
        console.print(f"[yellow]{name}: {cut} example(s) longer than train.max_length={max_length} were cut")
    if n_empty:
        console.print(
            f"[yellow]{name}: {n_empty} example(s) have no target tokens within train.max_length "
            f"and are not trained on: {', '.join(first_empty[:5])}{' ...' if n_empty > 5 else ''}"
        )


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


def _cache_hash(tokenizer, max_length: int):
    """A hash seeded with what tokenization depends on besides the examples: the tokenizer's
    vocabulary size and chat template, and max_length."""
    import xxhash

    h = xxhash.xxh64()
    for part in (str(len(tokenizer)), tokenizer.chat_template or "", str(max_length)):
        h.update(part.encode())
    return h


def tokenize_cached(tokenizer, examples, max_length: int, name: str, run_dir: Path):
    """`tokenize_all`, computed once per content and shared: rank 0 tokenizes and writes
    run_dir/cache/NAME-KEY.jsonl, the other ranks (and a resumed run) read it back. The key hashes
    the tokenizer's vocabulary and chat template, max_length and every example's content."""
    h = _cache_hash(tokenizer, max_length)
    for ex in examples:
        h.update(ex.content_hash().encode())
    path = run_dir / "cache" / f"{name}-{h.hexdigest()}.jsonl"
    if distributed.is_main() and not path.is_file():
        out = tokenize_all(tokenizer, examples, max_length, name)
        atomic_write_jsonl(
            path, [{"input_ids": t.input_ids, "labels": t.labels, "truncated": t.truncated} for t in out]
        )
    distributed.barrier()
    with path.open() as f:
        return [TokenizedExample(**json.loads(line)) for line in f if line.strip()]


def tokenize_stored(
    tokenizer, split: ExampleStream, extra: list, max_length: int, name: str, run_dir: Path, quiet: bool
) -> TokenStore:
    """`tokenize_cached` for a split too big to hold (data.streaming): rank 0 tokenizes it one
    example at a time into run_dir/cache/NAME-KEY.tokens/, a token store on disk; every rank, and a
    resumed run, memory-maps that store. The key hashes what tokenize_cached's does, with the bytes
    of the split's file standing for its examples' content, and the content of `extra` (replay
    examples, trained after the split's own)."""
    from rich.progress import track

    h = _cache_hash(tokenizer, max_length)
    hash_file(split.path, h)
    for ex in extra:
        h.update(ex.content_hash().encode())
    path = run_dir / "cache" / f"{name}-{h.hexdigest()}.tokens"
    if distributed.is_main() and not (path / "meta.json").is_file():
        examples = track(
            itertools.chain(split, extra),
            description=f"tokenize {name}",
            total=len(split) + len(extra),
            console=console,
            disable=quiet,
        )
        stats = build_token_store(examples, lambda ex: tokenize_example(tokenizer, ex, max_length), path)
        report_tokenized(name, max_length, stats.truncated, stats.empty, stats.empty_where)
    distributed.barrier()
    return TokenStore(path)


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

    if cfg.data.streaming:
        return check_streaming(cfg, allow_data_errors, quiet)
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


def check_streaming(cfg: Config, allow_data_errors: bool, quiet: bool) -> None:
    """`check_before_training` for data.streaming: the checks that fit a stream (data/stream.py's
    `check_stream`), and a line saying which ran and which did not."""
    from tunekit.data.stream import CHECKED, check_stream

    report = check_stream(cfg)
    if not quiet:
        found = [f"{n} {k}" for k, n in report.warnings.most_common()]
        found += [f"{report.duplicate_groups} exact duplicate groups ({report.duplicate_rows} rows)"] * bool(
            report.duplicate_groups
        )
        found += [f"{report.leaked} train rows also in the validation or test file"] * bool(report.leaked)
        console.print(
            f"data check (streaming): {report.rows} rows, {report.rejected} with errors"
            + (f"; [yellow]{', '.join(found)}[/]" if found else "")
        )
        console.print(f"  [dim]{CHECKED}[/]")
    if report.rejected and not allow_data_errors:
        raise DataError(
            report.listed_errors(),
            header=f"data check: {report.rejected} of {report.rows} rows have errors; fix them, "
            "or train on the rest with --allow-data-errors",
        )
    if report.rejected and not quiet:
        console.print(f"[yellow]--allow-data-errors: training without {report.rejected} rejected rows")


def train_sft(
    cfg: Config, quiet: bool = False, allow_data_errors: bool = False, resume: bool = False
) -> Path:
    """Fine-tune `cfg.model` (full, LoRA, DoRA or QLoRA) on `cfg.data`; returns the run directory.

    The data is checked first (as `tunekit data check` does); rows with errors stop the run
    unless `allow_data_errors`, in which case they are left out and reported.
    """
    t_start = time.perf_counter()
    run_dir, splits = start_run(cfg, quiet, allow_data_errors, resume)

    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    model, params = build_model(cfg, model_path)
    if cfg.train.init_from is not None and not resume:
        init_from_run(model, cfg.train.init_from, cfg.method, quiet)
    t_setup = time.perf_counter() - t_start

    tc = cfg.train
    # data.replay: general examples join the training examples only (the split files stay the task's).
    if isinstance(splits["train"], ExampleStream):
        # data.streaming: the train split goes from data/train.jsonl into a memory-mapped token store.
        extra = replay_examples(cfg.data.replay, len(splits["train"])) if cfg.data.replay else []
        n_replay = len(extra)
        train_data = tokenize_stored(
            tokenizer, splits["train"], extra, tc.max_length, "train", run_dir, quiet
        )
        lengths = train_data.lengths  # (examples,) int32
    else:
        train_examples, n_replay = mix_replay(splits["train"], cfg.data.replay)
        train_data = tokenize_cached(tokenizer, train_examples, tc.max_length, "train", run_dir)
        lengths = [len(t.input_ids) for t in train_data]
    if n_replay and not quiet:
        console.print(f"replay: {n_replay} examples from {cfg.data.replay.path} mixed into training")
    val_data = tokenize_cached(tokenizer, splits["validation"], tc.max_length, "validation", run_dir)
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
    announce(cfg, model, params, len(train_data), len(val_data), len(splits["test"]), quiet)
    result = run_loop(model, params, recipe, tc, run_dir, quiet, resume=resume)
    saved = save_trained(model, tokenizer, run_dir, cfg.method)
    summary_extra = {"replay_examples": n_replay}
    finish_run(
        cfg, run_dir, result, model_path, params, splits, t_setup, t_start, saved, quiet, **summary_extra
    )
    return run_dir


def init_from_run(model, run_dir: Path, method: str, quiet: bool) -> None:
    """`tunekit train --from RUN_DIR`: start from an earlier run's trained weights (its adapter, or
    its full model), to continue on new data. The methods must match."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    full = sorted((run_dir / "model").glob("*.safetensors"))
    if method == "full" and full:
        state = {}
        for f in full:
            state |= load_file(f)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or len(missing) > 1:  # a tied lm_head may be absent from the file
            raise TunekitError(
                f"train.init_from: {run_dir}/model does not fit this model ({unexpected[:3] or missing[:3]})"
            )
    elif method != "full" and adapter.is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(adapter))
        if getattr(result, "unexpected_keys", None):
            raise TunekitError(
                f"train.init_from: the adapter of {run_dir} does not fit this config's LoRA settings "
                f"(unexpected {result.unexpected_keys[:3]}); use the same lora.r and target_modules"
            )
    else:
        want = "model/ (a full fine-tune)" if method == "full" else "adapter/ (a LoRA run)"
        raise TunekitError(f"train.init_from: {run_dir} has no {want}; --from needs a run of the same method")
    if not quiet:
        console.print(f"starting from the weights of {run_dir}")


def start_run(cfg: Config, quiet: bool, allow_data_errors: bool, resume: bool = False) -> tuple[Path, dict]:
    """Seed, check the data, create the run directory and write the splits: the start of every task.

    A resumed run reads back the splits it wrote when it started, so it trains on exactly the same
    examples even if the source files moved or changed since."""
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    if cfg.data.streaming and cfg.task != "sft":
        raise ConfigError(
            [
                f"data.streaming: only task: sft streams its data; task: {cfg.task} reads it into memory, "
                "so turn data.streaming off"
            ]
        )
    if resume and (Path(cfg.output_dir) / "data" / "manifest.json").is_file():
        run_dir = Path(cfg.output_dir)
        trackers.start_run(run_dir, cfg, resume=True)
        return run_dir, read_run_splits(run_dir)
    if not distributed.is_main():
        # Rank 0 checks the data and writes the splits; the others read back exactly those.
        distributed.barrier()
        run_dir = Path(cfg.output_dir)
        return run_dir, read_run_splits(run_dir)
    try:
        check_before_training(cfg, allow_data_errors, quiet)
        run_dir = create_run_dir(cfg)
        trackers.start_run(run_dir, cfg)  # registry (tunekit runs / ui), TensorBoard, MLflow
        splits = prepare_splits(cfg, run_dir, allow_errors=allow_data_errors)
    finally:
        distributed.barrier()  # release the other ranks even if the check failed (they then fail to read)
    if not splits["train"]:
        raise TunekitError(f"data.train: {cfg.data.train} leaves no training examples after the split")
    held = len(splits["validation"]) + len(splits["test"])
    if cfg.data.streaming and held > STREAMING_HELD_OUT_WARN and not quiet:
        console.print(
            f"[yellow]data.streaming: validation and test hold {held} examples in memory, and validation "
            "runs over all of them; give them smaller shares (e.g. data.split: [0.998, 0.001, 0.001]) or "
            "files of their own (data.validation, data.test)"
        )
    return run_dir, splits


def announce(cfg: Config, model, params, n_train: int, n_val: int, n_test: int, quiet: bool) -> None:
    if quiet or not distributed.is_main():
        return
    _, total_steps = plan_steps(n_train, cfg.train)
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    console.print(
        f"{cfg.task} ({cfg.method}): train {n_train} examples, validation {n_val}, test {n_test}; "
        f"{total_steps} steps; trainable {n_trainable / 1e6:.2f}M of {n_total / 1e6:.2f}M parameters"
    )


def finish_run(cfg, run_dir, result, model_path, params, splits, t_setup, t_start, saved, quiet, **extra):
    """Write train_summary.json and say where the model went (rank 0 only). On CUDA the summary
    also holds `cuda_peak_memory_gib`, the peak memory torch allocated on this rank's GPU."""
    if not distributed.is_main():
        return {}
    summary = {
        "model": cfg.model,
        "model_path": str(model_path),
        "method": cfg.method,
        "task": cfg.task,
        "steps": result.steps,
        "epochs": result.epochs,
        "train_examples": len(splits["train"]),
        "validation_examples": len(splits["validation"]),
        "test_examples": len(splits["test"]),
        "trainable_parameters": sum(p.numel() for p in params),
        "final_train_loss": result.final_loss,
        "final_val_loss": result.val.get("val_loss"),
        "final_validation": result.val,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.train_seconds,
        "setup_seconds": t_setup,
        "wall_seconds": time.perf_counter() - t_start,
        "saved": saved.name,
        "stopped_early": getattr(result, "stopped_early", False),
        "best_step": getattr(result, "best_step", None),
        "best_val_loss": getattr(result, "best_val_loss", None),
    } | extra
    summary |= cuda_peak_memory()  # on CUDA only
    atomic_write_json(run_dir / "train_summary.json", summary)
    trackers.finish_run(run_dir, summary, saved)
    if not quiet:
        val = ", ".join(f"{k.replace('val_', 'validation ')} {v:.4f}" for k, v in result.val.items())
        console.print(
            f"trained {result.steps} steps in {result.train_seconds:.0f}s ({result.tokens_per_s:.0f} tokens/s); "
            f"final train loss {result.final_loss:.4f}" + (f", {val}" if val else "") + f"; saved -> {saved}"
        )
    return summary
