"""Model specs (the embedded default alias, a local Hugging Face folder, or a hub id), and the device
models run on (device.py)."""

from tunekit.models.device import autocast, default_device, model_device, place, to_device
from tunekit.models.load import (
    DEFAULT_MODEL,
    load_model,
    load_tokenizer,
    resolve_model,
    tunekit_home,
    unwrap_peft,
)

__all__ = [
    "DEFAULT_MODEL",
    "autocast",
    "default_device",
    "load_model",
    "load_tokenizer",
    "model_device",
    "place",
    "resolve_model",
    "to_device",
    "tunekit_home",
    "unwrap_peft",
]
