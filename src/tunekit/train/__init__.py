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


def train(cfg: Config, quiet: bool = False, allow_data_errors: bool = False, resume: bool = False) -> Path:
    """Train as `cfg.task` and `cfg.method` say; returns the run directory.

    `resume` continues from the newest complete checkpoint in `cfg.output_dir`."""
    from tunekit.train import distributed

    distributed.init()  # joins the process group inside a `--nproc N` worker; no-op otherwise
    if distributed.world() > 1:
        distributed.check_supported(cfg)
    module, func = TASKS[cfg.task]
    kwargs = {"quiet": quiet, "allow_data_errors": allow_data_errors} | ({"resume": True} if resume else {})
    try:
        return getattr(import_module(module), func)(cfg, **kwargs)
    except BaseException as e:
        from tunekit.train import trackers

        trackers.fail_run(Path(cfg.output_dir), e)  # only a run already registered as running
        raise


def resume(run_dir: str | Path, quiet: bool = False) -> Path:
    """Continue an interrupted run from its newest checkpoint, with the config it was started with."""
    from tunekit.run_dir import load_run_config

    cfg = load_run_config(run_dir)
    cfg.output_dir = Path(run_dir)  # the run may have been started from another working directory
    return train(cfg, quiet=quiet, resume=True)
