"""An output_dir that holds another run: never resumed silently, and never resumed under another config.

`tunekit train` into a folder with an earlier run's checkpoints refuses unless told `--resume`
(continue it) or `--overwrite` (start over); `--resume` refuses a checkpoint written under another
config, naming each key that differs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tunekit.config import config_from_dict
from tunekit.errors import ConfigError, TunekitError
from tunekit.runs.directory import read_metrics
from tunekit.train.checkpoint import list_checkpoints
from tunekit.train.session import train


def _raw(model_dir, data, out, **train_kw):
    return {
        "model": str(model_dir),
        "data": {"train": str(data), "split": [0.9, 0.1, 0.0]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 3, "batch_size": 4, "max_length": 64, "save_steps": 1} | train_kw,
        "output_dir": str(out),
    }


def _cfg(*args, **kw):
    return config_from_dict(_raw(*args, **kw))


def _steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


def test_training_into_an_earlier_runs_folder_is_refused(tiny_model_dir, chat_file, tmp_path):
    run_dir = train(_cfg(tiny_model_dir, chat_file, tmp_path / "run"), quiet=True)
    before = {p.name: (p / "manifest.json").read_text() for p in list_checkpoints(run_dir)}
    again = _cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=2, learning_rate=1e-3)
    with pytest.raises(TunekitError, match="holds the checkpoints of an earlier run") as e:
        train(again, quiet=True)
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value) and "step-000003" in str(e.value)
    after = {p.name: (p / "manifest.json").read_text() for p in list_checkpoints(run_dir)}
    assert after == before, "the earlier run is untouched"


def test_overwrite_starts_clean(tiny_model_dir, chat_file, tmp_path):
    run_dir = train(_cfg(tiny_model_dir, chat_file, tmp_path / "run", save_total_limit=None), quiet=True)
    (run_dir / "report.md").write_text("the earlier run's report")
    (run_dir / "notes.txt").write_text("the user's own file")
    again = _cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=2, save_total_limit=None)
    train(again, quiet=True, overwrite=True)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000001", "step-000002"]
    assert _steps(run_dir) == [1, 2]
    assert not (run_dir / "report.md").exists(), "no stale report of the earlier run"
    assert (run_dir / "notes.txt").is_file(), "only what a run writes is removed"
    assert json.loads((run_dir / "train_summary.json").read_text())["steps"] == 2


def test_resume_and_overwrite_and_skip_damaged_are_checked(tiny_model_dir, chat_file, tmp_path):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run")
    with pytest.raises(ConfigError, match="give one"):
        train(cfg, quiet=True, resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="--skip-damaged .* with --resume"):
        train(cfg, quiet=True, skip_damaged=True)


def test_resume_refuses_a_checkpoint_of_another_config_naming_what_differs(
    tiny_model_dir, chat_file, tmp_path
):
    run_dir = train(_cfg(tiny_model_dir, chat_file, tmp_path / "run", save_total_limit=None), quiet=True)
    other = _raw(tiny_model_dir, chat_file, run_dir, max_steps=5, learning_rate=1e-3)
    other["lora"]["r"] = 8
    with pytest.raises(ConfigError) as e:
        train(config_from_dict(other), quiet=True, resume=True)
    msg = str(e.value)
    assert "train.learning_rate: 0.0002 -> 0.001" in msg and "lora.r: 4 -> 8" in msg
    assert "another config" in msg and "step-000003" in msg
    assert "max_steps" not in msg, "a run may be extended"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000001", "step-000002", "step-000003"]

    # what a checkpoint does not depend on may change: the plan's length, evaluation, saving, speed
    same = _raw(tiny_model_dir, chat_file, run_dir, max_steps=5, save_steps=2, lean_activations=False)
    same["eval"] = {"max_examples": 3}
    train(config_from_dict(same), quiet=True, resume=True)
    assert _steps(run_dir) == [1, 2, 3, 4, 5]


def test_the_global_batch_may_be_laid_out_anew_but_not_changed(tiny_model_dir, chat_file, tmp_path):
    run_dir = train(_cfg(tiny_model_dir, chat_file, tmp_path / "run", batch_size=4), quiet=True)
    with pytest.raises(ConfigError, match="train.global_batch: 4 -> 8"):
        train(_cfg(tiny_model_dir, chat_file, run_dir, max_steps=4, batch_size=8), quiet=True, resume=True)
    # 2 x accumulation 2 is the same global batch of 4
    train(
        _cfg(tiny_model_dir, chat_file, run_dir, max_steps=4, batch_size=2, grad_accum=2),
        quiet=True,
        resume=True,
    )
    assert _steps(run_dir) == [1, 2, 3, 4]


def test_an_rl_runs_stage_checkpoints_count_as_an_earlier_run(tmp_path):
    from tunekit.train.session import earlier_checkpoints

    (tmp_path / "stages" / "sft" / "checkpoints" / "step-000004").mkdir(parents=True)
    (tmp_path / "stages" / "sft" / "checkpoints" / ".tmp-x").mkdir()
    assert [p.name for p in earlier_checkpoints(tmp_path)] == ["step-000004"]


def test_overwrite_leaves_a_folder_that_is_no_run_alone(tmp_path):
    from tunekit.runs.directory import clear_run_outputs

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text("{}\n")
    (tmp_path / "metrics.jsonl").write_text("")
    assert clear_run_outputs(tmp_path) == []
    assert (tmp_path / "data" / "mine.jsonl").is_file() and (tmp_path / "metrics.jsonl").is_file()


def test_the_cli_refuses_then_overwrites(tiny_model_dir, chat_file, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(_raw(tiny_model_dir, chat_file, tmp_path / "run", max_steps=2)))

    def tunekit(*args):
        env = os.environ | {"TUNEKIT_HOME": str(tmp_path / "home")}
        return subprocess.run(
            [sys.executable, "-m", "tunekit", *args], capture_output=True, text=True, env=env, timeout=300
        )

    assert tunekit("train", str(path)).returncode == 0
    r = tunekit("train", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "holds the checkpoints of an earlier run" in " ".join(r.stderr.split())
    r = tunekit("train", str(path), "--overwrite")
    assert r.returncode == 0, r.stderr
    r = tunekit("train", str(path), "--resume", "--set", "train.learning_rate=0.5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.learning_rate: 0.0002 -> 0.5" in r.stderr


def test_the_quickstart_starts_over_in_its_own_folder(tiny_model_dir, tmp_path, monkeypatch):
    """`make demo` twice: the second quickstart replaces the first rather than refusing."""
    import tunekit.demo.quickstart as qs

    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(qs, "evaluate", lambda run_dir: {"contenders": {}})  # training is what is tested
    monkeypatch.setattr(qs, "print_contenders", lambda report: None)
    overrides = [f"model={tiny_model_dir}", "train.max_steps=2", "train.max_length=64"]
    for _ in range(2):
        qs.quickstart(tmp_path / "qs", overrides)
    assert [p.name for p in list_checkpoints(tmp_path / "qs")] == ["step-000002"]
    assert _steps(tmp_path / "qs") == [1, 2]
