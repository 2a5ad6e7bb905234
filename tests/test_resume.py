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


def test_checkpoints_are_pruned(tiny_model_dir, chat_file, tmp_path):
    run_dir = train(
        _cfg(tiny_model_dir, chat_file, tmp_path / "run", save_steps=2, save_total_limit=2), quiet=True
    )
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000006", "step-000008"]


# A real save_checkpoint, killed with SIGKILL at a given point of the save (a subprocess: only a
# real kill leaves what a kill leaves). It saves step 1 whole first, then is killed saving step 2.
_KILLED_SAVE = """
import os, signal, sys, torch
import tunekit.train.checkpoint as ck

run_dir, point = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(8, 8)
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(2, 8)).sum().backward()
opt.step()
state = {k: 0 for k in ck.STATE_KEYS if k != "rng"} | {"step_groups": [], "val": {}, "window": {}}
ck.save_checkpoint(run_dir, model, opt, state | {"step": 1}, total_limit=None)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "mid-file":  # optimizer.pt half written
    real = torch.save
    def half(obj, f, *a, **k):
        real(obj, f, *a, **k)
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
        die()
    torch.save = half
elif point == "before-manifest":
    ck._write_manifest = die
elif point == "before-rename":
    os.replace = die
ck.save_checkpoint(run_dir, model, opt, state | {"step": 2}, total_limit=None)
print("the save was not interrupted")
"""


@pytest.mark.parametrize("point", ["mid-file", "before-manifest", "before-rename"])
def test_a_save_killed_at_any_point_leaves_the_last_checkpoint_intact(point, tmp_path):
    from tunekit.train.checkpoint import verify_checkpoint

    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path), point],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    (partial,) = (tmp_path / "checkpoints").glob(".tmp-*")  # the killed save got part of the way
    assert (partial / "trainable.safetensors").is_file()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert verify_checkpoint(latest_checkpoint(tmp_path)) is None

    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    state = load_checkpoint(latest_checkpoint(tmp_path), model, opt)
    assert state["step"] == 1
    save_checkpoint(tmp_path, model, opt, state | {"step": 2}, total_limit=None)
    assert not partial.exists(), "the next save clears what the killed one left"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda c: _flip_a_byte(c / "optimizer.pt"), "optimizer.pt does not match its sha256"),
        (
            lambda c: (c / "trainable.safetensors").write_bytes(b"not safetensors"),
            "trainable.safetensors has",
        ),
        (lambda c: (c / "rng.pt").unlink(), "rng.pt is missing"),
        (lambda c: (c / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda c: (c / "manifest.json").write_text("{"), "manifest.json cannot be read"),
    ],
)
def test_a_damaged_checkpoint_is_refused_by_name(damage, named, tiny_model_dir, chat_file, tmp_path):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=3, save_steps=1)
    run_dir = train(cfg, quiet=True)
    ckpt = latest_checkpoint(run_dir)
    damage(ckpt)
    with pytest.raises(TunekitError, match="--skip-damaged") as e:
        train(cfg, quiet=True, resume=True)
    assert f"{ckpt}: damaged checkpoint: {named}" in str(e.value)
    assert ckpt.is_dir(), "refusing moves nothing"


def test_skip_damaged_falls_back_to_the_intact_checkpoint_before(tiny_model_dir, chat_file, tmp_path):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run", save_steps=2, save_total_limit=None)
    run_dir = train(cfg, quiet=True)
    straight = _losses(run_dir)
    _flip_a_byte(run_dir / "checkpoints/step-000008/trainable.safetensors")  # the same size, other weights
    resumed = _losses(train(cfg, quiet=True, resume=True, skip_damaged=True))
    assert (run_dir / "checkpoints/damaged-step-000008").is_dir(), "kept aside to look at, never listed"
    assert [c.name for c in list_checkpoints(run_dir)][-2:] == ["step-000006", "step-000008"]
    assert sorted(resumed) == list(range(1, 9))
    for step in (7, 8):  # replayed from step 6, exactly
        assert abs(straight[step] - resumed[step]) <= 1e-5 * abs(straight[step]), step


def test_a_state_json_missing_a_key_is_a_clear_error(tiny_model_dir, chat_file, tmp_path):
    """An older version's checkpoint (no manifest) whose state.json lacks a key."""
    from tunekit.train.checkpoint import verify_checkpoint

    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=3)
    ckpt = latest_checkpoint(train(cfg, quiet=True))
    (ckpt / "manifest.json").unlink()
    state = json.loads((ckpt / "state.json").read_text())
    del state["format"], state["step_groups"]
    (ckpt / "state.json").write_text(json.dumps(state))
    assert verify_checkpoint(ckpt) == "state.json lacks step_groups"
    with pytest.raises(TunekitError, match=r"step-000003: damaged checkpoint: state\.json lacks step_groups"):
        train(cfg, quiet=True, resume=True)


