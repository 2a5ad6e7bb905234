"""`tunekit train CONFIG --seeds K`: K runs that differ only in `train.seed`, and the group they form.

Two trainings of the same config differ by the seed alone (adapter init, data order, dropout): that
spread is training noise, and a claimed improvement must exceed it. The runs go next to output_dir
OUT, one per seed (seed, seed+1, ...):

    OUT-seed42/  OUT-seed43/  OUT-seed44/   each a whole run directory
    OUT/seeds.json                          the group: its seeds, runs, and their training figures

Only `train.seed` and `output_dir` change: `data.split_seed` stays, so every run trains, validates
and is tested on the same examples (evaluation can pair them). `tunekit eval OUT` evaluates each run
and reports every metric's spread (eval/seeds.py); `tunekit eval --compare A B` weighs a difference
against the between-seed variance (eval/compare.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from tunekit.config import Config
from tunekit.console import err as console
from tunekit.errors import ConfigError, TunekitError
from tunekit.io import atomic_write_json

GROUP_FILE = "seeds.json"
MAX_SEED = 2**32 - 1  # config.Seed's bound: numpy takes 0 .. 2**32 - 1
# train_summary.json's figures summarised across seeds in seeds.json
SUMMARY_FIGURES = (
    "final_train_loss",
    "final_val_loss",
    "best_val_loss",
    "steps",
    "train_seconds",
    "wall_seconds",
)


def seed_run_dir(output_dir: Path, seed: int) -> Path:
    """Where the run of `seed` goes: OUT-seedN beside OUT."""
    return output_dir.with_name(f"{output_dir.name}-seed{seed}")


def seed_configs(cfg: Config, k: int) -> list[Config]:
    """The K configs of the group: `cfg` with train.seed seed, seed+1, ... and output_dir OUT-seedN."""
    if k < 2:
        raise ConfigError([f"--seeds {k}: give 2 or more runs to measure the spread between seeds"])
    first = cfg.train.seed
    if first + k - 1 > MAX_SEED:
        raise ConfigError([f"train.seed: {first} + {k} seeds passes {MAX_SEED}; start from a smaller seed"])
    out = Path(cfg.output_dir)
    return [
        cfg.model_copy(
            update={
                "train": cfg.train.model_copy(update={"seed": first + i}),
                "output_dir": seed_run_dir(out, first + i),
            }
        )
        for i in range(k)
    ]


def train_seeds(cfg: Config, k: int, quiet: bool = False, **train_options) -> Path:
    """Train the K runs of `seed_configs` one after another (`train_options` go to each, e.g.
    resume, overwrite), then write OUT/seeds.json; returns OUT, the group folder."""
    from tunekit.train.session import train

    out = Path(cfg.output_dir)
    configs = seed_configs(cfg, k)
    if (out / "config.yaml").is_file():
        raise TunekitError(
            f"output_dir: {out} holds a single run; --seeds writes {seed_run_dir(out, cfg.train.seed).name} ... "
            f"beside it and the group file {out / GROUP_FILE}: choose another output_dir"
        )
    runs = []
    for i, c in enumerate(configs, 1):
        if not quiet:
            console.print(f"seed {c.train.seed} ({i} of {k}) -> {c.output_dir}")
        runs.append(train(c, quiet=quiet, **train_options))
    return write_group(out, [c.train.seed for c in configs], runs)


def write_group(out: Path, seeds: list[int], runs: list[Path]) -> Path:
    """OUT/seeds.json: each seed's run (relative to OUT's parent) and training figures, and the
    spread of each figure across seeds."""
    from tunekit.eval.stats import spread

    summaries = [_summary(r) for r in runs]
    group = {
        "seeds": seeds,
        "runs": [str(Path(r).resolve().relative_to(out.resolve().parent)) for r in runs],
        "training": [{k: s.get(k) for k in SUMMARY_FIGURES} for s in summaries],
        "spread": {
            k: spread([s[k] for s in summaries])
            for k in SUMMARY_FIGURES
            if all(isinstance(s.get(k), int | float) for s in summaries)
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / GROUP_FILE, group)
    return out


def _summary(run: Path) -> dict:
    path = Path(run) / "train_summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_group(path: str | Path) -> bool:
    """Whether `path` is a seed group's folder (holds seeds.json)."""
    return (Path(path) / GROUP_FILE).is_file()


def group_runs(path: str | Path) -> list[tuple[int, Path]]:
    """(seed, run directory) of each run of the group at `path`; a missing run is an error naming it."""
    path = Path(path)
    try:
        group = json.loads((path / GROUP_FILE).read_text())
        pairs = list(zip(group["seeds"], group["runs"], strict=True))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TunekitError(
            f"{path / GROUP_FILE}: not a readable seed group ({e}); train it again with "
            "`tunekit train CONFIG --seeds K`"
        ) from None
    runs = [(int(s), path.parent / r) for s, r in pairs]
    missing = [str(r) for _, r in runs if not (r / "config.yaml").is_file()]
    if missing:
        raise TunekitError(f"{path / GROUP_FILE}: its run {missing[0]} is missing (moved or deleted)")
    return runs
