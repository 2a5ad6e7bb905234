"""The architecture matrix: a tiny random model of each family (conftest.ARCHITECTURES: llama, qwen2,
qwen3, mistral, gemma3 text, phi3, gemma2; hidden 64, 2 layers, the real tokenizer) through every
method, each speed piece against the plain transformers path, resume, evaluation, merged export,
GGUF and serve. An architecture tunekit has not verified (granite here) trains on the plain path
with a one-line note; one transformers does not know is a clear error.

The families' own traits are set so that a piece that ignored them would fail: sliding windows of 8
tokens on rows of about 30-45 (mistral, gemma2/3), qwen2's q/k/v biases, qwen3's and gemma3's q/k
norms, phi3's fused qkv_proj and gate_up_proj, gemma2's soft-capping. README's matrix table is
EXPECTED_OFF below: every other piece runs, and is checked equal to the plain path.
"""

from __future__ import annotations

import json

import pytest
import torch

import tunekit.train.recipes.sft as sft
from conftest import ARCHITECTURES, build_model_for, jsonl, make_tiny, signal_on_call, write
from tunekit.config import config_from_dict
from tunekit.errors import Interrupted, ModelError
from tunekit.runs.directory import read_metrics
from tunekit.train.batching import collate
from tunekit.train.recipes.sft import accumulate_gradients
from tunekit.train.session import train
from tunekit.train.setup import load_trained
from tunekit.train.speed import padding_free
from tunekit.train.speed.fused_lora import LoraLinearFunction, unfuse_lora_layers

FAMILIES = list(ARCHITECTURES)
METHODS = ["full", "lora", "dora", "qlora"]
# The fast tier (make test-fast): every family's speed pieces under full, lora and dora; a whole run
# (evaluation, resume, export, GGUF, serve) and qlora for the two families furthest from llama, the
# one every other test file uses. The rest of the matrix is marked slow (a minute a family on 2 cores).
FAST_RUNS = ("gemma3_text", "phi3")


