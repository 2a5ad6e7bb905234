"""A merged llama-architecture model as one GGUF file, written with the `gguf` package alone.

No compiled llama.cpp and no copy of its convert script: the `gguf` package (kept by llama.cpp)
brings the writer, the tensor-name mapping (HF `model.layers.0.self_attn.q_proj.weight` ->
`blk.0.attn_q.weight`), the q8_0 quantizer and the special-token reader. What is left here is the
little llama.cpp's converter does on top:

- Q and K weights are permuted: llama.cpp's rope rotates interleaved pairs, HF's rotates halves
  (transformers un-permutes on load, so a round trip through both is the identity).
- 1-D tensors (norms) stay f32, as llama.cpp expects; 2-D weights are f16, or q8_0 where a row
  splits into 32-value blocks.
- The tokenizer: byte-level BPE (`gpt2`) tokens, their types, merges, special ids and the chat
  template used in training. Sentencepiece vocabularies are not supported (a clear error says so).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from tunekit.errors import TunekitError
from tunekit.models.stops import stop_token_ids

QUANTS = ("f16", "q8_0")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: per head, (2, d/2) -> (d/2, 2). w: (n_head * head_dim, hidden)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path: Path, quant: str = "f16", name: str = "tunekit") -> Path:
    """Write `model` (a plain, merged LlamaForCausalLM) and its tokenizer to `path`; returns it."""
    import gguf

    if quant not in QUANTS:
        raise TunekitError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    cfg = model.config
    if cfg.model_type != "llama":
        raise TunekitError(
            f"--format gguf: supports llama-architecture models; this one is '{cfg.model_type}'. "
            "Export safetensors (--format hf) and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _write_hparams(writer, cfg, name, quant)
        _write_tokenizer(writer, tokenizer, model, cfg.vocab_size)
        _write_tensors(writer, model, cfg, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_hparams(writer, cfg, name: str, quant: str) -> None:
    import gguf

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TunekitError(
            f"--format gguf: rope scaling {rope['rope_type']!r} is not supported by this exporter"
        )
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    ftype = gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(ftype)


def _write_tensors(writer, model, cfg, quant: str) -> None:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        # One tensor serves both: llama.cpp (and transformers) fall back to token_embd for the head.
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise TunekitError(f"--format gguf: no GGUF name for tensor {hf_name!r}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, cfg.num_key_value_heads)
        qtype = _tensor_type(data, quant)
        writer.add_tensor(gg_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _tensor_type(data: np.ndarray, quant: str):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if data.ndim == 1:
        return GGMLQuantizationType.F32
    if quant == "q8_0" and data.shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16


def _write_tokenizer(writer, tokenizer, model, vocab_size: int) -> None:
    import gguf

    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    if tok_json["model"]["type"] != "BPE" or not _is_byte_level(tok_json):
        raise TunekitError(
            "--format gguf: supports byte-level BPE tokenizers (GPT-2 / SmolLM / Llama-3 style); this "
            f"tokenizer is {tok_json['model']['type']}. Export safetensors (--format hf) instead."
        )
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as d:
        # SpecialVocab reads merges, special ids and add_bos/eos flags from a HF tokenizer folder.
        tokenizer.save_pretrained(d)
        special = gguf.SpecialVocab(d, load_merges=True, n_vocab=vocab_size)
    special.chat_template = tokenizer.chat_template
    # eos is the stop token training taught (the template's end-of-turn token), which llama.cpp
    # servers stop on.
    special.special_token_ids["eos"] = stop_token_ids(tokenizer, model)[0]
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    special.add_to_gguf(writer, quiet=True)


def _is_byte_level(tok_json: dict) -> bool:
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    return any(p.get("type") == "ByteLevel" for p in parts)


def _pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's name for how text is split before BPE: its `tokenizer.ggml.pre`."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        # Name the split by its regex, from the table transformers reads GGUF files with.
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = parts[0].get("pattern", {}).get("Regex")
        return next((n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex), "default")
    return "default"
