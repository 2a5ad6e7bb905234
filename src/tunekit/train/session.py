"""A run's whole life, for every entry point: `tunekit train`, `fine_tune`, `quickstart`, `resume`.

    train(cfg) -> the task's row (tasks.py) -> RunSession -> the task's recipe(run) -> the run directory

The session seeds the RNGs, checks the data (refusing errors unless allowed), creates the run
directory and writes the splits, registers the run (registry row `running`, TensorBoard, MLflow),
owns SIGTERM/Ctrl-C for the run's life (train/signals.py), and ends it: `done` with
train_summary.json when the recipe calls `finish`, `interrupted` or `failed` on any exception, so no
row is left at `running`. A recipe only builds its model and data, calls the shared loop and saves.
"""

from __future__ import annotations

import errno
import random
import re
import time
from collections import Counter
from pathlib import Path

import torch

from tunekit.config import Config, identity_differences, identity_hash, load_config, run_identity
from tunekit.console import err as console
from tunekit.data.needs import require
from tunekit.errors import ConfigError, DataError, TunekitError
from tunekit.io import atomic_write_json
from tunekit.models.device import cuda_peak_memory
from tunekit.runs import trackers
from tunekit.runs.directory import clear_run_outputs, create_run_dir, prepare_splits, read_run_splits
from tunekit.tasks import Task, check_config, get_task
from tunekit.train import distributed
from tunekit.train.checkpoint import list_checkpoints, read_state, resumable_checkpoint
from tunekit.train.signals import StopOnSignal

STREAMING_HELD_OUT_WARN = 50_000  # held-out examples a streaming run keeps in memory before it warns
# A write that failed for want of room: the errno, or the words torch and safetensors wrap it in
# (safetensors: "I/O error: File too large (os error 27)"; torch.save: "unexpected pos 704 vs 598").
DISK_FULL_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
DISK_FULL_TEXT = re.compile(
    r"No space left|File too large|Disk quota|os error (27|28|122)\b|file write failed|unexpected pos \d+ vs \d+"
)


def train(
    cfg: Config,
    quiet: bool = False,
    allow_data_errors: bool = False,
    resume: bool = False,
    *,
    overwrite: bool = False,
    skip_damaged: bool = False,
) -> Path:
    """Train as `cfg.task` and `cfg.method` say; returns the run directory.

    `resume` continues from the newest complete checkpoint in `cfg.output_dir`, which must belong
    to this config (`config.run_identity`); with `skip_damaged`, from the newest intact one. Without
    `resume`, an output_dir holding an earlier run's checkpoints is refused, unless `overwrite`
    removes that run's outputs first."""
    from tunekit.train.defaults import resolve_defaults

    # Every rank resolves the same (the choices follow the data alone); the first one says so.
    cfg = resolve_defaults(cfg, say=console.print if not quiet and distributed.is_main() else None)
    task = get_task(cfg.task)
    problems = check_config(cfg)
    if resume and task.not_resumable:
        problems.append(f"task: {task.name} cannot resume yet ({task.not_resumable})")
    if resume and overwrite:
        problems.append("--resume continues the run in output_dir and --overwrite replaces it: give one")
    if skip_damaged and not resume:
        problems.append("--skip-damaged chooses the checkpoint to resume from: give it with --resume")
    if problems:
        raise ConfigError(problems)
    distributed.init()  # joins the process group inside a `--nproc N` worker; no-op otherwise
    if distributed.world() > 1:
        distributed.check_supported(cfg)
    session = RunSession(
        cfg, task, quiet, allow_data_errors, resume, overwrite=overwrite, skip_damaged=skip_damaged
    )
    with session as run:
        return task.recipe(run)


def resume(run_dir: str | Path, quiet: bool = False, skip_damaged: bool = False) -> Path:
    """Continue an interrupted run from its newest checkpoint, with the config it was started with."""
    from tunekit.runs.directory import load_run_config

    cfg = load_run_config(run_dir)
    cfg.output_dir = Path(run_dir)  # the run may have been started from another working directory
    return train(cfg, quiet=quiet, resume=True, skip_damaged=skip_damaged)


def earlier_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints an earlier run left in `run_dir`, its RL stages' (stages/NAME/) included."""
    stages = sorted(p for p in (Path(run_dir) / "stages").glob("*") if p.is_dir())
    return [c for d in (Path(run_dir), *stages) for c in list_checkpoints(d)]


