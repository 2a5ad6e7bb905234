"""tunekit: fine-tune language models on your own data, and prove the gain on held-out data.

The Python API is the same set of functions the CLI calls:

    from tunekit import load_config, fine_tune, evaluate
    run_dir = fine_tune(load_config("examples/lora_tickets.yaml"))  # any task: sft, classify, dpo, ...
    report = evaluate(run_dir)

The names load on first use, so `import tunekit` (and `tunekit --help`) does not import torch.
"""

from __future__ import annotations

import logging
from importlib import import_module

# On AVX512-BF16 CPUs bitsandbytes, at import (peft imports it), looks for a hub kernel for its bf16
# 4-bit path and warns on every run when it cannot fetch one; tunekit turns that path off
# (train/setup.py keep_4bit_layout), so the warning names nothing a user can act on. Set here, before
# anything imports bitsandbytes; a logger's level costs no import.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# public name -> (module, attribute)
_API = {
    "Config": ("tunekit.config", "Config"),
    "config_from_dict": ("tunekit.config", "config_from_dict"),
    "load_config": ("tunekit.config", "load_config"),
    "load_examples": ("tunekit.data", "load_examples"),
    "split_examples": ("tunekit.data", "split_examples"),
    "write_split": ("tunekit.data", "write_split"),
    "ConfigError": ("tunekit.errors", "ConfigError"),
    "DataError": ("tunekit.errors", "DataError"),
    "ModelError": ("tunekit.errors", "ModelError"),
    "TunekitError": ("tunekit.errors", "TunekitError"),
    "evaluate": ("tunekit.eval.evaluate", "evaluate"),
    "quickstart": ("tunekit.demo.quickstart", "quickstart"),
    "fine_tune": ("tunekit.train.session", "train"),
    "resume": ("tunekit.train.session", "resume"),
    "train_sft": ("tunekit.train.session", "train_sft"),
}

__all__ = sorted(_API)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'tunekit' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
