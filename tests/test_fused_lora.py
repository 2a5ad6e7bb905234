"""The fused LoRA node (train/speed/fused_lora.py): PEFT's values and gradients, and PEFT's forward wherever
the fused one would not be exact."""

from __future__ import annotations

import copy

import pytest
import torch

from tunekit.config import config_from_dict
from tunekit.train.recipes.sft import accumulate_gradients
from tunekit.train.setup import build_model
from tunekit.train.speed import fused_lora
from tunekit.train.speed.fused_lora import LoraLinearFunction, unfuse_lora_layers


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_function_gradients_match_finite_differences(dropout, bias):
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    x = torch.randn(5, 6, requires_grad=True, **f64)
    keep = torch.randn(5, 6, **f64).gt(0) * 2.0  # a dropout mask, scaled as dropout scales it
    weight, b = torch.randn(4, 6, **f64), (torch.randn(4, **f64) if bias else None)
    a = torch.randn(3, 6, requires_grad=True, **f64)
    lb = torch.randn(4, 3, requires_grad=True, **f64)

    def fn(x, a, lb):
        xd = x * keep if dropout else x
        return LoraLinearFunction.apply(x, xd, weight, b, a, lb, 0.75)

    assert torch.autograd.gradcheck(fn, (x, a, lb))
    xd = x * keep if dropout else x
    want = x @ weight.t() + (b if bias else 0) + 0.75 * (xd @ a.t()) @ lb.t()
    assert torch.allclose(fn(x, a, lb), want)


def _model(model_dir, chat_file, **lora):
    cfg = config_from_dict(
        {"model": str(model_dir), "method": "lora", "data": {"train": str(chat_file)},
         "lora": {"alpha": 24, **lora}}
    )  # fmt: skip
    model, params = build_model(cfg, model_dir)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would hide the adapter's half of the sums
            p.data.normal_(0, 0.1)
    return model, params


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    forward = LoraLinearFunction.forward

    def counting(ctx, *args):
        calls.append(args[0].shape)
        return forward(ctx, *args)

    monkeypatch.setattr(LoraLinearFunction, "forward", staticmethod(counting))
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("lean", [True, False])
def test_loss_and_gradients_match_peft(tiny_model_dir, chat_file, chat_batch, fused_calls, dropout, lean):
    runs = []
    for fused in (True, False):
        model, params = _model(tiny_model_dir, chat_file, dropout=dropout)
        if lean:
            from tunekit.train.speed.lean import enable_lean_activations

            enable_lean_activations(model)
        if not fused:
            unfuse_lora_layers(model)
        torch.manual_seed(1)  # the same dropout masks
        fused_calls.clear()  # enable_lean_activations runs the MLPs once, on a probe input
        loss = accumulate_gradients(model, [chat_batch])
        runs.append((loss, [p.grad.clone() for p in params]))
        # 2 layers x 7 projections, in the fused run only.
        assert len(fused_calls) == (14 if fused else 0)
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert a.abs().sum() > 0


def test_peft_forward_runs_where_the_fused_one_is_not_exact(
    tiny_model_dir, chat_file, chat_batch, fused_calls
):
    model, _ = _model(tiny_model_dir, chat_file, dropout=0.0)
    ids = chat_batch["input_ids"]
    fused_calls.clear()
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        assert len(fused_calls) == 14
        unfuse_lora_layers(model)
        peft = model(input_ids=ids).logits
        torch.testing.assert_close(fused, peft, rtol=1e-4, atol=1e-4)
        fused_lora.fuse_lora_layers(model)
        del fused_calls[:]
        # Adapters off (DPO's reference pass): the base model, through PEFT.
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        assert not fused_calls and not torch.allclose(off, fused)
        # bf16 autocast (as on a GPU): PEFT's forward, which autocast knows how to cast.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
        assert not fused_calls
        # A merged adapter: the base layer holds it.
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        assert not fused_calls
        torch.testing.assert_close(merged, fused, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        model(input_ids=ids)
        assert len(fused_calls) == 14


def test_dora_keeps_peft_forward(tiny_model_dir, chat_file, chat_batch, fused_calls):
    model, params = _model(tiny_model_dir, chat_file, use_dora=True)
    fused_calls.clear()
    accumulate_gradients(model, [chat_batch])
    assert not fused_calls
    assert all(p.grad is not None for p in params)


def test_a_deep_copy_runs_its_own_weights(tiny_model_dir, chat_file, chat_batch):
    model, _ = _model(tiny_model_dir, chat_file, dropout=0.0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.zero_()
        ids = chat_batch["input_ids"]
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        torch.testing.assert_close(twin(input_ids=ids).logits, base)
