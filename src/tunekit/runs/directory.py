"""The run directory: the unit of state. Every command after `train` takes one.

runs/NAME/
  config.yaml          the resolved config, every default filled in
  data/                the exact examples of each split, in canonical chat JSONL,
    train.jsonl          and manifest.json: which source line went to which split,
    validation.jsonl     with content hashes
    test.jsonl
    manifest.json
  cache/               tokenized splits keyed by content; with data.streaming, the train split's
                       memory-mapped token store (train-KEY.tokens/)
  metrics.jsonl        one JSON object per logged step
  train_summary.json   wall time, tokens/s, final losses, dropped/truncated counts
  adapter/             the LoRA adapter (PEFT format) and the tokenizer with its chat template
  report.json          written by `tunekit eval`
  report.md
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

from tunekit.config import Config, config_to_yaml, load_config
from tunekit.data.example import Example
from tunekit.errors import TunekitError
from tunekit.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

SPLITS = ("train", "validation", "test")
# What a run writes into its directory, besides config.yaml and cache/ (keyed by content, so safe
# to reuse): `tunekit train --overwrite` removes these before it starts again.
RUN_OUTPUTS = (
    "checkpoints",
    "data",
    "metrics.jsonl",
    "train_summary.json",
    "adapter",
    "model",
    "labels.json",
    "stages",
    "tensorboard",
    "predictions.json",
    "report.json",
    "report.md",
    "report.html",
)


def create_run_dir(cfg: Config) -> Path:
    """Make the run directory (checking it is writable) and write the resolved config."""
    run_dir = Path(cfg.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TunekitError(
            f"output_dir: cannot create {run_dir} ({e.strerror}); choose another folder"
        ) from None
    if not os.access(run_dir, os.W_OK):
        raise TunekitError(f"output_dir: {run_dir} is not writable; choose another folder")
    atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    return run_dir


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a tunekit run: its config.yaml and its splits' manifest or checkpoints."""
    path = Path(path)
    written = (path / "data" / "manifest.json").is_file() or (path / "checkpoints").is_dir()
    return (path / "config.yaml").is_file() and written


def clear_run_outputs(run_dir: Path) -> list[str]:
    """Remove what an earlier run wrote into `run_dir` (RUN_OUTPUTS); returns the names removed.
    Only in a run directory (`is_run_dir`), and nothing else in it is touched: an output_dir that
    is some other folder keeps its own `data/`."""
    import shutil

    if not is_run_dir(run_dir):
        return []
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TunekitError(
            f"{run_dir}: not a tunekit run directory (no config.yaml). Pass the output_dir of a "
            "`tunekit train` run, e.g. runs/quickstart."
        )
    return load_config(run_dir / "config.yaml")


def prepare_splits(cfg: Config, run_dir: Path, allow_errors: bool = False) -> dict[str, list[Example]]:
    """Load train/validation/test as the config says, splitting the train file where one is omitted.

    The examples of each split are written to `run_dir/data/` with a manifest, so evaluation later
    reads exactly the held-out examples that training never saw. With `data.streaming` the train
    split is an `ExampleStream` instead of a list (see `_prepare_streaming`).
    """
    from tunekit.data import load_examples, read_examples, split_examples

    d = cfg.data
    if d.streaming:
        return _prepare_streaming(cfg, run_dir, allow_errors)

    def load(path: Path) -> list[Example]:
        from tunekit.data.reasoning import apply_reasoning

        if not allow_errors:
            return apply_reasoning(
                load_examples(path, format=d.format, columns=d.columns or None), d.reasoning
            )
        # --allow-data-errors: train on the rows that read; the check printed the others.
        return apply_reasoning(
            read_examples(path, format=d.format, columns=d.columns or None)[0], d.reasoning
        )

    train = load(d.train)
    splits: dict[str, list[Example]] = {"validation": [], "test": []}
    if d.validation is not None:
        splits["validation"] = load(d.validation)
    if d.test is not None:
        splits["test"] = load(d.test)
    missing = [s for s in ("validation", "test") if getattr(d, s) is None]
    if missing:
        parts = split_examples(train, ratios=_split_ratios(cfg), seed=d.split_seed)
        train = parts["train"]
        for s in missing:
            splits[s] = parts[s]
    splits["train"] = train
    _write_splits(run_dir, splits, cfg)
    return {s: splits[s] for s in SPLITS}


def _split_ratios(cfg: Config) -> tuple[float, float, float]:
    """The ratios to split the train file with: data.split for the splits that have no file of
    their own; a given file's share goes back to train."""
    d = cfg.data
    r_train, r_val, r_test = d.split
    split_val, split_test = d.validation is None, d.test is None
    return (
        r_train + (0 if split_val else r_val) + (0 if split_test else r_test),
        r_val if split_val else 0.0,
        r_test if split_test else 0.0,
    )