def check_resumable(cfg: Config, run_dir: Path, skip_damaged: bool, say=None) -> Path | None:
    """The checkpoint `--resume` will continue from: verified against its checksums (a damaged one
    refused by name, or moved aside with `skip_damaged`), and written by this same config (else a
    ConfigError naming each key that differs). None when the run has no checkpoint yet."""
    ckpt = resumable_checkpoint(run_dir, skip_damaged, say)
    if ckpt is None:
        return None
    now = run_identity(cfg, cfg.train.batch_size * cfg.train.grad_accum * distributed.world())
    state = read_state(ckpt)
    then = state.get("config")
    if then is None and (run_dir / "config.yaml").is_file():  # a checkpoint from before identities
        then = run_identity(load_config(run_dir / "config.yaml"), now["train"]["global_batch"])
    if then is None or state.get("config_hash", identity_hash(then)) == identity_hash(now):
        return ckpt
    differ = identity_differences(then, now) or ["the config hash (the same keys, another form)"]
    raise ConfigError(
        [f"{d}" for d in differ]
        + [
            f"{ckpt} was written by a run with another config; resume with that run's config "
            f"(`tunekit resume {run_dir}` reads it), or start a new run: another output_dir, or --overwrite"
        ],
        source=f"--resume: {run_dir} (checkpoint -> now)",
    )


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it wraps) is a write that failed for want of disk space."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNO:
            return True
        if not isinstance(exc, TunekitError) and DISK_FULL_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class RunSession:
    """One run, from its first seed to its summary. Use as a context manager; the recipe gets it.

    `cfg`, `task`, `dir` (the run directory), `splits` ({train, validation, test} examples),
    `quiet`, `resume`, `allow_data_errors`."""

    def __init__(
        self,
        cfg: Config,
        task: Task,
        quiet: bool = False,
        allow_data_errors: bool = False,
        resume: bool = False,
        *,
        overwrite: bool = False,
        skip_damaged: bool = False,
    ):
        self.cfg, self.task = cfg, task
        self.quiet, self.allow_data_errors, self.resume = quiet, allow_data_errors, resume
        self.overwrite, self.skip_damaged = overwrite, skip_damaged
        self.dir = Path(cfg.output_dir)
        self.splits: dict = {}
        self.summary: dict | None = None
        self._signals = StopOnSignal()
        self._t_start = self._t_setup = 0.0

    def __enter__(self) -> RunSession:
        self._t_start = time.perf_counter()
        self._signals.__enter__()
        try:
            self._start()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._signals.__exit__()
        if exc is not None:
            trackers.fail_run(self.dir, exc)  # interrupted or failed; a no-op before registration
        elif self.summary is None and distributed.is_main():
            trackers.fail_run(self.dir, RuntimeError(f"task {self.task.name}: the recipe did not finish"))
        if exc is not None and not isinstance(exc, TunekitError) and disk_full(exc):
            # Wherever the disk filled (the final model, the tokenizer, the summary, a split), one
            # clear error: the checkpoints were written atomically, so the last one is intact.
            where = getattr(exc, "filename", None) or self.dir
            raise TunekitError(
                f"{where}: the disk is full ({(str(exc).splitlines() or [''])[0][:200]}); free disk space in "
                f"{self.dir} or set output_dir elsewhere, then `tunekit resume {self.dir}` continues from the "
                "last complete checkpoint"
            ) from None
        return False

    # -- the start of every task ------------------------------------------------------------------
    def _start(self) -> None:
        """Seed, check the data, create the run directory and write the splits.

        A resumed run reads back the splits it wrote when it started, so it trains on exactly the
        same examples even if the source files moved or changed since."""
        cfg = self.cfg
        random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        if self.resume and (self.dir / "data" / "manifest.json").is_file():
            try:  # rank 0 checks (and may move a damaged checkpoint aside) before any rank loads one
                if distributed.is_main():
                    say = None if self.quiet else console.print
                    check_resumable(cfg, self.dir, self.skip_damaged, say)
            finally:
                distributed.barrier()
            trackers.start_run(self.dir, cfg, resume=True)
            self.splits = read_run_splits(self.dir)
            return
        if not distributed.is_main():
            # Rank 0 checks the data and writes the splits; the others read back exactly those.
            distributed.barrier()
            self.splits = read_run_splits(self.dir)
            return
        try:
            if not self.resume:
                self._claim_output_dir()
            check_before_training(cfg, self.allow_data_errors, self.quiet)
            self.dir = create_run_dir(cfg)
            trackers.start_run(self.dir, cfg)  # registry (tunekit runs / ui), TensorBoard, MLflow
            self.splits = prepare_splits(cfg, self.dir, allow_errors=self.allow_data_errors)
        finally:
            distributed.barrier()  # release the other ranks even if the check failed (they then fail to read)
        if not self.splits["train"]:
            raise TunekitError(f"data.train: {cfg.data.train} leaves no training examples after the split")
        if not cfg.data.streaming:  # a stream is sft's, whose conversations need nothing more
            for name, examples in self.splits.items():
                require(self.task.data, examples, name, self.task.name)
        held = len(self.splits["validation"]) + len(self.splits["test"])
        if cfg.data.streaming and held > STREAMING_HELD_OUT_WARN and not self.quiet:
            console.print(
                f"[yellow]data.streaming: validation and test hold {held} examples in memory, and validation "
                "runs over all of them; give them smaller shares (e.g. data.split: [0.998, 0.001, 0.001]) or "
                "files of their own (data.validation, data.test)"
            )

    def _claim_output_dir(self) -> None:
        """Never resume another run's checkpoints silently: refuse an output_dir that holds them,
        unless told to overwrite (then that run's outputs go first)."""
        earlier = earlier_checkpoints(self.dir)
        if self.overwrite:
            removed = clear_run_outputs(self.dir)
            if removed and not self.quiet:
                console.print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {self.dir}")
        elif earlier:
            raise TunekitError(
                f"output_dir: {self.dir} holds the checkpoints of an earlier run (newest: {earlier[-1]}). "
                "Continue it with --resume (`tunekit train CONFIG --resume`, or `tunekit resume "
                f"{self.dir}`), replace it with --overwrite, or set output_dir to a new folder."
            )

    # -- what recipes call ------------------------------------------------------------------------
    def announce(self, model, params, n_train: int, n_val: int, total_steps: int | None = None) -> None:
        """The model is built and the data tokenized: setup is over; say what will train."""
        self._t_setup = time.perf_counter() - self._t_start
        self._speed = getattr(model, "tunekit_speed", None)  # train/setup.enable_speed: for the summary
        if self.quiet or not distributed.is_main():
            return
        if total_steps is None:
            from tunekit.train.loop import plan_steps

            total_steps = plan_steps(n_train, self.cfg.train)[1]
        n_trainable = sum(p.numel() for p in params)
        n_total = sum(p.numel() for p in model.parameters())
        console.print(
            f"{self.task.name} ({self.cfg.method}): train {n_train} examples, validation {n_val}, "
            f"test {len(self.splits['test'])}; {total_steps} steps; "
            f"trainable {n_trainable / 1e6:.2f}M of {n_total / 1e6:.2f}M parameters"
        )

    def finish(self, result, *, model_path: Path, params, saved: Path, **extra) -> dict:
        """Write train_summary.json, mark the run done and say where the model went (rank 0 only).
        On CUDA the summary also holds `cuda_peak_memory_gib`, the peak memory torch allocated on
        this rank's GPU. `extra` joins the summary (the task's own figures)."""
        cfg, splits = self.cfg, self.splits
        self.summary = {}
        if not distributed.is_main():
            return self.summary
        self.summary = {
            "model": cfg.model,
            "model_path": str(model_path),
            "method": cfg.method,
            "task": self.task.name,
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
            "setup_seconds": self._t_setup,
            "wall_seconds": time.perf_counter() - self._t_start,
            "saved": saved.name,
            "stopped_early": result.stopped_early,
            "best_step": result.best_step,
            "best_val_loss": result.best_val_loss,
            "best_validation": result.best_metric,
        } | extra
        if getattr(result, "budget", None):
            self.summary["time_budget"] = result.budget  # train.time_budget: the plan and who ended the run
        if getattr(self, "_speed", None):
            self.summary["speed"] = self._speed  # each speed piece: "on", or "off: why"
        self.summary |= cuda_peak_memory()  # on CUDA only
        atomic_write_json(self.dir / "train_summary.json", self.summary)
        trackers.finish_run(self.dir, self.summary, saved)
        if not self.quiet:
            val = ", ".join(f"{k.replace('val_', 'validation ')} {v:.4f}" for k, v in result.val.items())
            console.print(
                f"trained {result.steps} steps in {result.train_seconds:.0f}s "
                f"({result.tokens_per_s:.0f} tokens/s); final train loss {result.final_loss:.4f}"
                + (f", {val}" if val else "")
                + f"; saved -> {saved}"
            )
        return self.summary


def check_before_training(cfg: Config, allow_data_errors: bool, quiet: bool) -> None:
    """Run `tunekit data check` on the config's data: refuse to train on errors unless allowed."""
    from tunekit.data.check import check_config as check_data

    if cfg.data.streaming:
        return check_streaming(cfg, allow_data_errors, quiet)
    report = check_data(cfg, get_task(cfg.task).data)
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
    cfg: Config, quiet: bool = False, allow_data_errors: bool = False, resume: bool = False, **kw
) -> Path:
    """`train` with task sft, whatever `cfg.task` says (the API of tunekit's first release)."""
    return train(cfg.model_copy(update={"task": "sft"}), quiet, allow_data_errors, resume, **kw)
