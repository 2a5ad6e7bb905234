"""Export: merged safetensors that compute what the adapter model computed; GGUF that transformers
loads back with the same logits; the chat template and stop tokens travel with both."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunekit.config import config_from_dict
from tunekit.errors import TunekitError
from tunekit.models.stops import end_of_turn_token, stop_token_ids
from tunekit.ship.export import export
from tunekit.train.session import train
from tunekit.train.setup import load_trained

PROMPT = [{"role": "user", "content": "What is the code for item 3? Answer with the code."}]


def train_tiny(tiny_model_dir, tmp_path, method="lora", steps=4, seed=0, name="run"):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"item {i}?"},
                {"role": "assistant", "content": f"C-{i % 3}"},
            ]
        }
        for i in range(16)
    ]
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "method": method,
            "data": {"train": str(data)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {
                "max_steps": steps,
                "learning_rate": 5e-2,
                "batch_size": 4,
                "max_length": 64,
                "seed": seed,
            },
            "output_dir": str(tmp_path / name),
        }
    )
    return train(cfg, quiet=True)


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory, tiny_model_dir):
    with pytest.MonkeyPatch.context() as mp:  # a private registry for this module
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """One LoRA run shared by the tests that only read it."""
    return train_tiny(tiny_model_dir, tmp_path_factory.mktemp("lora"))


def _logits(model, tokenizer):
    ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        return model(input_ids=ids["input_ids"]).logits[0]


def test_merged_export_loads_plain_and_matches_adapter_logits(lora_run, tmp_path):
    run = lora_run
    out = export(run, tmp_path / "merged", merge=True)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    adapter_model, train_tok, is_adapter = load_trained(run)
    assert is_adapter
    want = _logits(adapter_model, train_tok)
    with adapter_model.disable_adapter():
        base = _logits(adapter_model, train_tok)
    assert (want - base).abs().max() > 1e-3, "the adapter changed nothing: the test would prove nothing"
    torch.testing.assert_close(_logits(merged, tok), want, rtol=1e-4, atol=1e-4)
    # Same chat template and stop tokens as training; the generation config stops on them.
    assert tok.chat_template == train_tok.chat_template
    assert end_of_turn_token(tok) == "<|im_end|>"
    eos = merged.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in ([eos] if isinstance(eos, int) else eos)
    manifest = json.loads((out / "tunekit_export.json").read_text())
    assert manifest["merged"] and manifest["stop_tokens"][0] == "<|im_end|>"


def test_adapter_export_without_merge_is_the_peft_adapter(lora_run, tmp_path):
    out = export(lora_run, tmp_path / "adapter", merge=False)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "chat_template.jinja").is_file()


def test_qlora_merge_dequantizes_first(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    run = train_tiny(tiny_model_dir, tmp_path, method="qlora")
    out = export(run, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not hasattr(merged.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    qmodel, tok, _ = load_trained(run)  # the 4-bit base with the adapter: what training optimised
    # Merging into the original fp32 base (or re-quantizing after the merge) would differ by the
    # 4-bit rounding error; dequantize-then-merge reproduces the adapter model.
    torch.testing.assert_close(_logits(merged, tok), _logits(qmodel, tok), rtol=1e-3, atol=1e-3)


def test_export_refuses_non_generative_runs_and_foreign_folders(lora_run, tmp_path):
    import shutil

    run = shutil.copytree(lora_run, tmp_path / "copy")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(TunekitError, match="not empty"):
        export(run, busy, merge=True)
    text = (run / "config.yaml").read_text().replace("task: sft", "task: classify")
    (run / "config.yaml").write_text(text)
    with pytest.raises(TunekitError, match="only task: sft"):
        export(run, tmp_path / "x", merge=True)


def _gguf_roundtrip(run, tmp_path, quant, tokenizer=True):
    from tunekit.ship.export import load_merged

    path = export(run, tmp_path / f"gguf-{quant}", format="gguf", quant=quant)
    merged, tok = load_merged(run)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    gtok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if tokenizer else None
    return merged, tok, loaded, gtok


def test_gguf_f16_loads_back_in_transformers_with_the_same_logits(lora_run, tmp_path):
    merged, tok, loaded, gtok = _gguf_roundtrip(lora_run, tmp_path, "f16")
    # Tokenizer: same ids for text and for the chat-formatted prompt, same template and stops.
    text = "Hello world! 12345 <|im_end|> naïve café"
    assert gtok(text)["input_ids"] == tok(text)["input_ids"]
    assert gtok.chat_template == tok.chat_template
    assert stop_token_ids(gtok)[0] == stop_token_ids(tok)[0]
    # Weights: the merged model rounded to f16 is what the file holds, to the bit.
    rounded = type(merged)(merged.config).eval()
    rounded.load_state_dict({k: v.half().float() for k, v in merged.state_dict().items()})
    torch.testing.assert_close(_logits(loaded, tok), _logits(rounded, tok), rtol=1e-5, atol=1e-5)
    want, got = _logits(merged, tok), _logits(loaded, tok)
    print("f16 max |logit diff| / logit std:", float((got - want).abs().max() / want.std()))
    assert (got - want).abs().max() <= 0.02 * want.std()  # measured: 0.011


def test_gguf_q8_0_holds_the_q8_0_weights_within_stated_tolerance(lora_run, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader, dequantize, quantize

    merged, tok, loaded, _ = _gguf_roundtrip(lora_run, tmp_path, "q8_0", tokenizer=False)
    types = {t.name: t.tensor_type for t in GGUFReader(next((tmp_path / "gguf-q8_0").glob("*.gguf"))).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    # Exact: the file holds q8_0(merged weights); norms stay f32.
    q8 = GGMLQuantizationType.Q8_0

    def q8_round(v):
        return (
            torch.from_numpy(dequantize(quantize(v.numpy(), q8), q8)).reshape(v.shape) if v.ndim == 2 else v
        )

    rounded = type(merged)(merged.config).eval()
    rounded.load_state_dict({k: q8_round(v) for k, v in merged.state_dict().items()})
    torch.testing.assert_close(_logits(loaded, tok), _logits(rounded, tok), rtol=1e-5, atol=1e-5)
    # Against the unquantized merged model, the stated tolerance (README): mean |logit difference|
    # within 3% of the logits' standard deviation, and the same next token at 90% of positions.
    want, got = _logits(merged, tok), _logits(loaded, tok)
    rel = float((got - want).abs().mean() / want.std())
    same = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    print(f"q8_0: mean |logit diff| / std {rel:.4f}, same argmax {same:.3f}")
    assert rel <= 0.03 and same >= 0.9  # measured: 0.018 and 0.977


def test_a_dpo_run_exports_like_an_sft_run(tiny_model_dir, pairs_file, tmp_path):
    """dpo yields a language model (the task table's `generative`): it merges and exports, and the
    merged model computes what the policy computed."""
    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "task": "dpo",
            "data": {"train": str(pairs_file)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"max_steps": 3, "learning_rate": 5e-2, "batch_size": 4, "max_length": 64},
            "output_dir": str(tmp_path / "dpo"),
        }
    )
    run = train(cfg, quiet=True)
    merged = AutoModelForCausalLM.from_pretrained(export(run, tmp_path / "merged", merge=True)).eval()
    policy, tok, _ = load_trained(run)
    torch.testing.assert_close(_logits(merged, tok), _logits(policy, tok), rtol=1e-4, atol=1e-4)
