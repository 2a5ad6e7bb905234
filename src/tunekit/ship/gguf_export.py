"""A merged model as one GGUF file for llama.cpp, Ollama and LM Studio, written with the `gguf` package.

No compiled llama.cpp and no copy of its convert script: the `gguf` package (kept by llama.cpp)
brings the writer, the tensor-name mapping (HF `model.layers.0.self_attn.q_proj.weight` ->
`blk.0.attn_q.weight`), the quantizers and the special-token reader. What is left here is what
llama.cpp's `convert_hf_to_gguf.py` does on top, per architecture (ARCHS):

- llama and mistral (llama.cpp runs both as `llama`): Q and K weights are permuted, since llama.cpp's
  rope rotates interleaved pairs and HF's rotates halves. qwen2, qwen3, phi3, gemma2 and gemma3 use
  HF's order.
- qwen2: q/k/v biases; qwen3 and gemma3: per-head q/k norms.
- phi3: the fused `qkv_proj` and `gate_up_proj` are stored as they are (`attn_qkv`, and `ffn_up` of
  twice the width, which llama.cpp's phi3 graph splits into gate and up as HF does); a partial
  rotary factor becomes the rope dimension count; the sliding window is recorded, but llama.cpp runs
  phi3 with full attention (a warning says so, as for mistral); longrope (the 128k variants) is refused.
- gemma2 and gemma3: RMSNorm computes `x * (1 + w)` in HF and `x * w` in llama.cpp, so every norm
  weight is stored plus one; the embedding's sqrt(hidden) scale is applied by llama.cpp itself (not
  stored). gemma2 also has post-attention and post-feedforward norms, and attention and final-logit
  soft-capping, which llama.cpp always applies (so a config without them is refused, as is one whose
  query scale, sliding/global layer pattern or untied head llama.cpp's gemma2 graph would not follow).
- 1-D tensors (norms, biases) stay f32, as llama.cpp expects; 2-D weights are f16, or q8_0 / q4_0
  where a row splits into 32-value blocks (f16 otherwise); a q4_0 file keeps the embedding and the
  output head at q8_0, as llama.cpp's own 4-bit mixes keep them above 4 bits.
- The tokenizer: byte-level BPE (`gpt2`: SmolLM, Llama 3, Qwen) with merges, or SentencePiece-style
  (`llama`: Llama 2, Mistral, Gemma) with scores that reproduce the merge order; token types,
  special ids and the chat template used in training.

`write_modelfile` adds an Ollama Modelfile whose template and stop parameters match training.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunekit.errors import TunekitError
from tunekit.models.stops import stop_token_ids

QUANTS = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class Arch:
    """How one HF `model_type` becomes llama.cpp's architecture."""

    name: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool  # llama.cpp's llama rope wants interleaved Q/K rows
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's 1 + w)


# HF model_type -> llama.cpp architecture; one row per exported family.
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2", permute_qk=False),
    "qwen3": Arch("qwen3", permute_qk=False),
    "phi3": Arch("phi3", permute_qk=False),
    "gemma2": Arch("gemma2", permute_qk=False, norm_shift=1.0),
    "gemma3_text": Arch("gemma3", permute_qk=False, norm_shift=1.0),
}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: per head, (2, d/2) -> (d/2, 2). w: (n_head * head_dim, hidden)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def arch_for(cfg) -> Arch:
    """The export row for a model config, or a clear error naming the supported families."""
    arch = ARCHS.get(cfg.model_type)
    if arch is None:
        raise TunekitError(
            f"--format gguf: exports {', '.join(sorted(ARCHS))} models; this one is '{cfg.model_type}'. "
            "Export safetensors (--format hf) and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    return arch


def write_gguf(model, tokenizer, path: Path, quant: str = "f16", name: str = "tunekit") -> Path:
    """Write `model` (a plain, merged causal LM of an ARCHS family) and its tokenizer to `path`."""
    import gguf

    if quant not in QUANTS:
        raise TunekitError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    cfg = model.config
    arch = arch_for(cfg)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch.name)
    try:
        _write_hparams(writer, cfg, name, quant)
        _write_tokenizer(writer, tokenizer, model, cfg.vocab_size)
        _write_tensors(writer, model, cfg, arch, quant)
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


