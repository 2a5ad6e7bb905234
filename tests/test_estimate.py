"""The memory/time estimator: formulas, the parameter count from a config, the activation counts
against what autograd really saves, the CLI, and (slow) the predicted peak against measured peaks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tunekit.errors import ConfigError
from tunekit.estimate import memory as mem


def test_parameter_count_from_config_matches_the_real_model(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = mem.shape_from_config(AutoConfig.from_pretrained(tiny_model_dir))
    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in real.parameters())
    assert shape.linear_params == sum(
        m.weight.numel() for n, m in real.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n
    )


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_adapter_count_matches_peft(tiny_model_dir, targets):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunekit.config import LoraConfig
    from tunekit.train.setup import add_lora

    shape = mem.shape_from_config(AutoConfig.from_pretrained(tiny_model_dir))
    model = add_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=targets),
        0,
    )
    assert shape.adapter_params(8, targets) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def _saved_bytes(model, batch, seq) -> int:
    """Bytes autograd keeps for the backward pass of the decoder (parameters excluded)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.randint(3, 500, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("method,dropout", [("full", 0.0), ("lora", 0.0), ("lora", 0.1)])
def test_activation_formula_matches_what_autograd_saves(tiny_model_dir, method, dropout):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunekit.config import LoraConfig
    from tunekit.train.setup import add_lora

    shape = mem.shape_from_config(AutoConfig.from_pretrained(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if method == "lora":
        model = add_lora(model, LoraConfig(r=8, alpha=16, dropout=dropout, target_modules="all-linear"), 0)
    model.train()
    predicted = mem.estimate_memory(shape, method, 4, 64, lora_r=8, lora_dropout=dropout, lean=False)
    measured = _saved_bytes(model, 4, 64)
    assert measured == pytest.approx(predicted.parts["activations"], rel=0.15)


@pytest.mark.parametrize("method,dropout", [("full", 0.0), ("lora", 0.0), ("lora", 0.1)])
def test_lean_activation_formula_matches_what_the_layers_keep(tiny_model_dir, monkeypatch, method, dropout):
    """With train.lean_activations the layers' saved tensors go through its pack hook: count what it
    keeps (not the recipes) against the formula's decoder-layer part."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunekit.config import LoraConfig
    from tunekit.train.setup import add_lora
    from tunekit.train.speed import lean

    shape = mem.shape_from_config(AutoConfig.from_pretrained(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if method == "lora":
        model = add_lora(model, LoraConfig(r=8, alpha=16, dropout=dropout, target_modules="all-linear"), 0)
    else:
        model.requires_grad_(True)
    lean.enable_lean_activations(model)
    model.train()
    kept, pack = {}, lean.LayerSaves.pack

    def counting(self, t):
        out = pack(self, t)
        if isinstance(out, torch.Tensor):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return out

    monkeypatch.setattr(lean.LayerSaves, "pack", counting)
    ids = torch.randint(3, 500, (4, 64))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(v for k, v in kept.items() if k not in params)
    est = mem.estimate_memory(shape, method, 4, 64, lora_r=8, lora_dropout=dropout, lean=True)
    in_layers = est.parts["activations"] - 4 * 64 * 2 * shape.hidden * 4  # minus embedding and final norm
    assert measured == pytest.approx(in_layers, rel=0.15)
    plain = mem.estimate_memory(shape, method, 4, 64, lora_r=8, lora_dropout=dropout, lean=False)
    assert est.parts["activations"] < plain.parts["activations"]


def test_full_fine_tuning_costs_16_bytes_a_parameter():
    shape = mem.reference_shape("7b")
    assert 6.5e9 < shape.params < 7e9  # Llama-2-7B: 6.74B
    for dtype in ("fp32", "bf16"):
        e = mem.estimate_memory(shape, "full", 1, 512, dtype=dtype, device="gpu")
        states = e.parts["weights"] + e.parts["gradients"] + e.parts["optimizer_states"]
        assert states / shape.params == pytest.approx(16)
        assert not e.fits(80)  # full 7B does not fit an 80 GB GPU


def test_qlora_70b_fits_48gb_and_lora_70b_does_not():
    shape = mem.reference_shape("70b")
    q = mem.estimate_memory(shape, "qlora", 1, 512, dtype="bf16", checkpointing=True, device="gpu")
    assert q.fits(48) and not q.fits(24)
    # NF4 decoder weights, plus the embeddings and head that stay unquantized (fp32 after peft's prep).
    unquantized = shape.params - shape.linear_params
    assert q.parts["weights"] == pytest.approx(shape.linear_params * 0.516 + unquantized * 4, rel=0.001)
    lo = mem.estimate_memory(shape, "lora", 1, 512, dtype="bf16", checkpointing=True, device="gpu")
    assert not lo.fits(80)
    # Without checkpointing the 70B's activations alone are tens of GB at 512 tokens.
    assert not mem.estimate_memory(shape, "qlora", 1, 512, dtype="bf16", device="gpu").fits(48)


def test_fsdp_on_8_gpus_shards_the_states_and_keeps_the_activations():
    """FSDP over 8 processes: each holds 1/8 of the weights, gradients and AdamW states plus the
    units gathered at a time (the root and two decoder layers); ddp over 8 holds everything."""
    shape = mem.reference_shape("70b")
    for method in ("qlora", "lora", "full"):
        kw = {"dtype": "bf16", "checkpointing": True, "device": "gpu"}
        one = mem.estimate_memory(shape, method, 1, 2048, **kw)
        fsdp = mem.estimate_memory(shape, method, 1, 2048, shards=8, **kw)
        states = ("weights", "adapter_weights", "gradients", "optimizer_states")
        held = sum(one.parts.get(k, 0) for k in states)
        assert sum(fsdp.parts.get(k, 0) for k in states) == pytest.approx(held / 8)
        for k in ("activations", "logits", "allocator", "runtime"):
            assert fsdp.parts[k] == one.parts[k]
        gathered = fsdp.parts["gathered_weights"]
        assert 0 < gathered < held / 4
        assert one.total - fsdp.total == pytest.approx(held * 7 / 8 - gathered)
    # the 70B QLoRA example: about 22 GB a GPU sharded, against 52 GB with ddp
    q8 = mem.estimate_memory(
        shape, "qlora", 1, 2048, dtype="bf16", checkpointing=True, device="gpu", shards=8
    )
    assert q8.total / mem.GB == pytest.approx(21.9, abs=0.1)
    with pytest.raises(ConfigError, match="processes"):
        mem.estimate_memory(shape, "qlora", 1, 8, shards=0)


def test_estimate_report_shards_only_with_fsdp(monkeypatch):
    from pathlib import Path

    from tunekit.config import load_config
    from tunekit.estimate.training import estimate_report

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    example = root / "examples" / "scale" / "qlora_70b_8gpu.yaml"

    def h100(strategy, nproc):
        cfg = load_config(example, [f"distributed.strategy={strategy}"])
        r = estimate_report(cfg, model_size="70b", measure=False, checkpointing=True, nproc=nproc)
        return next(g for g in r["gpus"] if "H100" in g["gpu"])["peak_gb"], r

    ddp1, _ = h100("ddp", 1)
    ddp8, r = h100("ddp", 8)
    fsdp8, f = h100("fsdp", 8)
    assert ddp8 == ddp1  # data parallel: every GPU holds the whole model
    assert f["processes"] == 8 and f["strategy"] == "fsdp" and r["strategy"] == "ddp"
    sharded = sum(f["here"]["parts_mb"].get(k, 0) for k in ("weights", "gradients", "optimizer_states"))
    assert sharded > 0 and ddp8 - fsdp8 > 25  # about 7/8 of the 4-bit base's 41 GB, less what is gathered


def test_nf4_bytes_per_parameter():
    assert abs(mem.NF4_BYTES_PER_PARAM - 0.516) < 0.001


def test_activations_and_logits_scale_with_the_batch():
    shape = mem.reference_shape("1b")
    a = mem.estimate_memory(shape, "lora", 2, 256, target_fraction=0.5)
    b = mem.estimate_memory(shape, "lora", 4, 256, target_fraction=0.5)
    assert b.parts["activations"] == pytest.approx(2 * a.parts["activations"])
    assert b.parts["logits"] == pytest.approx(2 * a.parts["logits"])
    assert b.parts["weights"] == a.parts["weights"]
    ckpt = mem.estimate_memory(shape, "lora", 4, 256, target_fraction=0.5, checkpointing=True)
    assert ckpt.parts["activations"] < b.parts["activations"] / 4
    # Every 2nd of the 16 layers recomputed: 8 layers keep everything, plus one during a recompute.
    half = mem.estimate_memory(shape, "lora", 4, 256, target_fraction=0.5, checkpointing=2)
    assert ckpt.parts["activations"] < half.parts["activations"] < b.parts["activations"]
    kw = {"target_fraction": 0.5, "lean": False}
    plain, plain_half = (mem.estimate_memory(shape, "lora", 4, 256, checkpointing=c, **kw) for c in (0, 2))
    assert plain_half.parts["activations"] == pytest.approx(plain.parts["activations"] * 9 / 16, rel=0.05)
    assert half.as_dict()["gradient_checkpointing"] == 2


def test_bad_inputs_name_the_key():
    shape = mem.reference_shape("1b")
    with pytest.raises(ConfigError, match="lora.target_modules"):
        shape.adapter_params(16, ["not_a_layer"])
    with pytest.raises(ConfigError, match="model-size"):
        mem.reference_shape("13b")
    with pytest.raises(ConfigError, match="method"):
        mem.estimate_memory(shape, "prefix", 1, 8)


def test_gpu_time_is_flops_based():
    shape = mem.reference_shape("7b")
    s = mem.gpu_seconds(shape, "full", 1e6, tflops=100, mfu=0.5)
    assert s == pytest.approx(1e6 * 6 * shape.params / 50e12)


def test_cli_estimate_prints_the_breakdown_and_sizes(tmp_path):
    from typer.testing import CliRunner

    from tunekit.cli import app

    out = tmp_path / "est.json"
    r = CliRunner().invoke(
        app,
        ["estimate", "examples/lora_tickets.yaml", "--no-measure", "--compare-sizes", "--json", str(out)],
    )
    assert r.exit_code == 0, r.output
    for word in ("weights", "activations", "logits", "peak", "24GB"):
        assert word in r.output
    report = json.loads(out.read_text())
    assert report["method"] == "lora" and report["seq_len"] <= 256
    assert 0 < report["target_fraction"] < 1
    rows = {(r["size"], r["method"]): r for r in report["compare_sizes"]}
    assert rows[("70b", "qlora")]["peak_gb"] < rows[("70b", "lora")]["peak_gb"]
    assert not rows[("7b", "full")]["fits"]["80GB (A100)"]


def test_cli_estimate_rejects_an_unknown_size():
    from typer.testing import CliRunner

    from tunekit.cli import app, main  # noqa: F401

    r = CliRunner().invoke(app, ["estimate", "examples/lora_tickets.yaml", "--model-size", "13b"])
    assert r.exit_code != 0
    assert "13b" in str(r.exception) or "13b" in r.output


MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    from tunekit.config import config_from_dict
    from tunekit.estimate.training import measure_throughput
    torch.set_num_threads(1)
    method = sys.argv[1]
    cfg = config_from_dict({"model": "smollm2-135m-instruct", "method": method, "data": {"train": "x.jsonl"},
                            "train": {"batch_size": 4, "max_length": 512}, "lora": {"dropout": 0.05}})
    print(json.dumps(measure_throughput(cfg, [128], steps=3)))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_predicted_peak_is_within_20_percent_of_a_measured_one(default_model_dir, method):
    """A real run of each method on the default model, each in its own process (peak RSS is per
    process), against the prediction for the same batch: 4 x 128 tokens, half of them targets."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    run = subprocess.run([sys.executable, "-c", MEASURE, method], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])["peak_memory_mb"]
    shape = mem.shape_from_model("smollm2-135m-instruct")
    predicted = (
        mem.estimate_memory(shape, method, 4, 128, lora_dropout=0.05, target_fraction=0.5).total / mem.MB
    )
    assert predicted == pytest.approx(measured, rel=0.20), (
        f"{method}: predicted {predicted:.0f}, measured {measured:.0f}"
    )


def test_a_chunked_loss_holds_the_logits_of_one_chunk():
    shape = mem.reference_shape("1b")
    whole = mem.estimate_memory(shape, "lora", 4, 512, target_fraction=0.5)
    chunked = mem.estimate_memory(shape, "lora", 4, 512, target_fraction=0.5, loss_chunk=256)
    assert chunked.parts["logits"] == pytest.approx(whole.parts["logits"] * 256 / 1024)
    assert chunked.parts["activations"] == whole.parts["activations"]
    big = mem.estimate_memory(shape, "lora", 4, 512, target_fraction=0.5, loss_chunk=10_000)
    assert big.parts["logits"] == whole.parts["logits"]  # a chunk larger than the batch: no change