def _runs_params():
    return [f if f in FAST_RUNS else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


def _piece_params():
    return [
        (f, m) if m != "qlora" or f in FAST_RUNS else pytest.param(f, m, marks=pytest.mark.slow)
        for f in FAMILIES
        for m in METHODS
    ]


# family -> the speed pieces that stay off for it (the plain path runs them) and a word of the reason.
EXPECTED_OFF: dict[str, dict[str, str]] = {
    "gemma2": {
        "padding_free": "not sdpa",  # transformers runs Gemma 2 eager: sdpa has no soft-capping
        "target_only_projection": "final_logit_softcapping",
    },
}


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # a private registry for this module
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture
def batch(tokenizer, chat_rows):
    """Four rows of different lengths (29-44 tokens: longer than the sliding windows), right-padded."""
    from tunekit.data.tokenize import TokenizedExample

    cut = [len(r.input_ids) - 5 * i for i, r in enumerate(chat_rows)]
    rows = [TokenizedExample(r.input_ids[:n], r.labels[:n]) for r, n in zip(chat_rows, cut, strict=True)]
    b = collate(rows, tokenizer.pad_token_id)
    assert not b["attention_mask"].all() and min(cut) > 8
    return b


def _build(model_dir, chat_file, method, **train):
    """build_model for `method` (dora: lora with use_dora), the adapters' B drawn at random: PEFT starts
    it at zero, which would hide the adapter's half of every sum."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from tunekit.train.setup import build_model

    lora = {"dropout": 0.0, "use_dora": method == "dora"}
    cfg = config_from_dict(
        {"model": str(model_dir), "method": "lora" if method == "dora" else method,
         "data": {"train": "unused.jsonl"}, "lora": lora, "train": train}
    )  # fmt: skip
    model, params = build_model(cfg, model_dir)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model, params


def _plain_grads(model, batch):
    """transformers' own loss (the whole model's logits, its loss function) and the gradients."""
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _grads(model, params, batch):
    return accumulate_gradients(model, [batch]), [p.grad.clone() for p in params]


def _expected_states(family, method, head="causal"):
    pieces = ["lean_activations", "padding_free", "target_only_projection"]
    if method != "full":
        pieces.insert(0, "fused_lora")
    off = EXPECTED_OFF.get(family, {})
    return {p: ("off" if p in off else "on") for p in pieces}


@pytest.mark.parametrize(("family", "method"), _piece_params())
def test_every_speed_piece_equals_the_plain_path(
    family, method, tiny_family_dir, chat_file, batch, monkeypatch
):
    """Each method trains exactly its parameters, and with every piece on (padding-free too) the
    loss and gradients are those of transformers' and PEFT's own forward; lean activations alone
    change nothing at all (bit for bit)."""
    model_dir = tiny_family_dir(family)
    plain, _ = _build(model_dir, chat_file, method, lean_activations=False, padding_free=False)
    unfuse_lora_layers(plain)
    want_loss, want = _plain_grads(plain, batch)

    segments, fused = [], []
    monkeypatch.setattr(padding_free, "_sdpa", _recording(padding_free._sdpa, segments))
    monkeypatch.setattr(
        LoraLinearFunction, "forward", staticmethod(_recording(LoraLinearFunction.forward, fused))
    )
    model, params = _build(model_dir, chat_file, method, padding_free=True)  # the rest are defaults
    states = {k: v.split(":")[0] for k, v in model.tunekit_speed.items()}
    assert states == _expected_states(family, method)
    for piece, word in EXPECTED_OFF.get(family, {}).items():
        assert word in model.tunekit_speed[piece]
    loss, got = _grads(model, params, batch)

    # The pieces ran where they are on (and not where they are off).
    assert bool(segments) == (states["padding_free"] == "on")
    assert bool(fused) == (method == "lora")  # DoRA and the 4-bit base run PEFT's own forward
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    if method == "full":
        assert len(named) == len(list(model.parameters()))
    else:
        assert named and all("lora_" in n for n in named)
    assert all(g.abs().sum() > 0 for g in got), "a trainable parameter got no gradient"

    assert loss == pytest.approx(want_loss, rel=1e-5)
    for a, b in zip(got, want, strict=True):
        # Summed in another order (packed rows, fused kernels), fp32 gradients differ in their last
        # bits; how many bits depends on the CPU's kernels. So the floor is relative to the tensor's
        # scale: 1e-4 of its largest gradient, far below what a wrong gradient would be off by.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=max(2e-6, 1e-4 * b.abs().max().item()))

    if states["lean_activations"] == "on":
        without, without_params = _build(
            model_dir, chat_file, method, lean_activations=False, padding_free=True
        )
        base_loss, base = _grads(without, without_params, batch)
        assert base_loss == loss and all(torch.equal(a, b) for a, b in zip(got, base, strict=True))


def _recording(fn, seen: list):
    def wrapper(*args, **kwargs):
        seen.append(1)
        return fn(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------
# A run of each family: evaluation, resume, merged export, GGUF, serve


def _run_config(model_dir, data, out):
    """A LoRA run that teaches every question the answer "OK" (and to stop after it)."""
    return config_from_dict(
        {
            "model": str(model_dir),
            "data": {"train": str(data)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"max_steps": 40, "learning_rate": 2e-2, "batch_size": 4, "max_length": 64,
                      "seed": 0, "padding_free": True, "save_steps": 20, "eval_every": 40},
            "eval": {"few_shot": 0, "probe": None, "max_examples": 2, "max_new_tokens": 8},
            "output_dir": str(out),
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def ok_data(tmp_path_factory):
    rows = [
        {"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": "OK"}]}
        for i in range(24)
    ]
    return write(tmp_path_factory.mktemp("ok"), "ok.jsonl", jsonl(*rows))


@pytest.fixture(scope="module")
def runs(tiny_family_dir, ok_data, tmp_path_factory):
    """family -> its trained run directory, trained on first use."""
    done = {}

    def get(family):
        if family not in done:
            out = tmp_path_factory.mktemp(f"run-{family}") / "run"
            done[family] = train(_run_config(tiny_family_dir(family), ok_data, out), quiet=True)
        return done[family]

    return get


def _logits(model, tokenizer):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "question 3?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]  # fmt: skip
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


@pytest.mark.parametrize("family", _runs_params())
def test_run_evaluates_stops_merges_and_serves(family, runs, tmp_path):
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from tunekit.eval.evaluate import evaluate
    from tunekit.ship.export import export
    from tunekit.ship.serve import create_app, load_models

    run = runs(family)
    summary = json.loads((run / "train_summary.json").read_text())
    states = {k: v.split(":")[0] for k, v in summary["speed"].items()}
    assert states == _expected_states(family, "lora")

    # Evaluation: the fine-tune answers and stops where the chat template ends its turn (8 tokens allowed).
    evaluate(run, quiet=True)
    rows = json.loads((run / "predictions.json").read_text())
    assert rows and all(r["finetuned"] == "OK" for r in rows), [r["finetuned"] for r in rows]

    # Merged export: a plain transformers model computing what the adapter model computes.
    merged = AutoModelForCausalLM.from_pretrained(export(run, tmp_path / "merged", merge=True)).eval()
    adapter_model, tok, is_adapter = load_trained(run)
    assert is_adapter and type(merged).__name__ == type(adapter_model.get_base_model()).__name__
    want = _logits(adapter_model, tok)
    with adapter_model.disable_adapter():
        assert (want - _logits(adapter_model, tok)).abs().max() > 1e-2  # the adapter changed something
    torch.testing.assert_close(_logits(merged, tok), want, rtol=1e-4, atol=1e-4)

    # Serve: the OpenAI-compatible endpoint answers with the fine-tune.
    name = run.resolve().name
    with TestClient(create_app(load_models([run]))) as client:
        r = client.post(
            "/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "question 5?"}],
                  "temperature": 0, "max_tokens": 8},
        )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "OK"


@pytest.mark.parametrize("family", _runs_params())
def test_resume_continues_the_same_trajectory(family, runs, tiny_family_dir, ok_data, tmp_path, monkeypatch):
    """Stopped by SIGTERM in step 37 of 40 and resumed: the last steps log the losses of the run that
    went straight through."""
    straight = runs(family)
    cfg = _run_config(tiny_family_dir(family), ok_data, tmp_path / "stopped")
    signal_on_call(monkeypatch, sft, "accumulate_gradients", 37)
    with pytest.raises(Interrupted):
        train(cfg, quiet=True)
    monkeypatch.undo()
    resumed = train(cfg, quiet=True, resume=True)
    a = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert sorted(b) == list(range(1, 41))
    for step in (38, 39, 40):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


@pytest.mark.parametrize("family", _runs_params())
def test_gguf_export(family, runs, tmp_path):
    """write_gguf on the merged model of every family, as llama.cpp's architecture for it (how llama.cpp
    runs each: tests/test_gguf_export.py)."""
    gguf = pytest.importorskip("gguf")
    from tunekit.ship.export import load_merged
    from tunekit.ship.gguf_export import ARCHS, write_gguf

    model, tok = load_merged(runs(family))
    path = write_gguf(model, tok, tmp_path / "model-f16.gguf", "f16", name=family)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == ARCHS[family].name
    # Every weight of the merged model is in the file (tied embeddings once).
    assert len(reader.tensors) >= 2 + 2 * 4


# ---------------------------------------------------------------------------------------------
# compile, the fallbacks, and the architectures tunekit does not know


@pytest.mark.slow  # inductor compiles each family's layers: half a minute to minutes on 2 cores
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_layers_compute_the_eager_loss(family, tiny_family_dir, chat_file, batch):
    from tunekit.models.load import unwrap_peft

    runs = []
    for on in (False, True):
        torch._dynamo.reset()
        model, params = _build(tiny_family_dir(family), chat_file, "lora", compile=on)
        assert model.tunekit_speed.get("compile", "off") == ("on" if on else "off")
        assert all((layer._compiled_call_impl is not None) == on for layer in unwrap_peft(model).model.layers)
        runs.append(_grads(model, params, batch))
    (eager_loss, eager), (loss, got) = runs
    assert loss == pytest.approx(eager_loss, rel=1e-4)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_an_architecture_not_verified_trains_on_the_plain_path(tmp_path, tokenizer, chat_file, batch, capsys):
    """Granite scales its logits after the projection (logits_scaling): the loss that projects target
    positions itself would leave that out. Unverified, every piece stays off with one line saying so,
    and the loss and gradients are transformers' and PEFT's own."""
    from tunekit.train.loss import _decoder_and_head

    model_dir = make_tiny("GraniteConfig", tmp_path / "granite", tokenizer, logits_scaling=4.0)
    model, params = _build(model_dir, chat_file, "lora", padding_free=True)
    note = capsys.readouterr().err
    assert len(note.strip().splitlines()) == 1 and "'granite' is not one tunekit verified" in note
    assert set(model.tunekit_speed) == {
        "fused_lora",
        "lean_activations",
        "padding_free",
        "target_only_projection",
    }
    assert all(v.startswith("off: architecture 'granite'") for v in model.tunekit_speed.values())
    assert _decoder_and_head(model) == (None, None) and not padding_free.enabled(model)
    assert not any("forward" in vars(m) for m in model.modules())  # no fused or lean forward installed
    loss, got = _grads(model, params, batch)

    plain, _ = _build(model_dir, chat_file, "lora", lean_activations=False)
    want_loss, want = _plain_grads(plain, batch)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_soft_capped_or_bidirectional_attention_keeps_padded_batches(tiny_family_dir):
    """Soft-capped attention (Gemma 2; transformers runs it eager, but a later one might offer sdpa)
    and bidirectional attention are not what the segment kernel computes: padded batches."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunekit.train.speed.support import padding_free_reason

    gemma2 = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_family_dir("gemma2")))
    assert "not sdpa" in padding_free_reason(gemma2)
    gemma2.config._attn_implementation = "sdpa"
    assert "soft-capped" in padding_free_reason(gemma2)
    cfg = AutoConfig.from_pretrained(tiny_family_dir("gemma3_text"), use_bidirectional_attention=True)
    assert "bidirectional" in padding_free_reason(AutoModelForCausalLM.from_config(cfg))


