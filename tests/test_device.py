"""The device decision (models/device.py), and a train + eval run with the $TUNEKIT_DEVICE override.

No GPU here: the CUDA branch of `default_device` is checked with torch.cuda.is_available patched
for that pure function only; no tensor ever goes to CUDA in these tests.
"""

import json

import pytest
import torch

from tunekit.config import config_from_dict
from tunekit.errors import TunekitError
from tunekit.models.device import autocast, default_device, model_device, place, to_device


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend this machine has 4 GPUs, for `default_device` only."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("TUNEKIT_DEVICE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return monkeypatch


def test_cpu_without_cuda(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    clean_env.setenv("LOCAL_RANK", "3")  # a CPU (gloo) worker stays on the CPU
    assert default_device() == torch.device("cpu")


def test_cuda_follows_local_rank(clean_env, fake_gpus):
    assert default_device() == torch.device("cuda:0")
    clean_env.setenv("LOCAL_RANK", "2")  # each torchrun worker on its own GPU
    assert default_device() == torch.device("cuda:2")


@pytest.mark.parametrize(
    ("value", "local_rank", "expected"),
    [("cpu", "0", "cpu"), ("CPU", "1", "cpu"), ("cuda", "0", "cuda:0"), ("cuda", "3", "cuda:3"),
     ("cuda:1", "3", "cuda:1")],
)  # fmt: skip
def test_env_override(clean_env, fake_gpus, value, local_rank, expected):
    clean_env.setenv("TUNEKIT_DEVICE", value)
    clean_env.setenv("LOCAL_RANK", local_rank)
    assert default_device() == torch.device(expected)


@pytest.mark.parametrize(
    ("value", "message"),
    [("gpu", "expected cpu, cuda or cuda:N"), ("cpu:0", "expected cpu, cuda or cuda:N"),
     ("cuda:7", "there is no cuda:7")],
)  # fmt: skip
def test_env_override_errors_name_the_variable(clean_env, fake_gpus, value, message):
    clean_env.setenv("TUNEKIT_DEVICE", value)
    with pytest.raises(TunekitError, match=message) as e:
        default_device()
    assert "TUNEKIT_DEVICE" in str(e.value)


def test_cuda_asked_for_but_absent(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    clean_env.setenv("TUNEKIT_DEVICE", "cuda")
    with pytest.raises(TunekitError, match="CUDA is not available"):
        default_device()


def test_cpu_helpers_change_nothing(clean_env):
    """On the CPU: no autocast (fp32 stays fp32), placement and moves are no-ops."""
    clean_env.setenv("TUNEKIT_DEVICE", "cpu")
    layer = torch.nn.Linear(4, 4)
    assert place(layer) is layer and model_device(layer) == torch.device("cpu")
    with autocast(torch.device("cpu")):
        assert layer(torch.ones(1, 4)).dtype == torch.float32
    t = torch.ones(2)
    moved = to_device({"a": t, "n": 3}, torch.device("cpu"))
    assert moved["a"] is t and moved["n"] == 3


def test_precision_override_is_checked(clean_env):
    """TUNEKIT_PRECISION=fp32 turns autocast off (on CUDA too); a typo names the variable."""
    clean_env.setenv("TUNEKIT_PRECISION", "fp32")
    assert type(autocast(torch.device("cuda"))).__name__ == "nullcontext"
    clean_env.setenv("TUNEKIT_PRECISION", "fp16")
    with pytest.raises(TunekitError, match="TUNEKIT_PRECISION='fp16'"):
        autocast(torch.device("cpu"))


def test_train_and_eval_with_the_cpu_override(clean_env, tiny_model_dir, chat_file, tmp_path):
    """TUNEKIT_DEVICE=cpu (what a user sets to keep a GPU machine's run on the CPU): a LoRA run
    trains and evaluates."""
    from tunekit.eval.evaluate import evaluate
    from tunekit.train.session import train

    clean_env.setenv("TUNEKIT_DEVICE", "cpu")
    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train": str(chat_file)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": 4, "learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "seed": 0},
            "eval": {"max_new_tokens": 4, "probe": None, "few_shot": 0},
            "output_dir": str(tmp_path / "run"),
        }
    )
    run_dir = train(cfg, quiet=True)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] > 0 and "cuda_peak_memory_gib" not in summary
    report = evaluate(run_dir, quiet=True)
    assert set(report["contenders"]) == {"base", "finetuned"}
    assert report["contenders"]["finetuned"]["test_loss"] < report["contenders"]["base"]["test_loss"]


