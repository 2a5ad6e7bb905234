"""The task table: what each task is, one row per task.

A task's own file (`train/recipes/NAME.py`) declares it as `TASK = Task(...)`: its name, the data it
needs, its recipe, its evaluation, whether it yields a generative model and the methods it supports.
This table only lists where each declaration lives, so reading it costs nothing (no torch) and the
config can validate `task:` from it. Everything that depends on the task asks `get_task(cfg.task)`
instead of comparing names.

Adding a task:
  1. write `train/recipes/NAME.py` with `TASK = Task(...)` and its recipe function
     (`def train_NAME(run: RunSession) -> Path`), and an evaluation function if none fits;
  2. add its row below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tunekit.config import Config

# name -> the module whose `TASK` declares it. One row per task; the order is the order of the help.
ROWS: dict[str, str] = {
    "sft": "tunekit.train.recipes.sft",
    "classify": "tunekit.train.recipes.classify",
    "reward": "tunekit.train.recipes.reward",
    "dpo": "tunekit.train.recipes.dpo",
    "kto": "tunekit.train.recipes.kto",
    "orpo": "tunekit.train.recipes.orpo",
    "rl": "tunekit.train.recipes.rl",
    "pretrain": "tunekit.train.recipes.pretrain",
}

# The data a task reads, as the canonical Example carries it.
DataKind = Literal["conversations", "labels", "pairs", "unpaired", "documents"]


@dataclass(frozen=True)
class Task:
    """One row of the task table, declared in the task's own file."""

    name: str
    summary: str  # one line, for `--help` and errors
    # conversations (any chat format), labels (text + label), pairs (chosen/rejected), unpaired (one
    # answer rated desirable or undesirable: KTO feedback), documents (raw `text` rows)
    data: DataKind
    recipe: Callable[[Any], Path]  # train(run: RunSession) -> the run directory
    evaluation: str  # "module:function" with (run_dir, data=None, quiet=False, **options) -> report
    generative: bool  # yields a language model: exportable, servable, chattable
    methods: tuple[str, ...] = ("full", "lora", "qlora")
    # `tunekit eval` options the evaluation takes besides run_dir and data (e.g. few_shot, probe).
    eval_options: tuple[str, ...] = ()
    streaming: bool = False  # data.streaming is supported
    multi_process: bool = True  # runs under `--nproc N`
    # Why `tunekit resume` cannot continue it, and what to do instead; empty: it resumes.
    not_resumable: str = ""
    # Its loss projects only target positions onto the vocabulary, train.loss_chunk_tokens at a
    # time (the memory estimate counts the logits so).
    loss_chunked: bool = False
    init_from: bool = False  # `train.init_from` (`tunekit train --from RUN`) starts from a run's weights
    replay: bool = False  # data.replay (a file, or `self`: the base model's own answers) joins training
    # Why train.time_budget cannot apply (its loop is not the shared one); empty: the budget applies.
    no_time_budget: str = ""
    # Task-specific config rules: returns errors, each naming its dotted key and the fix.
    check_config: Callable[[Config], list[str]] = field(default=lambda cfg: [])

    def evaluate(self, run_dir: Path, data=None, quiet: bool = False, **options) -> dict:
        """Run this task's evaluation; an option it does not take is an error naming the tasks that do."""
        for name, value in options.items():
            if value is not None and name not in self.eval_options:
                takers = [t for t in ROWS if name in get_task(t).eval_options]
                raise _option_error(name, self.name, takers)
        module, func = self.evaluation.split(":")
        given = {k: v for k, v in options.items() if v is not None}
        return getattr(import_module(module), func)(run_dir, data, quiet=quiet, **given)


def _option_error(option: str, task: str, takers: list[str]):
    from tunekit.errors import TunekitError

    flag = "--" + option.replace("_", "-")
    return TunekitError(f"{flag} applies to task: {' or '.join(takers)} runs; this is a task: {task} run")


def task_names() -> tuple[str, ...]:
    return tuple(ROWS)


def get_task(name: str) -> Task:
    """The declaration of task `name` (imports its recipe file)."""
    if name not in ROWS:
        from tunekit.errors import ConfigError

        raise ConfigError([f"task: unknown task {name!r}; one of {', '.join(ROWS)}"])
    return import_module(ROWS[name]).TASK


def check_config(cfg: Config) -> list[str]:
    """The rules the config's task adds to the typed config: its methods, streaming, its own rules."""
    task = get_task(cfg.task)
    problems = []
    if cfg.method not in task.methods:
        problems.append(
            f"method: task: {task.name} supports method {' or '.join(task.methods)}, not {cfg.method}"
        )
    if cfg.data.streaming and not task.streaming:
        streams = [t for t in ROWS if get_task(t).streaming]
        problems.append(
            f"data.streaming: only task: {' or '.join(streams)} streams its data; task: {task.name} reads "
            "it into memory, so turn data.streaming off"
        )
    if cfg.train.init_from is not None and not task.init_from:
        takers = [t for t in ROWS if get_task(t).init_from]
        problems.append(
            f"train.init_from: only task: {' or '.join(takers)} continues from an earlier run's weights; "
            f"drop --from for task: {task.name}"
        )
    if cfg.data.replay is not None and not task.replay:
        takers = [t for t in ROWS if get_task(t).replay]
        problems.append(
            f"data.replay: only task: {' or '.join(takers)} mixes replay examples into training; task: "
            f"{task.name} would ignore them, so drop data.replay"
        )
    if cfg.train.time_budget is not None and task.no_time_budget:
        problems.append(
            f"train.time_budget: task: {task.name} cannot keep a time budget ({task.no_time_budget}); "
            "drop train.time_budget (--time-budget)"
        )
    return problems + task.check_config(cfg)
