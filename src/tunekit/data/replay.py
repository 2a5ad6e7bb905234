"""Replay: general examples mixed into a fine-tune's training split, against forgetting.

`data.replay: {path: alpaca_en_demo.json, ratio: 0.1}` adds round(0.1 * N) examples drawn from the
replay file (any supported format) to the N task examples of the training split. Training on a
little of the kind of data the base model was tuned on keeps the update from overwriting it;
`tunekit eval`'s forgetting probe measures whether it did. Replay examples go to training only:
validation, test and the run's split files stay the task's own.
"""

from __future__ import annotations

import random

from tunekit.config import ReplayConfig
from tunekit.data.example import Example
from tunekit.errors import DataError


def replay_examples(replay: ReplayConfig, n_train: int) -> list[Example]:
    """round(ratio * n_train) examples from the replay file: a seeded sample (repeats only if the
    file is smaller than that)."""
    from tunekit.data import load_examples

    if not replay.path.is_file():
        raise DataError(
            [f"data.replay.path: no such file: {replay.path}"],
            header="data.replay needs a file of general examples (e.g. alpaca or chat JSONL)",
        )
    pool = load_examples(replay.path)
    pool = [ex for ex in pool if ex.messages and ex.messages[-1].role == "assistant"]
    if not pool:
        raise DataError([f"data.replay.path: {replay.path} has no example with an answer to train on"])
    n = max(1, round(replay.ratio * n_train))
    rng = random.Random(replay.seed)
    if n <= len(pool):
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


def mix_replay(train: list[Example], replay: ReplayConfig | None) -> tuple[list[Example], int]:
    """The training examples with the replay examples added, and how many were added."""
    if replay is None:
        return train, 0
    extra = replay_examples(replay, len(train))
    return train + extra, len(extra)
