"""Data parallel on 2 CPU processes (gloo), launched by `tunekit train --nproc 2` through torchrun.

Two processes with batch 4 must train exactly what one process with batch 8 trains, with DDP and
with FSDP (FSDP2, each layer sharded over the two); a checkpoint written by either resumes in the
other; only rank 0 writes the run directory, and an FSDP run saves the files one process saves. QLoRA
shards under FSDP too (its 4-bit base stored as float tensors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tunekit.runs.directory import read_metrics


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
    return data, _losses(tmp / "run"), tmp / "run"


def test_two_processes_train_what_one_process_trains(one_process, tiny_model_dir, tmp_path):
    data, reference, _ = one_process
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoints_move_between_one_and_two_processes(strategy, one_process, tiny_model_dir, tmp_path):
    data, reference, _ = one_process
    two = ["--nproc", "2", "--set", f"distributed.strategy={strategy}"]
    # two processes for 4 steps, then one process resumes to 6
    cfg = _config(tmp_path / "a.yaml", tiny_model_dir, data, tmp_path / "a", max_steps=4, batch_size=4)
    _tunekit("train", cfg, *two)
    out = _tunekit("train", cfg, "--resume", "--set", "train.max_steps=6", "--set", "train.batch_size=8")
    assert "step 4 of 6" in out
    _close(reference, _losses(tmp_path / "a"))
    # one process for 4 steps, then two processes resume to 6
    cfg = _config(tmp_path / "b.yaml", tiny_model_dir, data, tmp_path / "b", max_steps=4)
    _tunekit("train", cfg)
    _tunekit("train", cfg, "--resume", *two, "--set", "train.max_steps=6", "--set", "train.batch_size=4")
    _close(reference, _losses(tmp_path / "b"))


def _logits(run_dir, text="Code for item 7?"):
    import torch

    from tunekit.train.setup import load_trained

    model, tokenizer, _ = load_trained(run_dir)
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_fsdp_trains_what_one_process_trains_and_saves_what_it_saves(one_process, tiny_model_dir, tmp_path):
    """FSDP shards the frozen base and the adapter of each layer over the two processes; the losses,
    the adapter file and the adapter's outputs in one process equal the one-process run's."""
    import torch
    from safetensors.torch import load_file

    data, reference, reference_dir = one_process
    cfg = _config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "run", max_steps=6, batch_size=4)
    out = _tunekit("train", cfg, "--nproc", "2", "--set", "distributed.strategy=fsdp")
    assert "fsdp: 2 layers and the root sharded over 2 processes" in out  # sharded, not replicated
    _close(reference, _losses(tmp_path / "run"))
    assert out.count("trained 6 steps") == 1
    # the adapter was gathered from the shards: the same file, loading in one process
    ours = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference_dir / "adapter" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    torch.testing.assert_close(_logits(tmp_path / "run"), _logits(reference_dir), rtol=1e-4, atol=1e-4)


def test_fsdp_full_fine_tune_saves_the_model_one_process_saves(one_process, tiny_model_dir, tmp_path):
    """method: full under FSDP: every weight sharded (the tied embedding and head included) and
    trained; the saved model has the one-process run's files and weights."""
    from safetensors.torch import load_file

    data, _, _ = one_process
    full = ["--set", "method=full", "--set", "train.learning_rate=1e-3"]
    one = _config(tmp_path / "one.yaml", tiny_model_dir, data, tmp_path / "one", max_steps=3)
    _tunekit("train", one, *full)
    two = _config(tmp_path / "two.yaml", tiny_model_dir, data, tmp_path / "two", max_steps=3, batch_size=4)
    _tunekit("train", two, *full, "--nproc", "2", "--set", "distributed.strategy=fsdp")
    _close(_losses(tmp_path / "one"), _losses(tmp_path / "two"))
    ours, theirs = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("two", "one"))
    assert sorted(ours) == sorted(theirs)  # the tied head is saved once, as one process saves it
    for k in ours:
        assert (ours[k] - theirs[k]).abs().max() <= 1e-5, k


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_fsdp_gives_every_rank_as_many_micro_batches(n, monkeypatch):
    """Each FSDP forward is a collective: every rank must run the same number of non-empty
    micro-batches, or the processes wait on each other forever."""
    from tunekit.train import distributed

    monkeypatch.setattr(distributed, "world", lambda: n)
    for total in range(1, 30):
        for batch_size in (1, 2, 3, 4):
            shares = []
            for r in range(n):
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                shares.append(distributed.micro_batches(list(range(total)), batch_size, even=True))
            assert len({len(s) for s in shares}) == 1, (total, batch_size, shares)
            assert all(mb for s in shares for mb in s)
            assert max(len(mb) for s in shares for mb in s) <= max(batch_size, 2)
            seen = sorted(i for s in shares for mb in s for i in mb)
            assert seen == list(range(total)) if total >= n else set(seen) == set(range(total))


def test_fsdp_qlora_trains_what_one_process_trains(one_process, tiny_model_dir, tmp_path):
    """FSDP-QLoRA: the 4-bit base, stored as float tensors (bnb_4bit_quant_storage), is sharded with
    the adapters over the two processes; bitsandbytes dequantizes each gathered weight in its forward.
    Losses equal one process's; the gathered adapter loads on the 4-bit base in one process and gives
    its outputs; the FSDP checkpoint resumes in one process."""
    import torch
    from safetensors.torch import load_file

    pytest.importorskip("bitsandbytes")
    data, _, _ = one_process
    qlora = ["--set", "method=qlora"]
    one = _config(tmp_path / "one.yaml", tiny_model_dir, data, tmp_path / "one", max_steps=4)
    _tunekit("train", one, *qlora)
    two = _config(tmp_path / "two.yaml", tiny_model_dir, data, tmp_path / "two", max_steps=2, batch_size=4)
    out = _tunekit("train", two, *qlora, "--nproc", "2", "--set", "distributed.strategy=fsdp")
    assert "fsdp: 2 layers and the root sharded over 2 processes" in out
    reference = _losses(tmp_path / "one")
    _close({k: v for k, v in reference.items() if k <= 2}, _losses(tmp_path / "two"))
    ours = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    # the step-2 checkpoint written by two FSDP processes resumes in one process to step 4
    _tunekit("train", two, *qlora, "--resume", "--set", "train.max_steps=4", "--set", "train.batch_size=8")
    _close(reference, _losses(tmp_path / "two"))
    torch.testing.assert_close(_logits(tmp_path / "two"), _logits(tmp_path / "one"), rtol=1e-4, atol=1e-4)


def test_deepspeed_is_refused_before_any_worker_starts(tiny_model_dir, tmp_path):
    strategy, method, says = "deepspeed", "lora", "deepspeed is"
    from conftest import jsonl, write

    data = write(tmp_path, "d.jsonl", jsonl({"prompt": "a", "completion": "b"}))
    cfg = _config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "run")
    overrides = ["--set", f"distributed.strategy={strategy}", "--set", f"method={method}"]
    proc = subprocess.run(
        [sys.executable, "-m", "tunekit", "train", str(cfg), "--nproc", "2", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "distributed.strategy" in out and says in out
    assert "Traceback" not in out and "torch.distributed.run" not in out
    assert not (tmp_path / "run").exists()