@pytest.mark.parametrize("window", [3, 8, 100])
def test_the_banded_mask_is_transformers_sliding_window(window):
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

    band = padding_free.banded_causal_mask(12, window, "cpu")
    want = and_masks(causal_mask_function, sliding_window_overlay(window))
    t = torch.tensor
    expected = torch.tensor([[bool(want(t(0), t(0), t(q), t(k))) for k in range(12)] for q in range(12)])
    if window >= 12:
        assert band is None  # plain causal attention is the same thing
    else:
        assert torch.equal(band, expected)


def test_the_segment_kernel_refuses_what_it_cannot_compute():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="softcap.*train.padding_free: false"):
        padding_free.segment_attention(
            torch.nn.Module(), q, q, q, None, softcap=50.0, tunekit_segments=[0, 4]
        )


def test_an_architecture_transformers_does_not_know_is_a_clear_error(tiny_family_dir, tmp_path, chat_file):
    import shutil

    folder = shutil.copytree(tiny_family_dir("llama"), tmp_path / "fancy")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "fancynet"}))
    with pytest.raises(ModelError, match=r"fancy: config.json names the architecture 'fancynet'.*upgrade it"):
        build_model_for(folder, chat_file)
    (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "t5"}))
    with pytest.raises(ModelError, match="no causal language-model class for a 't5' model"):
        build_model_for(folder, chat_file)
