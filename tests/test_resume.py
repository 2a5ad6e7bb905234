"""Crash-safe training: atomic checkpoints, exact resume, SIGTERM/SIGINT, SIGKILL, determinism.

In the style of torchtune's test_training_state_on_resume: a run stopped at step k and resumed
must log the same losses after k as a run that went straight through.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tunekit.train.recipes.sft as sft
from conftest import signal_on_call
from tunekit.config import config_from_dict
from tunekit.errors import Interrupted, TunekitError
from tunekit.runs.directory import read_metrics
from tunekit.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from tunekit.train.session import resume, train


def _cfg(model_dir, data, out, **train_kw):
    train_cfg = {
        "max_steps": 8,
        "batch_size": 4,
        "learning_rate": 5e-3,
        "save_steps": 3,
        "warmup_ratio": 0.25,
    }
    return config_from_dict(
        {
            "model": str(model_dir),
            "data": {"train": str(data), "split": [0.9, 0.1, 0.0]},
            # dropout on: the resumed run must replay the same dropout masks (RNG state restored)
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "train": train_cfg | train_kw,
            "output_dir": str(out),
        }
    )


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _interrupt_at(monkeypatch, k: int, signum=signal.SIGTERM):
    """Deliver a real signal to this process during optimizer step k (1-based)."""
    signal_on_call(monkeypatch, sft, "accumulate_gradients", k, signum)


def test_resume_after_sigterm_gives_the_same_losses(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    straight = train(_cfg(tiny_model_dir, chat_file, tmp_path / "straight"), quiet=True)

    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "stopped")
    _interrupt_at(monkeypatch, 5)
    with pytest.raises(Interrupted) as e:
        train(cfg, quiet=True)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert "tunekit resume" in str(e.value)
    # the step in flight finishes and is checkpointed before exiting
    assert latest_checkpoint(cfg.output_dir).name == "step-000005"
    monkeypatch.undo()

    resumed = train(cfg, quiet=True, resume=True)
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(6, 9):
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    wa = torch.load(straight / "checkpoints/step-000008/optimizer.pt", weights_only=True)
    wb = torch.load(resumed / "checkpoints/step-000008/optimizer.pt", weights_only=True)
    for sa, sb in zip(wa["state"].values(), wb["state"].values(), strict=True):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-7)


def test_sigint_saves_a_checkpoint_and_resume_run_dir_finishes(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run")
    _interrupt_at(monkeypatch, 2, signal.SIGINT)
    with pytest.raises(Interrupted) as e:
        train(cfg, quiet=True)
    assert e.value.exit_code == 130
    monkeypatch.undo()
    run_dir = resume(cfg.output_dir, quiet=True)
    assert sorted(_losses(run_dir)) == list(range(1, 9))
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_same_seed_same_losses_and_batch_equals_accumulation(tiny_model_dir, chat_file, tmp_path):
    kw = {"max_steps": 4, "save_steps": None}
    a = _losses(train(_cfg(tiny_model_dir, chat_file, tmp_path / "a", **kw), quiet=True))
    b = _losses(train(_cfg(tiny_model_dir, chat_file, tmp_path / "b", **kw), quiet=True))
    assert a == b, "same seed, data and machine must give the same losses"

    def no_dropout(name, **k):
        c = _cfg(tiny_model_dir, chat_file, tmp_path / name, **kw, **k)
        c.lora.dropout = 0.0
        return _losses(train(c, quiet=True))

    big = no_dropout("b8", batch_size=8, grad_accum=1)
    accum = no_dropout("b1x8", batch_size=1, grad_accum=8)
    for step in big:
        assert abs(big[step] - accum[step]) <= 1e-4 * abs(big[step]), (step, big[step], accum[step])


def test_checkpoints_are_atomic_and_pruned(tiny_model_dir, chat_file, tmp_path):
    run_dir = train(
        _cfg(tiny_model_dir, chat_file, tmp_path / "run", save_steps=2, save_total_limit=2), quiet=True
    )
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000006", "step-000008"]
    # a save killed half-way leaves only a hidden temporary folder: never listed, cleared next time
    partial = run_dir / "checkpoints" / ".tmp-killed"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half")
    assert latest_checkpoint(run_dir).name == "step-000008"

    from tunekit.train.setup import build_model

    model, params = build_model(_cfg(tiny_model_dir, chat_file, run_dir), tiny_model_dir)
    opt = torch.optim.AdamW(params)
    state = load_checkpoint(latest_checkpoint(run_dir), model, opt)
    assert state["step"] == 8
    save_checkpoint(run_dir, model, opt, state | {"step": 9}, total_limit=2)
    assert not partial.exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000008", "step-000009"]


def test_a_damaged_checkpoint_is_a_clear_error(tiny_model_dir, chat_file, tmp_path):
    run_dir = train(_cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=3), quiet=True)
    ckpt = latest_checkpoint(run_dir)
    (ckpt / "trainable.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TunekitError, match="delete it to resume from the one before"):
        train(_cfg(tiny_model_dir, chat_file, run_dir, max_steps=3), quiet=True, resume=True)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_model_dir, chat_file, tmp_path):
    cfg = _cfg(
        tiny_model_dir, chat_file, tmp_path / "run", save_steps=2, learning_rate=1e30, max_grad_norm=None
    )
    with pytest.raises(TunekitError, match=r"step \d+: the loss or gradient is not finite"):
        train(cfg, quiet=True)
    # whatever checkpoints were written before the blow-up are complete and loadable
    for ckpt in list_checkpoints(cfg.output_dir):
        assert (ckpt / "state.json").is_file()


def _tunekit(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "tunekit", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        **kw,
    )


def _wait_for_step(run_dir: Path, step: int, proc, timeout=240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return
        try:
            if len((run_dir / "metrics.jsonl").read_text().splitlines()) >= step:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_sigkill_at_random_moments_then_resume_completes(tiny_model_dir, chat_file, tmp_path):
    """Kill a real training process with SIGKILL three times; each resume loses at most the steps
    since the last checkpoint, and the run completes."""
    total, every = 60, 5
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        json.dumps(
            {
                "model": str(tiny_model_dir),
                "data": {"train": str(chat_file), "split": [0.9, 0.1, 0.0]},
                "lora": {"r": 4, "dropout": 0.1},
                "train": {"max_steps": total, "batch_size": 2, "save_steps": every, "eval_every": 1000},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    killed_at = []
    for attempt in range(3):
        args = ["train", cfg_path] if attempt == 0 else ["resume", run_dir]
        proc = _tunekit(*args)
        _wait_for_step(run_dir, rng.randint(3, 12) + attempt * 15, proc)
        time.sleep(rng.random() * 0.3)  # anywhere inside a step, or inside a checkpoint save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        logged = max(
            json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        )
        ckpt = latest_checkpoint(run_dir)  # None if killed before the first save: resume starts over
        kept = int(ckpt.name.split("-")[1]) if ckpt else 0
        assert logged - kept <= every, "lost more than the steps since the last checkpoint"
        killed_at.append(logged)
    proc = _tunekit("resume", run_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1)), "every step logged exactly once after the resumes"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_sigterm_to_a_real_process_exits_cleanly(tiny_model_dir, chat_file, tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        json.dumps(
            {
                "model": str(tiny_model_dir),
                "data": {"train": str(chat_file)},
                "train": {"max_steps": 500, "batch_size": 2, "save_steps": 1000},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    proc = _tunekit("train", cfg_path)
    _wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "Traceback" not in out
    assert "tunekit resume" in out
    assert latest_checkpoint(tmp_path / "run") is not None


def test_too_little_disk_space_is_refused_before_training(tmp_path):
    from tunekit.train.checkpoint import ensure_free_space

    ensure_free_space(tmp_path, 1)
    with pytest.raises(TunekitError, match="MiB free"):
        ensure_free_space(tmp_path, 2**62)


def test_a_full_disk_while_checkpointing_fails_cleanly(tiny_model_dir, chat_file, tmp_path):
    """A file-size limit makes the checkpoint write fail like a full disk would (EFBIG instead of
    ENOSPC): a clear error, exit 2, and no checkpoint that looks complete but is not."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get an OSError instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        json.dumps(
            {
                "model": str(tiny_model_dir),
                "method": "full",  # about 13 MB of weights and 25 MB of optimizer state per checkpoint
                "data": {"train": str(chat_file)},
                "train": {"max_steps": 2, "batch_size": 4, "save_steps": 1},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    proc = _tunekit("train", cfg_path, preexec_fn=limit)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert "cannot write the checkpoint" in out
    assert list_checkpoints(tmp_path / "run") == []
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("task", ["classify", "reward", "dpo"])
def test_every_gradient_task_resumes_exactly(task, tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """The loop is shared, so is resume: a run of each task stopped by SIGTERM after step 2 and
    resumed logs the losses of a run that went straight through."""
    import tunekit.train.loop as loop
    from conftest import jsonl, write

    if task == "classify":
        rows = [
            {"text": f"order {i} is about {w}", "label": w}
            for i, w in enumerate(["billing", "shipping"] * 12)
        ]
        data = write(tmp_path, "labels.jsonl", jsonl(*rows))
    else:
        data = pairs_file

    def cfg(out):
        return config_from_dict(
            {
                "model": str(tiny_model_dir),
                "task": task,
                "data": {"train": str(data), "split": [0.8, 0.2, 0.0]},
                "lora": {"r": 4, "dropout": 0.1},
                "train": {
                    "max_steps": 4,
                    "batch_size": 4,
                    "learning_rate": 5e-3,
                    "save_steps": 2,
                    "max_length": 64,
                },
                "output_dir": str(out),
            }
        )

    straight = _losses(train(cfg(tmp_path / "straight"), quiet=True))
    signal_on_call(monkeypatch, loop, "_grad_norm", 3)
    with pytest.raises(Interrupted):
        train(cfg(tmp_path / "stopped"), quiet=True)
    monkeypatch.undo()
    resumed = _losses(train(cfg(tmp_path / "stopped"), quiet=True, resume=True))
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4]
    for step in (4,):
        assert abs(straight[step] - resumed[step]) <= 1e-5 * abs(straight[step]), (step, straight, resumed)
