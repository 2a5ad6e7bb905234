"""Padding-free batches (train/speed/padding_free.py): the padded batch's loss and gradients, one row."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model_for
from tunekit.data.tokenize import IGNORE_INDEX
from tunekit.train.batching import collate
from tunekit.train.recipes.sft import accumulate_gradients
from tunekit.train.speed import padding_free


@pytest.fixture
def batch(tokenizer, chat_rows):
    from tunekit.data.tokenize import TokenizedExample

    rows = chat_rows
    # Rows of four lengths, as length-grouped batches of real data have.
    cut = [len(r.input_ids) - 5 * i for i, r in enumerate(rows)]
    rows = [TokenizedExample(r.input_ids[:n], r.labels[:n]) for r, n in zip(rows, cut, strict=True)]
    b = collate(rows, tokenizer.pad_token_id)
    assert not b["attention_mask"].all()  # the rows differ in length: there is padding to drop
    return b


@pytest.fixture
def segments(monkeypatch):
    """The query lengths SDPA sees from the segment path."""
    seen = []
    sdpa = padding_free._sdpa

    def recording(q, *args, **kwargs):
        seen.append(q.shape[2])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(padding_free, "_sdpa", recording)
    return seen


def test_pack_lays_real_tokens_end_to_end():
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    labels = torch.tensor([[1, 2, 3], [4, 5, IGNORE_INDEX]])
    p_ids, pos, p_labels, bounds = padding_free.pack(ids, mask, labels)
    assert p_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert pos.tolist() == [[0, 1, 2, 0, 1]]
    # The second example's first token is no target of the first example's last.
    assert p_labels.tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]]
    assert bounds == [0, 3, 5]
    assert padding_free.right_padded(mask)
    assert not padding_free.right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding


def _run(model_dir, chat_file, batch, method, **train):
    model, params = build_model_for(model_dir, chat_file, method, **train)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero
            p.data.normal_(0, 0.1)
    loss = accumulate_gradients(model, [batch])
    return model, loss, [p.grad.clone() for p in params]


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_gradients_equal_the_padded_batch(
    tiny_model_dir, chat_file, batch, segments, method, checkpointing
):
    train = {"gradient_checkpointing": checkpointing}
    padded_model, padded, padded_grads = _run(
        tiny_model_dir, chat_file, batch, method, padding_free=False, **train
    )
    assert not padding_free.enabled(padded_model) and not segments
    model, packed, grads = _run(tiny_model_dir, chat_file, batch, method, padding_free=True, **train)
    assert padding_free.enabled(model)
    lengths = batch["attention_mask"].sum(1).tolist()
    # 2 layers, each example attended on its own (and again in the backward under checkpointing).
    assert segments == lengths * 2 * (2 if checkpointing else 1)
    assert packed == pytest.approx(padded, rel=1e-5)
    for a, b in zip(grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_whole_sequence_targets_do_not_cross_examples(tiny_model_dir, chat_file, batch):
    # Plain-text training: every token a target, the first included. Packed, no example's last
    # position may be scored on the next example's first token.
    b = dict(batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX))
    _, padded, _ = _run(tiny_model_dir, chat_file, b, "lora", padding_free=False)
    _, packed, _ = _run(tiny_model_dir, chat_file, b, "lora", padding_free=True)
    assert packed == pytest.approx(padded, rel=1e-5)


def test_other_forwards_are_unchanged(tiny_model_dir, chat_file, batch, segments):
    model, _ = build_model_for(tiny_model_dir, chat_file, "lora", padding_free=True)
    assert padding_free.enabled(model)
    plain, _ = build_model_for(tiny_model_dir, chat_file, "lora", padding_free=False)
    model.eval(), plain.eval()
    # Left padding, as generation pads: the mask goes to SDPA as before.
    ids, mask = batch["input_ids"].flip(1), batch["attention_mask"].flip(1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        want = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, want)
    assert not segments
    # A batch without padding stays as it is too.
    full = {k: v[:1] for k, v in batch.items()}
    accumulate_gradients(model, [full])
    assert not segments


def test_models_without_sdpa_keep_padded_batches(tiny_model_dir, chat_file):
    model, _ = build_model_for(tiny_model_dir, chat_file, "lora", padding_free=False)
    model.config._attn_implementation = "eager"
    assert not padding_free.enable_padding_free(model)
    assert model.config._attn_implementation == "eager"
