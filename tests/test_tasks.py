"""The task table (tasks.py): every row resolves to its own declaration, and what depends on the
task asks the table: the config rules, `tunekit eval`'s options, export/serve, `--nproc`."""

from __future__ import annotations

import inspect
from importlib import import_module

import pytest

from tunekit.config import config_from_dict
from tunekit.errors import ConfigError, TunekitError
from tunekit.tasks import ROWS, check_config, get_task, task_names


def _cfg(task: str, **over):
    return config_from_dict({"task": task, "data": {"train": "x.jsonl"}} | over)


@pytest.mark.parametrize("name", list(ROWS))
def test_every_row_is_declared_in_its_own_file(name):
    task = get_task(name)
    assert task.name == name and task.data in ("conversations", "labels", "pairs", "unpaired", "documents")
    assert inspect.getmodule(task.recipe).__name__ == ROWS[name]  # the recipe lives in the task's file
    module, func = task.evaluation.split(":")
    evaluate = getattr(import_module(module), func)
    params = inspect.signature(evaluate).parameters
    assert list(params)[:2] == ["run_dir", "data"] and "quiet" in params
    assert all(option in params for option in task.eval_options)
    assert set(task.methods) <= {"full", "lora", "qlora"} and task.summary


def test_the_config_takes_task_names_from_the_table():
    assert task_names() == tuple(ROWS)
    with pytest.raises(ConfigError, match="task: unknown task 'dop'; did you mean 'dpo'"):
        _cfg("dop")
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("dop")


def test_task_rules_name_their_key_and_the_tasks_that_allow_it():
    streamed = _cfg("dpo", data={"train": "x.jsonl", "streaming": True})
    assert any(p.startswith("data.streaming: only task: sft streams") for p in check_config(streamed))
    continued = _cfg("classify", train={"init_from": "runs/earlier"})
    assert any(p.startswith("train.init_from: only task: sft") for p in check_config(continued))
    assert check_config(_cfg("sft")) == []
    rl = _cfg("rl", rl={"max_new_tokens": 600})
    assert any(p.startswith("rl.max_new_tokens: 600 leaves no room") for p in check_config(rl))


def test_an_eval_option_the_task_does_not_take_is_an_error_naming_the_tasks_that_do(tmp_path):
    with pytest.raises(TunekitError, match="--few-shot applies to task: sft runs; this is a task: dpo run"):
        get_task("dpo").evaluate(tmp_path, few_shot=3)
    with pytest.raises(TunekitError, match="--reward-model applies to task: dpo or rl runs"):
        get_task("sft").evaluate(tmp_path, reward_model=tmp_path)


def test_what_the_table_says_about_outputs_and_processes():
    generative = {n for n in ROWS if get_task(n).generative}
    # classifiers and reward models have no LM head
    assert generative == {"sft", "dpo", "kto", "orpo", "rl", "pretrain"}
    assert [n for n in ROWS if not get_task(n).multi_process] == ["rl", "pretrain"]
    assert [n for n in ROWS if get_task(n).not_resumable] == ["rl"]
