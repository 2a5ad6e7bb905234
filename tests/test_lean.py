"""Lean activations (train/speed/lean.py): recipes instead of kept tensors, with identical gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import build_model_for
from tunekit.train.recipes.sft import accumulate_gradients
from tunekit.train.speed import lean


@pytest.fixture
def recipes(monkeypatch):
    """Counts the saved tensors that were swapped for a recipe."""
    made = []
    pack = lean.LayerSaves.pack

    def counting(self, t):
        out = pack(self, t)
        if isinstance(out, lean._Recipe):
            made.append(tuple(out.shape))
        return out

    monkeypatch.setattr(lean.LayerSaves, "pack", counting)
    return made


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradients_are_bit_for_bit_those_of_the_plain_model(
    tiny_model_dir, chat_file, chat_batch, recipes, method
):
    runs = []
    for on in (False, True):
        model, params = build_model_for(tiny_model_dir, chat_file, method, lean_activations=on)
        loss = accumulate_gradients(model, [chat_batch])
        runs.append((loss, [p.grad.clone() for p in params]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)
    # Per layer of the tiny llama (hidden 64, intermediate 128): the input norm's output kept by the
    # q, k and v adapters (or weights), the MLP norm's by gate and up, act(gate) by the product, the
    # product by down. Two layers; the rows are the batch's B x T.
    rows = chat_batch["input_ids"].numel()
    assert sorted(recipes) == sorted(
        2 * ([(rows, 64)] * 5 + [(4, chat_batch["input_ids"].shape[1], 128), (rows, 128)])
    )


def test_layers_under_checkpointing_and_no_grad_are_left_alone(
    tiny_model_dir, chat_file, chat_batch, recipes
):
    model, params = build_model_for(
        tiny_model_dir, chat_file, gradient_checkpointing=2
    )  # layer 0 checkpointed
    plain, plain_params = build_model_for(tiny_model_dir, chat_file, lean_activations=False)
    assert accumulate_gradients(model, [chat_batch]) == accumulate_gradients(plain, [chat_batch])
    for a, b in zip(params, plain_params, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert len(recipes) == 7  # layer 1 only
    recipes.clear()
    with torch.no_grad():
        model(input_ids=chat_batch["input_ids"], attention_mask=chat_batch["attention_mask"])
    assert recipes == []
    assert all(layer.mlp._lean_hooks.saves is None for layer in model.get_base_model().model.layers)


class NotGated(nn.Module):
    """Has a gated MLP's attributes but computes something else: must not be rewritten."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


def test_only_mlps_that_compute_the_gated_product_are_rewritten(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    assert not lean._is_gated_mlp(NotGated())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert lean._is_gated_mlp(model.model.layers[0].mlp)
    assert lean.enable_lean_activations(model) == 2
    assert lean.enable_lean_activations(nn.Linear(2, 2)) == 0  # no decoder layers: nothing to hook


def test_recipes_follow_a_deepcopy_of_the_model(tiny_model_dir):
    import copy

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lean.enable_lean_activations(model)
    twin = copy.deepcopy(model)
    mlp = twin.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp
    x = torch.randn(1, 3, 64)
    torch.testing.assert_close(mlp(x), model.model.layers[0].mlp(x))


def test_the_tensors_turned_into_recipes_are_freed_after_the_forward(
    tiny_model_dir, chat_file, chat_batch, monkeypatch
):
    """The point of the recipes: between forward and backward, nothing keeps the targets alive (the
    saved tensors' references to the pack hook once kept every one of them)."""
    import gc
    import weakref

    from tunekit.train.loss import loss_sum

    refs = []
    add = lean.LayerSaves.add

    def recording(self, target, fn):
        refs.append(weakref.ref(target))
        add(self, target, fn)

    monkeypatch.setattr(lean.LayerSaves, "add", recording)
    model, _ = build_model_for(tiny_model_dir, chat_file)
    loss, _ = loss_sum(model, chat_batch["input_ids"], chat_batch["attention_mask"], chat_batch["labels"])
    gc.collect()
    assert len(refs) == 2 * 4  # per layer: two norm outputs, act(gate), the product
    assert [r for r in refs if r() is not None] == []
    loss.backward()  # the graph still runs off the recipes


def test_a_target_saved_three_times_is_recomputed_once():
    calls = []
    saves = lean.LayerSaves()
    target = torch.arange(6.0)
    saves.add(target, lambda: calls.append(1) or torch.arange(6.0))
    recipes = [saves.pack(target.view(2, 3)) for _ in range(3)]
    assert all(isinstance(r, lean._Recipe) for r in recipes)
    assert saves.pack(torch.zeros(6)) is not None and not isinstance(saves.pack(torch.zeros(6)), lean._Recipe)
    for r in recipes:
        assert torch.equal(lean.LayerSaves.unpack(r), target.view(2, 3))
    assert len(calls) == 1
    assert recipes[0].cell.value is None  # released after the last unpack
    lean.LayerSaves.unpack(recipes[0])  # a graph run twice: recomputed, still right
    assert len(calls) == 2


@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_gives_the_loss_and_gradients_of_the_whole_projection(
    tiny_model_dir, chat_file, chat_batch, method
):
    """train.loss_chunk_tokens: the same loss and gradients (to float rounding) for any chunk size,
    including the tied head/embedding weight's gradient under full fine-tuning."""
    from tunekit.config import config_from_dict

    runs = []
    for chunk in (None, 1, 7, 10_000):
        model, params = build_model_for(tiny_model_dir, chat_file, method)
        loss = accumulate_gradients(model, [chat_batch], chunk)
        runs.append((loss, [p.grad.clone() for p in params]))
    for loss, grads in runs[1:]:
        assert loss == pytest.approx(runs[0][0], rel=1e-6)
        for a, b in zip(runs[0][1], grads, strict=True):  # sums in another order: rounding only
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="loss_chunk_tokens"):
        config_from_dict({"model": "m", "data": {"train": "x.jsonl"}, "train": {"loss_chunk_tokens": 0}})


def test_the_chunked_loss_never_holds_the_whole_logits(monkeypatch):
    """The point of chunking: every product with the head is at most `chunk` rows."""
    from tunekit.train.loss import ChunkedLinearCrossEntropy

    h = torch.randn(50, 8, requires_grad=True)
    w = torch.randn(300, 8, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    loss = ChunkedLinearCrossEntropy.apply(h, w, targets, 16)
    loss.backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_h @ ref_w.t(), targets, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, ref_h.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)
    rows = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: rows.append(a.shape[0]) or real_mm(a, b))
    ChunkedLinearCrossEntropy.apply(h.detach(), w.detach(), targets, 16)
    assert rows and max(rows) == 16
