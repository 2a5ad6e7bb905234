"""Data parallel on 2 CPU processes (gloo), launched by `tunekit train --nproc 2` through torchrun.

Two processes with batch 4 must train exactly what one process with batch 8 trains; a checkpoint
written by either resumes in the other; only rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tunekit.run_dir import read_metrics


def _config(path, model_dir, data, out, **train):
    path.write_text(
        json.dumps(
            {
                "model": str(model_dir),
                "data": {"train": str(data), "split": [0.9, 0.1, 0.0]},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                # constant learning rate: a resumed run with more steps follows the same schedule
                "train": {
                    "batch_size": 8,
                    "learning_rate": 5e-3,
                    "lr_scheduler": "constant",
                    "warmup_ratio": 0.0,
                    "save_steps": 2,
                    "eval_every": 2,
                }
                | train,
                "output_dir": str(out),
            }
        )
    )
    return path


def _tunekit(*args, timeout=600):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunekit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    return out


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _close(a: dict, b: dict, rel=1e-4):
    assert sorted(a) == sorted(b)
    for k in a:
        assert abs(a[k] - b[k]) <= rel * abs(a[k]), (k, a[k], b[k])


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """The reference: one process, batch 8, six steps straight through."""
    from conftest import jsonl, write

    tmp = tmp_path_factory.mktemp("one")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Code for item {i}?"},
                {"role": "assistant", "content": f"C-{i % 4}"},
            ]
        }
        for i in range(40)
    ]
    data = write(tmp, "chat.jsonl", jsonl(*rows))
    cfg = _config(tmp / "c.yaml", tiny_model_dir, data, tmp / "run", max_steps=6)
    _tunekit("train", cfg)
    return data, _losses(tmp / "run")


def test_two_processes_train_what_one_process_trains(one_process, tiny_model_dir, tmp_path):
    data, reference = one_process
    cfg = _config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "run", max_steps=6, batch_size=4)
    out = _tunekit("train", cfg, "--nproc", "2")
    _close(reference, _losses(tmp_path / "run"))
    # rank 0 alone writes: one record per step, one adapter, no second progress log
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert steps == list(range(1, 7))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert out.count("trained 6 steps") == 1
    # tokenized once by rank 0, read by rank 1: one cache file per split
    assert len(list((tmp_path / "run" / "cache").glob("train-*.jsonl"))) == 1


def test_checkpoints_move_between_one_and_two_processes(one_process, tiny_model_dir, tmp_path):
    data, reference = one_process
    # two processes for 4 steps, then one process resumes to 6
    cfg = _config(tmp_path / "a.yaml", tiny_model_dir, data, tmp_path / "a", max_steps=4, batch_size=4)
    _tunekit("train", cfg, "--nproc", "2")
    out = _tunekit("train", cfg, "--resume", "--set", "train.max_steps=6", "--set", "train.batch_size=8")
    assert "step 4 of 6" in out
    _close(reference, _losses(tmp_path / "a"))
    # one process for 4 steps, then two processes resume to 6
    cfg = _config(tmp_path / "b.yaml", tiny_model_dir, data, tmp_path / "b", max_steps=4)
    _tunekit("train", cfg)
    _tunekit(
        "train", cfg, "--resume", "--nproc", "2", "--set", "train.max_steps=6", "--set", "train.batch_size=4"
    )
    _close(reference, _losses(tmp_path / "b"))


def test_unimplemented_strategies_are_refused(tiny_model_dir, tmp_path):
    from conftest import jsonl, write

    data = write(tmp_path, "d.jsonl", jsonl({"prompt": "a", "completion": "b"}))
    cfg = _config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "run")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunekit",
            "train",
            str(cfg),
            "--nproc",
            "2",
            "--set",
            "distributed.strategy=fsdp",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "distributed.strategy" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
