"""A GGUF file as a base model: dequantized once into an fp32 safetensors folder, then cached.

`model: path/to/file.gguf` works like the embedded alias: the first use reads the file through
transformers' GGUF loader (weights dequantized to fp32, tokenizer and, where the file has one, chat
template rebuilt from its metadata) and saves a plain Hugging Face folder under
`$TUNEKIT_HOME/models/`. The folder is named by the file's content hash, so a renamed or moved copy
reuses it and an edited file never reads a stale conversion. Hashing a multi-gigabyte file takes
seconds, so the hash is remembered per (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tunekit.errors import ModelError

HASHES = ".gguf-hashes.json"  # in the models cache: {absolute path: [size, mtime_ns, sha256]}


def content_hash(path: Path, cache_dir: Path) -> str:
    """The sha256 of `path`'s bytes, remembered in `cache_dir` while its size and mtime hold."""
    stat = path.stat()
    memo_path = cache_dir / HASHES
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    key = str(path.resolve())
    if memo.get(key, [None, None])[:2] == [stat.st_size, stat.st_mtime_ns]:
        return memo[key][2]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    memo[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_name(f"{HASHES}.{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=1))
    os.replace(tmp, memo_path)
    return digest.hexdigest()


def cached_gguf(path: Path, cache_dir: Path) -> Path:
    """The converted folder for the GGUF at `path` (converting it on first use)."""
    if not path.is_file():
        raise ModelError(f"model '{path}': no such file. Point `model:` at an existing .gguf file.")
    key = content_hash(path, cache_dir)[:16]
    # Keyed by content: a renamed or moved copy of a converted file finds its folder by the hash.
    for done in sorted(cache_dir.glob(f"*-{key}")):
        if (done / "config.json").is_file() and (done / "model.safetensors").is_file():
            return done
    target = cache_dir / f"{path.stem}-{key}"
    check_architecture(path)
    convert_gguf(path, target)
    return target


def check_architecture(path: Path) -> str:
    """The GGUF's `general.architecture`, or a clear error if transformers cannot read it."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except Exception as e:  # not a GGUF at all: a bad magic number, a truncated file
        raise ModelError(f"model '{path}': not a readable GGUF file ({e}).") from None
    arch = field.contents() if field is not None else "unknown"
    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in readable:
        raise ModelError(
            f"model '{path}': its architecture '{arch}' cannot be dequantized by transformers' GGUF "
            f"reader (it reads {', '.join(readable)}). Use the model's original Hugging Face "
            "safetensors folder as `model:` instead, or a GGUF of a supported architecture."
        )
    return arch


def convert_gguf(path: Path, target: Path) -> None:
    """Dequantize the GGUF at `path` into an fp32 safetensors folder `target`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tunekit: converting {path.name} to safetensors (once) -> {target}", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelError(
            f"model '{path}': transformers could not read this GGUF ({e}). Use the model's original "
            "Hugging Face safetensors folder as `model:` instead."
        ) from None
    # A GGUF-loaded model refuses to save or train while it is marked as quantized; its weights
    # are already plain fp32 tensors, so dropping the marker is all the conversion needs.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunekit_source.json").write_text(json.dumps({"gguf": str(path.resolve())}) + "\n")
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
