"""Every training method (full, LoRA, DoRA, QLoRA) on a tiny llama: what trains, what stays frozen,
and that the saved model reloads with identical outputs and evaluates."""

import json
import sys

import pytest
import torch

from tunekit.config import config_from_dict
from tunekit.data.tokenize import tokenize_example
from tunekit.errors import ModelError
from tunekit.eval.evaluate import evaluate
from tunekit.runs.directory import read_metrics, read_split
from tunekit.train.batching import collate
from tunekit.train.recipes.sft import accumulate_gradients, evaluate_loss
from tunekit.train.session import train
from tunekit.train.setup import build_model, load_trained

METHODS = {  # name -> (config method, lora.use_dora)
    "full": ("full", False),
    "lora": ("lora", False),
    "dora": ("lora", True),
    "qlora": ("qlora", False),
}


def _bnb_quantizes() -> str | None:
    """Why bitsandbytes cannot quantize here, or None when it can."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4")
        layer.load_state_dict(torch.nn.Linear(64, 64).state_dict())
        layer = layer.to("cpu")  # quantizes
        layer(torch.randn(1, 64))
    except Exception as e:  # any failure means: no 4-bit base on this machine
        return f"bitsandbytes cannot quantize to 4 bit here ({type(e).__name__}: {e})"
    return None


def _skip_qlora(name):
    if name == "qlora" and (why := _bnb_quantizes()):
        pytest.skip(why)


def _cfg(tiny_model_dir, chat_file, tmp_path, name, **train):
    method, dora = METHODS[name]
    t = {"epochs": 1, "learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "seed": 0} | train
    return config_from_dict(
        {
            "model": str(tiny_model_dir),
            "method": method,
            "data": {"train": str(chat_file)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "use_dora": dora},
            "train": t,
            "eval": {"max_examples": 2, "max_new_tokens": 4, "show_examples": 1},
            "output_dir": str(tmp_path / f"run-{name}"),
        }
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_exactly_the_parameters_it_should(name, tiny_model_dir, tokenizer, chat_file, tmp_path):
    _skip_qlora(name)
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path, name)
    model, params = build_model(cfg, tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in trainable}
    from tunekit.data import load_examples

    data = [tokenize_example(tokenizer, ex, 64) for ex in load_examples(chat_file)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(4):
        losses.append(
            accumulate_gradients(model, [collate(data[step * 4 : step * 4 + 4], tokenizer.pad_token_id)])
        )
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert all(map(torch.isfinite, torch.tensor(losses)))
    if name == "full":
        assert trainable == set(before) and changed == trainable
        return
    assert changed == trainable, "every adapter weight trains, every base weight stays frozen"
    assert trainable and all("lora_" in n for n in trainable)
    has_magnitude = any("lora_magnitude_vector" in n for n in trainable)
    assert has_magnitude == (name == "dora")
    if name == "qlora":
        import bitsandbytes as bnb

        quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert quantized and all(m.weight.quant_type == "nf4" for m in quantized)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_saves_reloads_identically_and_evaluates(name, tiny_model_dir, chat_file, tmp_path):
    _skip_qlora(name)
    run_dir = train(_cfg(tiny_model_dir, chat_file, tmp_path, name, max_steps=3, eval_every=3), quiet=True)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["saved"] == ("model" if name == "full" else "adapter")
    if name != "full":
        adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        assert adapter_cfg["use_dora"] == (name == "dora")

    model, tok, is_adapter = load_trained(run_dir)
    assert is_adapter == (name != "full")
    val = [tokenize_example(tok, ex, 64) for ex in read_split(run_dir, "validation")]
    logged = read_metrics(run_dir)[-1]["val_loss"]
    assert evaluate_loss(model, val, tok.pad_token_id) == pytest.approx(logged, abs=1e-5)

    report = evaluate(run_dir, quiet=True)  # base vs fine-tuned by generation, as for any sft run
    assert {"base", "finetuned"} <= set(report["contenders"]) and report["n_test"] == 2
    assert report["contenders"]["finetuned"]["test_loss"] != report["contenders"]["base"]["test_loss"]


def test_qlora_without_bitsandbytes_is_a_clear_model_error(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when absent
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path, "qlora")
    with pytest.raises(ModelError, match="method: qlora needs bitsandbytes.*method: lora"):
        build_model(cfg, tiny_model_dir)


def test_qlora_base_that_cannot_load_is_a_clear_model_error(tiny_model_dir, chat_file, tmp_path):
    """A damaged weights file (cut in half, as by an interrupted copy) stops the run cleanly."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file():
            data = f.read_bytes()
            (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(ModelError, match="damaged"):
        build_model(_cfg(broken, chat_file, tmp_path, "qlora"), broken)


def test_qlora_gradients_survive_an_eval_forward(tiny_model_dir, chat_file, tmp_path):
    """A validation pass (eval mode, no gradients) must not change the 4-bit base's forward or cut
    its backward. On AVX512-BF16 CPUs bitsandbytes would repack the weights for a bf16 kernel without
    a backward (setup.keep_4bit_layout stops it); elsewhere this holds trivially."""
    _skip_qlora("qlora")
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path, "qlora")
    model, params = build_model(cfg, cfg.model)
    from tunekit.models import load_tokenizer

    tok = load_tokenizer(cfg.model)
    ex = [tokenize_example(tok, e, 64) for e in read_split_examples(chat_file)]
    batch = collate(ex[:4], tok.pad_token_id)

    def grads():
        model.zero_grad()
        accumulate_gradients(model, [batch])
        return [p.grad.clone() for p in params]

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()
    after = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, after, strict=True))
    # The first layer's lora_B gets a gradient only through every later layer's 4-bit base.
    first = [p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n]
    assert first and all(g.abs().sum() > 0 for g in first)


def read_split_examples(path):
    from tunekit.data import load_examples

    return load_examples(path)
