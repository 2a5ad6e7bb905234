"""Model specs (the embedded default alias, a local Hugging Face folder, or a hub id), the device
models run on (device.py), and the token ids that end a reply (stops.py)."""

from tunekit.models.device import autocast, default_device, model_device, place, to_device
from tunekit.models.load import (
    DEFAULT_MODEL,
    load_model,
    load_tokenizer,
    resolve_model,
    tunekit_home,
    unwrap_peft,
)
from tunekit.models.stops import before_stop, end_of_turn_token, reply_text, stop_token_ids

__all__ = [
    "DEFAULT_MODEL",
    "autocast",
    "before_stop",
    "default_device",
    "end_of_turn_token",
    "load_model",
    "load_tokenizer",
    "model_device",
    "place",
    "reply_text",
    "resolve_model",
    "stop_token_ids",
    "to_device",
    "tunekit_home",
    "unwrap_peft",
]
