"""The settings a config leaves open, chosen from the data, each said in one line with its reason.

A user who writes only `model:` and `data:` should get the recipe that works for that data, not one
tuned for another kind. The choices here were measured (BENCHMARKS.md, "Classification defaults"):

- text + label data and no `task:` -> `task: classify`: a label head scores every declared label in
  one forward pass (every prediction a valid label), and trains on the text alone, without a chat
  template around it, so a step costs a fraction of generative SFT's.
- a classifier's learning rate, batch, epochs and validation cadence follow the method and the
  number of training rows: small data sets get more passes, large ones fewer; validation runs four
  times an epoch and the best validation accuracy's weights are kept (early stopping).

Only keys absent from the config are chosen: anything the user wrote (or `--set`) stands. The
choices are written into the run's config.yaml, so `tunekit resume` and `tunekit eval` see exactly
what ran.
"""

from __future__ import annotations

import math

from tunekit.config import Config
from tunekit.tasks import get_task

# Learning rate of a label head's run, by method: LoRA adapters move slowly and take a high rate; every
# weight of a full fine-tune, the rate encoders are fine-tuned at.
CLASSIFY_LR = {"lora": 1.0e-3, "dora": 1.0e-3, "qlora": 1.0e-3, "full": 5.0e-5}
CLASSIFY_BATCH = 16
# Epochs: about this many example passes in all, between 2 and 10 epochs (9,000 rows: 3 epochs).
CLASSIFY_PASSES = 25_000
CLASSIFY_EPOCHS = (2, 10)
VALIDATIONS_PER_EPOCH = 4
PATIENCE = 4  # validations without a better accuracy (one epoch) before stopping


def resolve_defaults(cfg: Config, say=None) -> Config:
    """`cfg` with the keys it leaves open chosen from the data; `say(line)` reports each choice."""
    say = say or (lambda line: None)
    if cfg.data.streaming or cfg.train.init_from is not None:
        return cfg
    rows = _train_rows(cfg)
    if rows is None:
        return cfg  # unreadable: the data check that follows names the problem
    n_labelled, n = rows
    # data.replay is sft's: a config that asks for it means generation.
    asks_sft = "replay" in cfg.data.model_fields_set and cfg.data.replay is not None
    if "task" not in cfg.model_fields_set and not asks_sft and n and n_labelled == n:
        cfg = cfg.model_copy(update={"task": "classify"})
        say(
            "task: classify (text + label data and no task: in the config): a label head scores every "
            "label in one forward pass; task: sft teaches the model to write the label instead"
        )
    if get_task(cfg.task).data == "labels":  # a label head's run
        cfg = _classify_schedule(cfg, _n_train(cfg, n), say)
    return cfg


def _train_rows(cfg: Config) -> tuple[int, int] | None:
    """(rows with a label, rows) of the train file, or None when it cannot be read."""
    from tunekit.data import read_examples
    from tunekit.errors import TunekitError

    d = cfg.data
    try:
        examples, _ = read_examples(d.train, format=d.format, columns=d.columns or None)
    except (TunekitError, OSError, ValueError):
        return None
    return sum(ex.label is not None for ex in examples), len(examples)


def _n_train(cfg: Config, n_rows: int) -> int:
    """Training examples after the split (the train file's share when validation or test is split off)."""
    d = cfg.data
    share = d.split[0] + (d.split[1] if d.validation else 0) + (d.split[2] if d.test else 0)
    return max(1, round(n_rows * min(share, 1.0)))


def _classify_schedule(cfg: Config, n_train: int, say) -> Config:
    tc, given = cfg.train, cfg.train.model_fields_set
    chosen: dict = {}
    if "learning_rate" not in given:
        chosen["learning_rate"] = CLASSIFY_LR.get(cfg.method, tc.learning_rate)
    if "batch_size" not in given and "grad_accum" not in given:
        chosen["batch_size"] = CLASSIFY_BATCH
    if "epochs" not in given and "max_steps" not in given and "time_budget" not in given:
        lo, hi = CLASSIFY_EPOCHS
        chosen["epochs"] = float(min(hi, max(lo, round(CLASSIFY_PASSES / n_train))))
    batch = chosen.get("batch_size", tc.batch_size) * tc.grad_accum
    steps_per_epoch = max(1, math.ceil(n_train / batch))
    if "eval_every" not in given:
        chosen["eval_every"] = max(1, steps_per_epoch // VALIDATIONS_PER_EPOCH)
    if "early_stopping_patience" not in given:
        chosen["early_stopping_patience"] = PATIENCE
    if not chosen:
        return cfg
    train = tc.model_copy(update=chosen)
    # model_copy keeps the fields-set record of the original: mark the chosen keys as set, so a
    # config written from this one (config.yaml) and read back resolves to the same run.
    train.model_fields_set.update(chosen)
    shown = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in chosen.items())
    say(f"train ({n_train} training rows, method {cfg.method}): {shown}")
    return cfg.model_copy(update={"train": train})
