"""Training: one file per task (sft, classify, reward, dpo, rl), sharing setup.py and loop.py."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from tunekit.config import Config

# task -> (module, function): each task's recipe lives in its own readable file.
TASKS = {
    "sft": ("tunekit.train.sft", "train_sft"),
    "classify": ("tunekit.train.classify", "train_classify"),
    "reward": ("tunekit.train.reward", "train_reward"),
    "dpo": ("tunekit.train.dpo", "train_dpo"),
    "rl": ("tunekit.train.rl", "train_rl"),
}


def train(cfg: Config, quiet: bool = False, allow_data_errors: bool = False) -> Path:
    """Train as `cfg.task` and `cfg.method` say; returns the run directory."""
    module, func = TASKS[cfg.task]
    return getattr(import_module(module), func)(cfg, quiet=quiet, allow_data_errors=allow_data_errors)
