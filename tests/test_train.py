"""The LoRA recipe on a tiny random llama: only adapters change, the loss falls, the adapter reloads."""

import json

import pytest
import torch
from peft import PeftModel

from tunekit.config import config_from_dict
from tunekit.data.tokenize import tokenize_example
from tunekit.models import load_model, load_tokenizer
from tunekit.models.device import default_device, model_device, to_device
from tunekit.train.batching import collate, length_grouped_batches
from tunekit.train.loop import lr_at
from tunekit.train.loss import loss_sum
from tunekit.train.recipes.sft import accumulate_gradients
from tunekit.train.session import train
from tunekit.train.setup import add_lora


def _cfg(tiny_model_dir, chat_file, tmp_path, **train):
    t = {"epochs": 1, "learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "seed": 0} | train
    return config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train": str(chat_file)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": t,
            "output_dir": str(tmp_path / "run"),
        }
    )


def test_loss_matches_transformers(tiny_model_dir, tokenizer):
    from tunekit.data.example import Example, Message

    model = load_model(tiny_model_dir)
    exs = [
        Example(messages=(Message("user", "a b c"), Message("assistant", "d e"))),
        Example(messages=(Message("user", "x"), Message("assistant", "a much longer answer here"))),
    ]
    b = collate([tokenize_example(tokenizer, e, 64) for e in exs], tokenizer.pad_token_id)
    s, n = loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"])
    ref = model(**to_device(b, model_device(model))).loss
    torch.testing.assert_close(s / n, ref, rtol=1e-5, atol=1e-6)


def test_lora_step_changes_only_adapter_weights(tiny_model_dir, tokenizer, chat_file):
    from tunekit.config import LoraConfig
    from tunekit.data import load_examples

    model = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = [tokenize_example(tokenizer, e, 64) for e in load_examples(chat_file)[:4]]
    b = collate(data, tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    s, n = loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"])
    (s / n).backward()
    opt.step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed, "nothing changed"
    assert all("lora_" in k for k in changed), changed
    assert any("lora_B" in k for k in changed)


def test_train_overfits_tiny_set_and_writes_run_dir(tiny_model_dir, chat_file, tmp_path):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path, epochs=15)
    run = train(cfg, quiet=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses
    assert {"step", "epoch", "loss", "learning_rate", "tokens_per_s"} <= set(metrics[0])
    assert any("val_loss" in m for m in metrics)
    for name in (
        "config.yaml",
        "train_summary.json",
        "data/manifest.json",
        "data/test.jsonl",
        "adapter/adapter_config.json",
    ):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "data/manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 24 and len(manifest["rows"]) == 24


def test_saved_adapter_reloads_with_identical_logits(tiny_model_dir, chat_file, tmp_path):
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path, max_steps=3)
    run = train(cfg, quiet=True)
    tok = load_tokenizer(run / "adapter")
    ids = tok("What is the code for item 3?", return_tensors="pt")["input_ids"].to(default_device())
    # plain PEFT loads it: the adapter is in standard format
    a = PeftModel.from_pretrained(load_model(tiny_model_dir), run / "adapter").eval()
    b = PeftModel.from_pretrained(load_model(tiny_model_dir), run / "adapter").eval()
    base = load_model(tiny_model_dir).eval()
    with torch.no_grad():
        la, lb, l0 = a(ids).logits, b(ids).logits, base(ids).logits
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert not torch.allclose(la, l0), "the adapter had no effect"


def test_grad_accum_equals_bigger_batch(tiny_model_dir, tokenizer, chat_file):
    """One batch of 8 and two micro-batches of 4 (same examples) give the same loss and gradients."""
    from tunekit.config import LoraConfig
    from tunekit.data import load_examples

    data = [tokenize_example(tokenizer, e, 64) for e in load_examples(chat_file)[:8]]
    data[0].labels[-4:] = [-100] * 4  # unequal target counts per micro-batch: normalisation matters
    grads, losses = [], []
    for groups in ([data], [data[:4], data[4:]]):
        model = add_lora(load_model(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
        losses.append(accumulate_gradients(model, [collate(g, tokenizer.pad_token_id) for g in groups]))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-7)


def test_same_seed_same_losses(tiny_model_dir, chat_file, tmp_path):
    out = []
    for k in range(2):
        run = train(_cfg(tiny_model_dir, chat_file, tmp_path / str(k), max_steps=4), quiet=True)
        out.append([json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()])
    assert len(out[0]) == 4 and out[0] == out[1]


def test_length_grouped_batches_cover_every_example_once():
    lengths = [5, 50, 7, 49, 3, 48, 10, 12, 30]
    batches = length_grouped_batches(lengths, 2, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    assert batches == length_grouped_batches(lengths, 2, seed=1)
    assert batches != length_grouped_batches(lengths, 2, seed=2)


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0, "cosine") == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, "cosine") == pytest.approx(1.0)
    assert lr_at(99, 100, 10, 1.0, "cosine") < 0.01
    assert lr_at(55, 100, 10, 1.0, "constant") == 1.0
    assert lr_at(55, 100, 10, 1.0, "linear") == pytest.approx(0.5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, chat_file, tokenizer):
    from tunekit.config import config_from_dict
    from tunekit.data import load_examples
    from tunekit.data.tokenize import tokenize_example
    from tunekit.train.setup import build_model

    batch = collate(
        [tokenize_example(tokenizer, ex, 64) for ex in load_examples(chat_file)[:4]], tokenizer.pad_token_id
    )
    grads = []
    # off, every layer, and selective (every 2nd layer: layer 0 of the tiny model's two)
    for ckpt, recomputed in ((False, []), (True, [0, 1]), (2, [0])):
        cfg = config_from_dict(
            {"model": str(tiny_model_dir), "data": {"train": str(chat_file)}, "lora": {"dropout": 0.0},
             "train": {"gradient_checkpointing": ckpt}}
        )  # fmt: skip
        model, params = build_model(cfg, tiny_model_dir)
        layers = model.get_base_model().model.layers
        assert len(layers) == 2
        assert [i for i, layer in enumerate(layers) if layer.gradient_checkpointing] == recomputed
        loss = accumulate_gradients(model, [batch])
        grads.append((loss, [p.grad.clone() for p in params]))
    for other in grads[1:]:
        assert abs(grads[0][0] - other[0]) < 1e-6
        for a, b in zip(grads[0][1], other[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -2])
def test_gradient_checkpointing_rejects_a_layer_count_below_one(tiny_model_dir, chat_file, bad):
    from tunekit.config import config_from_dict
    from tunekit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing.*N >= 1"):
        config_from_dict(
            {"model": str(tiny_model_dir), "data": {"train": str(chat_file)},
             "train": {"gradient_checkpointing": bad}}
        )  # fmt: skip
