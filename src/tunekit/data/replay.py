"""Replay: general examples mixed into a fine-tune's training split, against forgetting.

`data.replay: {path: alpaca_en_demo.json, ratio: 0.1}` adds round(0.1 * N) examples drawn from the
replay file (any supported format) to the N task examples of the training split. Training on a
little of the kind of data the base model was tuned on keeps the update from overwriting it;
`tunekit eval`'s forgetting probe measures whether it did. Replay examples go to training only:
validation, test and the run's split files stay the task's own.

`data.replay: self` draws the same way from a different pool: the base model's own answers to the
general prompts shipped here (general_prompts.jsonl, one `{"prompt": ...}` a line). Generating
them needs a model, so that pool is built in train/self_replay.py; this module reads the prompts
and draws from whichever pool it is given.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from tunekit.config import ReplayConfig
from tunekit.data.example import Example
from tunekit.errors import DataError


def general_prompts_path() -> Path:
    """The shipped general prompts that `data.replay: self` has the base model answer."""
    return Path(str(resources.files("tunekit.data") / "general_prompts.jsonl"))


def read_prompts(path: Path) -> list[str]:
    """The prompts of a JSONL of `{"prompt": "..."}` rows, in file order; errors name the line."""
    if not path.is_file():
        raise DataError(
            [f"data.replay.prompts: no such file: {path}"],
            header='data.replay.prompts needs a JSONL file of {"prompt": "..."} rows',
        )
    out, bad = [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            prompt = None
        if not isinstance(prompt, str) or not prompt.strip():
            bad.append(f'{path}:{line_no}: expected {{"prompt": "a non-empty string"}}, got {line[:80]!r}')
        else:
            out.append(prompt.strip())
    if bad or not out:
        raise DataError(bad or [f"{path}: no prompt"], header="data.replay.prompts: not a JSONL of prompts")
    return out


def file_pool(replay: ReplayConfig) -> list[Example]:
    """The examples of the replay file that end in an answer to train on."""
    from tunekit.data import load_examples

    if replay.path is None or not replay.path.is_file():
        raise DataError(
            [f"data.replay.path: no such file: {replay.path}"],
            header="data.replay needs a file of general examples (e.g. alpaca or chat JSONL), "
            "or `data.replay: self` for the base model's own answers",
        )
    pool = load_examples(replay.path)
    pool = [ex for ex in pool if ex.messages and ex.messages[-1].role == "assistant"]
    if not pool:
        raise DataError([f"data.replay.path: {replay.path} has no example with an answer to train on"])
    return pool


def draw(pool: list[Example], ratio: float, seed: int, n_train: int) -> list[Example]:
    """round(ratio * n_train) examples (at least 1) from `pool`: a seeded sample, with repeats only
    when the pool is smaller than that; none from an empty pool."""
    if not pool:
        return []
    n = max(1, round(ratio * n_train))
    rng = random.Random(seed)
    if n <= len(pool):
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


def replay_examples(replay: ReplayConfig, n_train: int, pool: list[Example] | None = None) -> list[Example]:
    """The replay examples for a training split of `n_train` examples: drawn from `pool` (self-replay's
    answers, built by train/self_replay.py) or, when none is given, from the replay file."""
    return draw(file_pool(replay) if pool is None else pool, replay.ratio, replay.seed, n_train)


def mix_replay(train: list[Example], replay: ReplayConfig | None) -> tuple[list[Example], int]:
    """The training examples with the replay file's examples added, and how many were added."""
    if replay is None:
        return train, 0
    extra = replay_examples(replay, len(train))
    return train + extra, len(extra)