def _prepare_streaming(cfg: Config, run_dir: Path, allow_errors: bool) -> dict:
    """`prepare_splits` for data.streaming: one pass over the train file (JSONL), each row going to
    the split a hash of its content and data.split_seed picks (`stream.hash_split`). Train rows are
    appended to data/train.jsonl as they come; the held-out rows (a small share) are kept and written
    as usual. The manifest lists the held-out rows and counts the train rows."""
    from tunekit.data import load_examples, read_examples
    from tunekit.data.stream import write_stream_splits

    d = cfg.data

    def load(path: Path) -> list[Example]:
        if not allow_errors:
            return load_examples(path, format=d.format, columns=d.columns or None)
        return read_examples(path, format=d.format, columns=d.columns or None)[0]

    result = write_stream_splits(
        d.train,
        run_dir / "data" / "train.jsonl",
        _split_ratios(cfg),
        d.split_seed,
        format=d.format,
        columns=d.columns or None,
        allow_errors=allow_errors,
    )
    splits = {"train": result.train} | result.held
    for s in ("validation", "test"):
        if getattr(d, s) is not None:
            splits[s] = load(getattr(d, s))
    _write_splits(run_dir, splits, cfg, result.format)
    return splits


def _write_splits(run_dir: Path, splits: dict, cfg: Config, fmt: str | None = None) -> None:
    from tunekit.data.stream import ExampleStream

    rows = []
    for name in SPLITS:
        if isinstance(splits[name], ExampleStream):
            continue  # data.streaming: written row by row as it was read
        atomic_write_jsonl(run_dir / "data" / f"{name}.jsonl", [e.to_dict() for e in splits[name]])
        rows += [
            {"split": name, "source": e.source, "line": e.line, "hash": e.content_hash()}
            for e in splits[name]
        ]
    # The same shape as `tunekit data split`'s manifest, plus each row's source file (a run may
    # read train, validation and test from different files).
    manifest = {
        "source": {s: str(getattr(cfg.data, s)) for s in SPLITS if getattr(cfg.data, s) is not None},
        "format": fmt or next((e.format for s in SPLITS for e in splits[s]), cfg.data.format),
        "seed": cfg.data.split_seed,
        "ratios": list(cfg.data.split),
        "counts": {s: len(splits[s]) for s in SPLITS},
        "rows": rows,
    }
    if cfg.data.streaming:
        manifest["streaming"] = {
            "split_by": "xxh3_64(f'{seed}:{content_hash}') / 2**64 against the cumulative ratios of the "
            "splits drawn from the train file",
            "train_rows": "not listed (data.streaming): data/train.jsonl holds them, in source order",
        }
    atomic_write_json(run_dir / "data" / "manifest.json", manifest)


def read_run_splits(run_dir: str | Path) -> dict:
    """The three splits as training saw them, to resume or to join a run as another rank. The train
    split of a data.streaming run is an `ExampleStream` over data/train.jsonl, not a list."""
    from tunekit.data.stream import ExampleStream

    run_dir = Path(run_dir)
    manifest_path = run_dir / "data" / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    splits = {s: read_split(run_dir, s) for s in SPLITS if not (s == "train" and "streaming" in manifest)}
    if "streaming" in manifest:
        splits["train"] = ExampleStream(run_dir / "data" / "train.jsonl", manifest["counts"]["train"])
    return {s: splits[s] for s in SPLITS}


def read_split(run_dir: str | Path, name: str) -> list[Example]:
    """The examples of one split as training saw them."""
    from tunekit.data import load_examples

    path = Path(run_dir) / "data" / f"{name}.jsonl"
    if not path.is_file():
        raise TunekitError(f"{run_dir}: no {name} split at {path}; was this run trained with tunekit train?")
    if path.stat().st_size == 0:
        return []
    return load_examples(path, format="chat")


def load_test_examples(run_dir: str | Path, cfg: Config, data: str | Path | None = None) -> list[Example]:
    """What `tunekit eval` scores: the run's held-out split, or the examples in `data`, cut to
    `eval.max_examples`. An empty set is an error saying how to get one."""
    from tunekit.data import load_examples

    if data is not None:
        examples = load_examples(data, format=cfg.data.format, columns=cfg.data.columns or None)
    else:
        examples = read_split(run_dir, "test")
    if cfg.eval.max_examples:
        examples = examples[: cfg.eval.max_examples]
    if not examples:
        raise TunekitError(f"{run_dir}: the test split is empty; pass --data FILE or set data.split")
    return examples


def append_metrics(path: Path, record: dict) -> None:
    """Append `record` to metrics.jsonl as one line, whole or not at all (every writer of it calls
    this): one write(2) to a file opened O_APPEND, and if the disk fills part-way the file is cut
    back to its old size, so a half-written last line never exists. A failure is a clear error
    naming the file."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "No space left on device (a short write)")
        except OSError as e:
            with contextlib.suppress(OSError):  # shrinking needs no space; resume drops a half line anyway
                os.ftruncate(fd, size)
            raise TunekitError(
                f"{path}: cannot log step {record.get('step')} ({e.strerror}); free disk space in "
                f"{path.parent} or set output_dir elsewhere, then resume from the last checkpoint"
            ) from None
    finally:
        os.close(fd)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl. A line that does not parse (half written by an older version
    killed or out of disk mid-line; this one appends whole lines) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