def _rope(cfg, layer_type: str = "full_attention") -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`: flat, or one dict per layer type."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get(layer_type, rope) if isinstance(rope.get(layer_type), dict) else rope
    if rope.get("rope_type", "default") != "default":
        raise TunekitError(
            f"--format gguf: rope scaling {rope['rope_type']!r} is not supported by this exporter. "
            "Export safetensors (--format hf) and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    return rope


def _refuse(cfg, what: str) -> TunekitError:
    """A model llama.cpp's graph for its family would compute differently: no file, the fallback named."""
    return TunekitError(
        f"--format gguf: this {cfg.model_type} model has {what}. Export safetensors (--format hf) instead."
    )


def _write_hparams(writer, cfg, name: str, quant: str) -> None:
    import gguf

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = _rope(cfg)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    # A partial rotary factor (Phi-3 configs may set one): llama.cpp, like HF, rotates the first
    # n_rot values of each head and passes the rest through.
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_vocab_size(cfg.vocab_size)
    FAMILY_HPARAMS.get(cfg.model_type, _warn_full_attention)(writer, cfg, head_dim)
    ftype = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}[quant]
    writer.add_file_type(getattr(gguf.LlamaFileType, ftype))


def _warn_full_attention(writer, cfg, head_dim: int) -> None:
    """llama.cpp's llama/qwen/phi3 graphs attend over the whole context, as every GGUF of such a model
    (Mistral 7B v0.1, Phi-3 mini 4k) does: same outputs up to the window, different past it."""
    window = _window(cfg)
    if window and window < cfg.max_position_embeddings:
        from tunekit.console import err

        err.print(
            f"warning: {cfg.model_type} sliding_window {window}: llama.cpp attends over the whole "
            "context, so replies longer than the window differ from the trained model"
        )


def _window(cfg) -> int | None:
    """The sliding-attention window a llama/mistral/qwen/phi3 model uses, or None."""
    if not getattr(cfg, "use_sliding_window", True):
        return None
    return getattr(cfg, "sliding_window", None)


def _write_phi3_hparams(writer, cfg, head_dim: int) -> None:
    """Phi-3 / Phi-4: llama.cpp's phi3 graph sizes the heads as hidden / heads; the window is written
    as convert_hf_to_gguf writes it (0: none), though llama.cpp runs phi3 without one."""
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise _refuse(cfg, f"head_dim {head_dim} x {cfg.num_attention_heads} heads != hidden_size")
    original = getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_sliding_window(_window(cfg) or 0)
    _warn_full_attention(writer, cfg, head_dim)


def gemma2_layer_types(n_layers: int) -> list[str]:
    """The layers llama.cpp's gemma2 graph slides over: every other one, starting with the first."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]


def _write_gemma2_hparams(writer, cfg, head_dim: int) -> None:
    """Gemma 2: llama.cpp's gemma2 graph always soft-caps attention and final logits, alternates the
    sliding and global layers itself, scales queries by 1/sqrt(head_dim) (1/sqrt(hidden / heads) for
    the 46-layer 27B) and reads the output head from the embedding."""
    query_scale = cfg.hidden_size // cfg.num_attention_heads if cfg.num_hidden_layers == 46 else head_dim
    if cfg.query_pre_attn_scalar != query_scale:
        raise _refuse(cfg, f"query_pre_attn_scalar {cfg.query_pre_attn_scalar}, llama.cpp uses {query_scale}")
    if not cfg.attn_logit_softcapping or not cfg.final_logit_softcapping:
        raise _refuse(cfg, "no attention or final-logit soft-capping, which llama.cpp always applies")
    if list(cfg.layer_types) != gemma2_layer_types(cfg.num_hidden_layers):
        raise _refuse(cfg, "sliding/global layers other than llama.cpp's alternation (layer 0 sliding)")
    if not cfg.tie_word_embeddings:
        raise _refuse(cfg, "an output head untied from the embedding, which llama.cpp's gemma2 ignores")
    writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    # No window: one as long as the context (llama.cpp's default, 4096, would bite past it).
    writer.add_sliding_window(cfg.sliding_window or cfg.max_position_embeddings)


def _write_gemma3_hparams(writer, cfg, head_dim: int) -> None:
    """Gemma 3: local (sliding) and global layers with their own rope bases; llama.cpp scales the
    attention by 1/sqrt(head_dim), so a model whose query_pre_attn_scalar differs cannot be run."""
    if getattr(cfg, "query_pre_attn_scalar", head_dim) != head_dim:
        raise TunekitError(
            f"--format gguf: gemma3 with query_pre_attn_scalar {cfg.query_pre_attn_scalar} != head_dim "
            f"{head_dim} is not what llama.cpp computes; export --format hf instead"
        )
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise TunekitError("--format gguf: gemma3 with attn_logit_softcapping is not supported by llama.cpp")
    if getattr(cfg, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    writer.add_rope_freq_base_swa(_rope(cfg, "sliding_attention").get("rope_theta", 10000.0))


# HF model_type -> what its llama.cpp graph reads beyond the common hparams (default: the warning
# that llama.cpp attends over the whole context).
FAMILY_HPARAMS = {
    "phi3": _write_phi3_hparams,
    "gemma2": _write_gemma2_hparams,
    "gemma3_text": _write_gemma3_hparams,
}


def _write_tensors(writer, model, cfg, arch: Arch, quant: str) -> None:
    import gguf

    gg_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
    names = gguf.get_tensor_name_map(gg_arch, cfg.num_hidden_layers)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        # One tensor serves both: llama.cpp (and transformers) fall back to token_embd for the head.
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise TunekitError(f"--format gguf: no GGUF name for tensor {hf_name!r} ({cfg.model_type})")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch.permute_qk and hf_name.endswith("q_proj.weight"):
            data = permute(data, cfg.num_attention_heads)
        elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
            data = permute(data, cfg.num_key_value_heads)
        if arch.norm_shift and hf_name.endswith("norm.weight"):
            data = data + np.float32(arch.norm_shift)
        qtype = tensor_type(data, quant, gg_name)
        writer.add_tensor(gg_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


# Tensors a 4-bit file keeps at 8 bits, as llama.cpp's own q4_0 mix does (it uses q6_K, which the gguf
# package cannot write): the embedding and the output head, which every token passes through.
KEEP_8BIT = ("token_embd.weight", "output.weight")


def tensor_type(data: np.ndarray, quant: str, name: str = ""):
    """The GGML type a tensor is stored as: 1-D f32; 2-D the requested quant where rows split into
    32-value blocks (q4_0: the embedding and output head q8_0), f16 otherwise."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if data.ndim == 1:
        return GGMLQuantizationType.F32
    if quant == "q4_0" and name in KEEP_8BIT:
        quant = "q8_0"
    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}.get(quant)
    if qtype is not None and data.shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    return GGMLQuantizationType.F16


def _write_tokenizer(writer, tokenizer, model, vocab_size: int) -> None:
    import gguf

    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = tokenizer_kind(tok_json)
    if kind is None:
        raise TunekitError(
            "--format gguf: supports byte-level BPE tokenizers (GPT-2 / SmolLM / Llama 3 / Qwen) and "
            f"SentencePiece-style ones (Llama 2 / Mistral / Gemma); this tokenizer is "
            f"{tok_json['model']['type']} without either. Export safetensors (--format hf) instead."
        )
    tokens, types, scores = _vocab(tokenizer, tok_json, kind, vocab_size)
    if kind == "bpe":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json))
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_adds_space_prefix(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as d:
        # SpecialVocab reads merges, special ids and add_bos/eos flags from a HF tokenizer folder.
        tokenizer.save_pretrained(d)
        special = gguf.SpecialVocab(d, load_merges=kind == "bpe", n_vocab=vocab_size)
    special.chat_template = tokenizer.chat_template
    # eos is the stop token training taught (the template's end-of-turn token), which llama.cpp
    # servers stop on.
    special.special_token_ids["eos"] = stop_token_ids(tokenizer, model)[0]
    if tokenizer.pad_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    special.add_to_gguf(writer, quiet=True)


def tokenizer_kind(tok_json: dict) -> str | None:
    """'bpe' (byte-level BPE), 'spm' (SentencePiece-style: byte-fallback BPE or Unigram with ▁ for
    spaces) or None (neither: not exportable)."""
    model = tok_json["model"]
    if model["type"] == "BPE" and _is_byte_level(tok_json):
        return "bpe"
    if model["type"] == "Unigram" or (model["type"] == "BPE" and model.get("byte_fallback")):
        return "spm"
    return None


def _vocab(tokenizer, tok_json: dict, kind: str, vocab_size: int):
    """Token strings, GGUF token types and (SentencePiece) scores, one per id up to vocab_size."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    scores_by_token = _spm_scores(tok_json) if kind == "spm" else {}
    unk = tok_json["model"].get("unk_token")
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        scores.append(float(scores_by_token.get(token, 0.0)))
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        # Byte and unknown tokens first: a tokenizer may list them as added special tokens, but
        # llama.cpp's byte fallback only uses tokens typed BYTE.
        if kind == "spm" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        elif kind == "spm" and token == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, scores


def _spm_scores(tok_json: dict) -> dict[str, float]:
    """Scores llama.cpp's SentencePiece tokenizer merges by (highest first). A Unigram model has them;
    for a byte-fallback BPE (how transformers stores SentencePiece BPE) the token made by the k-th
    merge scores -k, so llama.cpp merges in the order the HF tokenizer does."""
    model = tok_json["model"]
    if model["type"] == "Unigram":
        return {piece: score for piece, score in model["vocab"]}
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank))
    return scores


def _adds_space_prefix(tok_json: dict) -> bool:
    """Whether the tokenizer puts ▁ before the text (Llama 2, Mistral) or not (Gemma)."""
    norm = tok_json.get("normalizer") or {}
    parts = norm.get("normalizers", [norm])
    if any(p.get("type") == "Prepend" for p in parts):
        return True
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in parts)


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