@pytest.fixture
def bf16_forwards(monkeypatch):
    """What a CUDA device with bf16 support does, simulated on the CPU: forward passes under bf16
    autocast (CPU autocast here), and so a LoRA run's frozen base loaded in bf16."""
    from tunekit.models import device
    from tunekit.train import setup

    monkeypatch.setattr(device, "bf16_autocast", lambda d: True)
    monkeypatch.setattr(setup, "bf16_autocast", lambda d: True)


def _cfg(tiny_model_dir, chat_file, **over):
    return config_from_dict(
        {"model": str(tiny_model_dir), "data": {"train": str(chat_file)}, "lora": {"dropout": 0.0}} | over
    )


def test_lora_under_bf16_trains_fp32_adapters_on_a_bf16_base(
    bf16_forwards, tiny_model_dir, chat_file, tokenizer
):
    from tunekit.data import load_examples
    from tunekit.data.tokenize import tokenize_example
    from tunekit.train import setup
    from tunekit.train.batching import collate
    from tunekit.train.loss import loss_sum
    from tunekit.train.recipes.sft import accumulate_gradients
    from tunekit.train.setup import build_model

    model, params = build_model(_cfg(tiny_model_dir, chat_file), tiny_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name in trainable else torch.bfloat16), name
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}

    batch = collate(
        [tokenize_example(tokenizer, ex, 64) for ex in load_examples(chat_file)[:4]], tokenizer.pad_token_id
    )
    opt = torch.optim.AdamW(params, lr=1e-2)
    first = accumulate_gradients(model, [batch])
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    opt.step()
    opt.zero_grad()
    assert accumulate_gradients(model, [batch]) < first
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.dtype == torch.float32
        else:
            assert torch.equal(p, frozen[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)

    # The first step's loss is the fp32 model's, to bf16's precision.
    monkeypatch_off = pytest.MonkeyPatch()
    monkeypatch_off.setattr(setup, "bf16_autocast", lambda d: False)
    try:
        fp32_model, _ = build_model(_cfg(tiny_model_dir, chat_file), tiny_model_dir)
    finally:
        monkeypatch_off.undo()
    assert next(fp32_model.parameters()).dtype == torch.float32
    with torch.no_grad():
        s, n = loss_sum(fp32_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert first == pytest.approx(float(s) / n, rel=2e-2)


def test_a_classifier_score_head_trains_in_fp32_on_a_bf16_base(bf16_forwards, tiny_model_dir, chat_file):
    from tunekit.train.recipes.classify import class_logits
    from tunekit.train.setup import build_model

    model, params = build_model(
        _cfg(tiny_model_dir, chat_file, task="classify"), tiny_model_dir, head="score", num_labels=3
    )
    assert all(p.dtype == torch.float32 for p in params)
    assert any("score" in n for n, p in model.named_parameters() if p.requires_grad)
    logits = class_logits(
        model, {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    )
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("over", [{"method": "full"}, {"distributed": {"strategy": "fsdp"}}])
def test_only_lora_outside_fsdp_gets_a_bf16_base(bf16_forwards, monkeypatch, tiny_model_dir, chat_file, over):
    from tunekit.train import distributed
    from tunekit.train.setup import frozen_base_dtype

    assert frozen_base_dtype(_cfg(tiny_model_dir, chat_file)) == torch.bfloat16
    monkeypatch.setattr(distributed, "active", lambda: True)
    assert frozen_base_dtype(_cfg(tiny_model_dir, chat_file, **over)) == torch.float32


def test_the_cpu_keeps_lora_bases_in_fp32(clean_env, tiny_model_dir, chat_file):
    from tunekit.train.setup import frozen_base_dtype

    assert frozen_base_dtype(_cfg(tiny_model_dir, chat_file)) == torch.float32
