"""The run session (train/session.py): every entry point ends its registry row, whatever happens.

A run is `running` while it trains and ends `done`, `failed` or `interrupted`; before the session,
a quickstart that failed, or a SIGTERM during setup, left the row at `running` for good."""

from __future__ import annotations

import json
import signal

import pytest

import tunekit
from conftest import signal_on_call
from tunekit.config import config_from_dict
from tunekit.errors import Interrupted, TunekitError
from tunekit.runs import registry
from tunekit.tasks import get_task
from tunekit.train.recipes import sft
from tunekit.train.session import RunSession, train


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registry, "_warned", False)


def _cfg(tiny_model_dir, chat_file, tmp_path, **train):
    return config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train": str(chat_file)},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 2, "batch_size": 4, "max_length": 64} | train,
            "output_dir": str(tmp_path / "run"),
        }
    )


def _status() -> str:
    (run,) = registry.list_runs()
    return run["status"]


def test_a_failed_quickstart_ends_its_row_as_failed(tiny_model_dir, tmp_path):
    # max_length 16 leaves no example a target token: the recipe fails after the run registered.
    overrides = [f"model={tiny_model_dir}", "train.max_length=16"]
    with pytest.raises(TunekitError, match="no example has target tokens"):
        tunekit.quickstart(tmp_path / "qs", overrides)
    assert _status() == "failed"


def test_sigterm_during_setup_ends_the_row_as_interrupted(monkeypatch, tiny_model_dir, chat_file, tmp_path):
    signal_on_call(monkeypatch, sft, "build_model", 1)  # while the model loads, before any step
    with pytest.raises(Interrupted, match="SIGTERM") as e:
        train(_cfg(tiny_model_dir, chat_file, tmp_path), quiet=True)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert _status() == "interrupted"


def test_a_recipe_that_returns_without_finishing_is_failed(tiny_model_dir, chat_file, tmp_path):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path)
    with RunSession(cfg, get_task("sft"), quiet=True) as run:
        assert _status() == "running" and (run.dir / "data" / "manifest.json").is_file()
    assert _status() == "failed"


def test_the_session_restores_the_signal_handlers(tiny_model_dir, chat_file, tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    train(_cfg(tiny_model_dir, chat_file, tmp_path), quiet=True)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert _status() == "done"


def test_every_public_entry_point_goes_through_the_session(tiny_model_dir, chat_file, tmp_path):
    run = tunekit.fine_tune(_cfg(tiny_model_dir, chat_file, tmp_path), quiet=True)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["task"] == "sft" and summary["setup_seconds"] > 0 and _status() == "done"
    # train_sft, the first release's API, trains task sft whatever the config says.
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path).model_copy(update={"output_dir": tmp_path / "b"})
    assert tunekit.train_sft(cfg, quiet=True) == tmp_path / "b"