def test_a_checkpoint_from_before_checksums_still_resumes(tiny_model_dir, chat_file, tmp_path):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run")
    run_dir = train(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 3})}), quiet=True
    )
    ckpt = latest_checkpoint(run_dir)
    (ckpt / "manifest.json").unlink()
    state = json.loads((ckpt / "state.json").read_text())
    for key in ("format", "config", "config_hash"):
        del state[key]
    (ckpt / "state.json").write_text(json.dumps(state))
    assert sorted(_losses(train(cfg, quiet=True, resume=True))) == list(range(1, 9))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    """The gradient turns non-finite at step 5, after the checkpoints of steps 2 and 4."""
    import tunekit.train.loop as loop
    from tunekit.train.checkpoint import verify_checkpoint

    real, calls = loop._grad_norm, {"n": 0}

    def nan_at_step_5(params, max_norm):
        calls["n"] += 1
        return float("nan") if calls["n"] == 5 else real(params, max_norm)

    monkeypatch.setattr(loop, "_grad_norm", nan_at_step_5)
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run", save_steps=2, save_total_limit=None)
    with pytest.raises(TunekitError, match=r"step 5: the loss or gradient is not finite"):
        train(cfg, quiet=True)
    ckpts = list_checkpoints(cfg.output_dir)
    assert [c.name for c in ckpts] == ["step-000002", "step-000004"]
    for ckpt in ckpts:
        assert verify_checkpoint(ckpt) is None
    assert sorted(_losses(cfg.output_dir)) == [1, 2, 3, 4]
    monkeypatch.undo()
    # and the run resumes from step 4 to its end
    assert sorted(_losses(train(cfg, quiet=True, resume=True))) == list(range(1, 9))


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


# ---------------------------------------------------------------------------------------------
# A full disk mid-run: one clear error, whole metrics lines, and a pre-check that counts everything


def test_a_full_disk_mid_line_leaves_whole_metrics_lines_and_resumes(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    """The disk fills while step 5's metrics line is written: write(2) puts half of it down."""
    real = os.write

    def half_at_step_5(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl") and b'"step": 5,' in data:
            real(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", half_at_step_5)
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run")
    with pytest.raises(TunekitError, match=r"metrics\.jsonl: cannot log step 5 \(No space left on device\)"):
        train(cfg, quiet=True)
    monkeypatch.undo()
    text = (cfg.output_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3, 4]
    assert sorted(_losses(train(cfg, quiet=True, resume=True))) == list(range(1, 9))


def test_resume_drops_a_half_written_last_line_left_by_an_older_version(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run")
    _interrupt_at(monkeypatch, 5)
    with pytest.raises(Interrupted):
        train(cfg, quiet=True)
    monkeypatch.undo()
    with (cfg.output_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "epoch": 0.8, "lo')  # killed mid-append, no newline
    assert [r["step"] for r in read_metrics(cfg.output_dir)] == [1, 2, 3, 4, 5]
    resumed = train(cfg, quiet=True, resume=True)
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"loss"' in line] == list(range(1, 9))


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device", "adapter_model.safetensors"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    ],
)
def test_a_full_disk_at_the_final_save_is_one_clear_error(
    error, tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    """The end of the run (the model, the tokenizer, the summary) runs out of disk: a TunekitError
    (printed without a traceback), the run marked failed, and the last checkpoint to resume from."""

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(sft, "save_trained", full)
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=2)
    with pytest.raises(TunekitError, match="the disk is full") as e:
        train(cfg, quiet=True)
    assert "tunekit resume" in str(e.value) and "free disk space" in str(e.value)
    assert latest_checkpoint(cfg.output_dir).name == "step-000002"


def test_another_error_at_the_final_save_keeps_its_traceback(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug, not the disk")

    monkeypatch.setattr(sft, "save_trained", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        train(_cfg(tiny_model_dir, chat_file, tmp_path / "run", max_steps=2), quiet=True)


def _bytes(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    )


def test_the_free_space_check_counts_everything_the_run_writes(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    """What the run writes after the check (its peak: the kept checkpoints plus the one being
    written, then the model with its tokenizer, metrics and summary) fits in what it asked for."""
    import tunekit.train.loop as loop

    asked = []
    monkeypatch.setattr(loop, "ensure_free_space", lambda run_dir, need: asked.append(need))
    run_dir = train(
        _cfg(tiny_model_dir, chat_file, tmp_path / "run", save_steps=1, save_total_limit=2), quiet=True
    )
    written_after_check = ("checkpoints", "adapter", "metrics.jsonl", "train_summary.json", "tensorboard")
    one_checkpoint = _bytes(latest_checkpoint(run_dir))
    assert _bytes(run_dir / "adapter" / "tokenizer.json") > 10 * one_checkpoint, (
        "the tokenizer dominates here"
    )
    peak = (
        sum(_bytes(run_dir / name) for name in written_after_check if (run_dir / name).exists())
        + one_checkpoint
    )
    assert asked and asked[0] >= peak, (asked, peak)
    assert asked[0] <= 4 * peak + 8 * 2**20, "and not absurdly more"


def test_every_metrics_writer_appends_whole_lines():
    """The class, not the case: no module appends to a file but runs/directory.append_metrics."""
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "tunekit"
    appends = re.compile(r"""open\([^)]*["']a[b+]?["']|O_APPEND""")
    found = [str(p.relative_to(src)) for p in src.rglob("*.py") if appends.search(p.read_text())]
    # ship/ft_worker.py appends a training process's stdout to its job log (a byte stream kept
    # across resumes, read only for its last line on failure): not a file of records.
    assert sorted(found) == ["runs/directory.py", "ship/ft_worker.py"], found
    assert appends.findall((src / "ship/ft_worker.py").read_text()) == ['open(log, "ab"']


def test_a_failed_safetensors_write_is_caught_and_named(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(
        TunekitError, match=r"step-000003: cannot write the checkpoint \(Error while serializing"
    ):
        save_checkpoint(tmp_path, model, opt, {"step": 3})
    assert list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").glob(".tmp-*"))
