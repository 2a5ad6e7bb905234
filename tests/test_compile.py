"""train.compile: decoder layers compiled with inductor train to the eager model's losses and gradients,
and save the same files."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model_for
from tunekit.train.batching import collate
from tunekit.train.recipes.sft import accumulate_gradients

pytestmark = pytest.mark.slow  # inductor compiles a C++ kernel set: about half a minute on 2 cores


def batches(tokenizer, n_words):
    """One batch of two examples per entry, answers n words long: batches of different lengths, which
    the compiled graph must all serve (dynamic shapes)."""
    from tunekit.data.example import Example, Message
    from tunekit.data.tokenize import tokenize_example

    out = []
    for n in n_words:
        rows = [
            Example(
                messages=(Message("user", f"list {n} words"), Message("assistant", " ".join(["word"] * n)))
            ),
            Example(messages=(Message("user", "and one"), Message("assistant", "one"))),
        ]
        out.append(collate([tokenize_example(tokenizer, ex, 128) for ex in rows], tokenizer.pad_token_id))
    return out


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_compiled_layers_train_like_the_eager_model(tiny_model_dir, chat_file, tokenizer, method):
    from tunekit.models.load import unwrap_peft

    data = batches(tokenizer, [5, 30, 12])
    assert len({b["input_ids"].shape[1] for b in data}) == 3
    runs = []
    for on in (False, True):
        torch._dynamo.reset()
        graphs_before = graphs()
        model, params = build_model_for(tiny_model_dir, chat_file, method, compile=on)
        layers = unwrap_peft(model).get_decoder().layers
        assert all((layer._compiled_call_impl is not None) == on for layer in layers)
        opt = torch.optim.AdamW(params, lr=1e-3)
        losses = []
        for batch in data:
            losses.append(accumulate_gradients(model, [batch]))
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(accumulate_gradients(model, [data[0]]))  # after the updates
        if on:  # three lengths, at most two graphs (layer 0 and the rest): no recompile per length
            assert graphs() - graphs_before <= 2
        runs.append((losses, [p.grad.clone() for p in params], sorted(model.state_dict())))
    (eager, eager_grads, eager_keys), (compiled, compiled_grads, compiled_keys) = runs
    assert compiled == pytest.approx(eager, rel=1e-4)
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
    assert compiled_keys == eager_keys  # the saved files name the same tensors


def test_compile_replaces_lean_activations(tiny_model_dir, chat_file):
    from tunekit.models.load import unwrap_peft

    model, _ = build_model_for(tiny_model_dir, chat_file, compile=True)
    mlp = unwrap_peft(model).get_decoder().layers[0].mlp
    assert not hasattr(mlp, "_lean_hooks")  # inductor decides what to recompute
    model, _ = build_model_for(tiny_model_dir, chat_file, compile=False)
    assert hasattr(unwrap_peft(model).get_decoder().layers[0].mlp, "_lean_hooks")


def test_sft_run_with_compile_saves_an_adapter_that_loads(tiny_model_dir, chat_file, tmp_path):
    from tunekit.config import config_from_dict
    from tunekit.train.session import train
    from tunekit.train.setup import load_trained

    cfg = config_from_dict(
        {"model": str(tiny_model_dir), "data": {"train": str(chat_file)}, "output_dir": str(tmp_path / "run"),
         "train": {"compile": True, "max_steps": 3, "batch_size": 2, "max_length": 64}}
    )  # fmt: skip
    run = train(cfg, quiet=True)
    model, _, is_adapter = load_trained(run)
    assert is_adapter
    assert any("lora_" in name for name, _ in model.named_parameters())
