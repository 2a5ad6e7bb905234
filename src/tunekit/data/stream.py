"""Large data sets (`data.streaming: true`): read, check, split and tokenize a JSONL train file in
bounded memory. A row looks as it does anywhere else, e.g.

    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}

and there may be tens of millions of them. The normal path holds a whole file as a list of
`Example`s and its tokens as Python lists (about 36 bytes a token); here each stage holds one row,
or one chunk of tokens, at a time:

- `iter_examples`: the rows through the same reader and format normalizers as `read_examples`, so
  a bad row is the same `Problem`, with its file and line;
- `check_stream`: the part of `tunekit data check` that fits a stream: row errors, row warnings,
  the label set, exact duplicates in the train file and exact leakage into the held-out files, by
  8-byte hashes (8 bytes a row). Near duplicates and token lengths are not checked (`CHECKED` says so);
- `hash_split`: a row's split is a function of its content and the seed alone (where a hash of
  both falls among the cumulative ratios), so splitting needs no view of the whole file, the
  counts follow the ratios within sampling noise, and exact duplicates land in the same split;
- `write_stream_splits`: one pass that appends the train rows to the run's data/train.jsonl as they
  come and keeps the held-out rows, a small share, in memory;
- `build_token_store` / `TokenStore`: the train split tokenized chunk by chunk into flat arrays on
  disk, memory-mapped back as the list of `TokenizedExample` the training loop indexes.

A token store is a folder, renamed into place only when complete:

    input_ids.bin   int32 (tokens,)        every example's token ids, one example after another
    loss_mask.bin   uint8 (tokens,)        1 where the token carries loss (its label is its own id)
    offsets.bin     int64 (examples + 1,)  example i is tokens [offsets[i], offsets[i + 1])
    truncated.bin   int32 (examples,)      tokens cut off by max_length
    meta.json       the counts; written last
"""

from __future__ import annotations

import array
import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from tunekit.data.example import Example
from tunekit.data.formats import (
    DETECT_SAMPLE,
    FORMATS,
    FieldError,
    UnusedKeys,
    _detect_file_format,
    _normalize,
    _rename,
)
from tunekit.data.needs import NO_PROMPT, untrainable
from tunekit.data.problems import Problem
from tunekit.data.readers import iter_jsonl_records
from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunekit.errors import DataError, TunekitError
from tunekit.io import _umask, atomic_file, atomic_write_json

SPLITS = ("train", "validation", "test")
MAX_LISTED = 200  # problems kept to show; the rest are counted
CHUNK_TOKENS = 1 << 20  # tokens buffered before a write to the store (4 MiB of int32)
CHECKED = (
    "checked: row errors (file:line), row warnings, the label set, exact duplicates in the train file and "
    "exact train/held-out leakage (64-bit hashes); not checked when streaming: near duplicates and token "
    "lengths (tokenization reports cut examples). `tunekit data check` on a sample of the file runs the rest."
)


# ---- reading ------------------------------------------------------------------------------------


def iter_examples(
    path: str | Path, format: str = "auto", columns: Mapping[str, str] | None = None
) -> Iterator[Example | Problem]:
    """`formats.read_examples` one row at a time: an `Example` or an error `Problem` for each non-blank
    line, in line order, and warning `Problem`s (a key given twice; a key the format does not use, the
    first time it is seen) about the rows kept. The format is detected from the first `DETECT_SAMPLE` records, as there. A
    `columns` name found in no record raises `DataError`: before any row for a file shorter than
    the sample, else once every row has been yielded."""
    if format != "auto" and format not in FORMATS:
        raise TunekitError(f"unknown data format {format!r}; use one of: auto, {', '.join(FORMATS)}")
    where = str(path)
    rows = iter_jsonl_records(path)
    head: list[tuple[int, dict[str, Any]] | Problem] = []  # up to the first DETECT_SAMPLE records
    records: list[tuple[int, dict[str, Any]]] = []
    for item in rows:
        head.append(item)
        if not isinstance(item, Problem):
            records.append(item)
            if len(records) == DETECT_SAMPLE:
                break
    unseen = dict.fromkeys((columns or {}).values())
    keys: dict[str, None] = {}  # the rows' keys, first seen first, for the columns error

    def see(record: dict[str, Any]) -> None:
        for k in record:
            unseen.pop(k, None)
            if len(keys) < 100:
                keys[k] = None

    for _, record in records:
        see(record)
    if unseen and records and len(records) < DETECT_SAMPLE:  # the whole file: say so first, as read_examples
        raise _columns_error(where, columns or {}, unseen, keys)
    sample = [(line, _rename(record, columns)) for line, record in records]
    fmt = format if format != "auto" or not sample else _detect_file_format(sample, where)
    unused = UnusedKeys(where, fmt)
    for item in itertools.chain(head, rows):
        if isinstance(item, Problem):
            yield item
            continue
        line, raw = item
        see(raw)
        record = _rename(raw, columns)
        try:
            example = replace(_normalize(fmt, record), source=where, line=line, format=fmt, raw=raw)
        except FieldError as e:
            yield Problem(where, line, e.field, e.kind, e.message)
            continue
        for key in unused.add(line, record):
            yield unused.problem(key)
        yield example
    if unseen and keys:
        raise _columns_error(where, columns or {}, unseen, keys)


def _columns_error(where: str, columns: Mapping[str, str], unseen: dict, keys: dict) -> DataError:
    unknown = [f"{src!r} (for {name})" for name, src in columns.items() if src in unseen]
    return DataError(
        [f"{where}: columns: {', '.join(unknown)} not found in the file; its keys are {', '.join(keys)}"],
        header="bad columns mapping",
    )


@dataclass(frozen=True)
class ExampleStream:
    """A split too big to hold: its canonical JSONL file (as the run directory stores every split),
    read one example at a time. `len()` is known without reading: the count written with it."""

    path: Path
    count: int

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Example]:
        for item in iter_examples(self.path, format="chat"):
            if isinstance(item, Problem) and item.severity == "warning":
                continue
            if isinstance(item, Problem):
                raise DataError([str(item)], header=f"{self.path}: the run directory's split file is damaged")
            yield item


# ---- checking -----------------------------------------------------------------------------------


@dataclass
class StreamCheck:
    """What `check_stream` found; every row is either kept or rejected."""

    rows: int = 0
    rejected: int = 0
    errors: list[Problem] = field(default_factory=list)  # the first MAX_LISTED
    warnings: Counter = field(default_factory=Counter)  # kind -> rows
    duplicate_groups: int = 0  # exact duplicates within the train file (case and whitespace ignored)
    duplicate_rows: int = 0
    leaked: int = 0  # train rows whose text is also in the validation or test file

    @property
    def kept(self) -> int:
        return self.rows - self.rejected

    def add_error(self, problem: Problem) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_LISTED:
            self.errors.append(problem)

    def listed_errors(self) -> list[str]:
        """The errors to show, with a last line counting those not kept."""
        shown = [str(p) for p in self.errors]
        more = self.rejected - len(self.errors)
        return shown + [f"... and {more} more rows with errors (streaming lists the first {MAX_LISTED})"] * (
            more > 0
        )


def check_stream(cfg) -> StreamCheck:
    """The data check of `data.streaming`, in memory bounded by 8 bytes a train row: every row of the
    train file is read, normalized and checked as `tunekit data check` does, minus what needs all
    rows at once (near duplicates) or the tokenizer (token lengths). The held-out files (small) are
    read whole. Raises `TunekitError` for a file that cannot be read."""
    from tunekit.data.check import example_text, read_file, row_warnings
    from tunekit.data.dedup import normalize_text

    d = cfg.data
    report = StreamCheck()
    held: set[int] = set()

    def text_hash(ex: Example) -> int:
        return xxhash.xxh3_64_intdigest(normalize_text(example_text(ex)).encode("utf-8"))

    for path in (d.validation, d.test):
        if path is None:
            continue
        fc = read_file(path, d.format, d.columns or None, d.labels)
        if fc.unreadable:
            raise TunekitError(fc.unreadable)
        if not fc.examples and not fc.rejected_lines:
            raise TunekitError(f"{path}: no rows: the file is empty or holds only blank lines; add examples")
        report.rows += len(fc.examples) + len(fc.rejected_lines)
        report.rejected += len(fc.rejected_lines)
        errors = [p for p in fc.problems if p.severity == "error"]
        report.errors += errors[: MAX_LISTED - len(report.errors)]
        report.warnings.update(p.kind for p in fc.problems if p.severity == "warning")
        for ex in fc.examples:
            report.warnings.update(w.kind for w in row_warnings(ex, None, cfg.train.max_length))
            held.add(text_hash(ex))
    labels = set(d.labels or ())
    hashes = array.array("Q")
    held_rows = report.rows
    for item in iter_examples(d.train, d.format, d.columns or None):
        if isinstance(item, Problem) and item.severity == "warning":
            report.warnings[item.kind] += 1
            continue
        report.rows += 1
        if isinstance(item, Problem):
            report.add_error(item)
            continue
        why = untrainable(item)
        if why:
            report.add_error(Problem(item.source, item.line, "messages", NO_PROMPT, why))
            continue
        if labels and item.label is not None and item.label not in labels:
            msg = (
                f"label {item.label!r} is not in the declared label set ({', '.join(sorted(labels))}); "
                "fix the label or add it to data.labels"
            )
            report.add_error(Problem(item.source, item.line, "label", "bad_label", msg))
            continue
        report.warnings.update(w.kind for w in row_warnings(item, None, cfg.train.max_length))
        h = text_hash(item)
        hashes.append(h)
        report.leaked += h in held
    if report.rows == held_rows:
        raise TunekitError(f"{d.train}: no rows: the file is empty or holds only blank lines; add examples")
    report.duplicate_groups, report.duplicate_rows = _duplicates(hashes)
    return report


def _duplicates(hashes: array.array) -> tuple[int, int]:
    """(groups, rows) of equal values, sorting the array in place."""
    h = np.frombuffer(hashes, dtype=np.uint64)
    if len(h) < 2:
        return 0, 0
    h.sort()
    same = h[1:] == h[:-1]  # (n - 1,): row i + 1 repeats row i
    starts = same & ~np.concatenate(([False], same[:-1]))  # the first repeat of each group
    return int(starts.sum()), int(same.sum() + starts.sum())


# ---- splitting ----------------------------------------------------------------------------------


def hash_split(example: Example, ratios: Sequence[float], seed: int) -> str:
    """The split of `example`: where a 64-bit hash of its content and `seed` falls among the
    cumulative `ratios` (train, validation, test). Equal content, equal split."""
    u = xxhash.xxh3_64_intdigest(f"{seed}:{example.content_hash()}".encode()) / 2**64  # uniform in [0, 1)
    edge = 0.0
    for name, r in zip(SPLITS, ratios, strict=True):
        edge += r
        if r > 0 and u < edge:
            return name
    return [name for name, r in zip(SPLITS, ratios, strict=True) if r > 0][-1]  # rounding at the top


@dataclass
class StreamSplit:
    train: ExampleStream
    held: dict[str, list[Example]]  # validation and test
    format: str  # the train file's format, as detected or given


def write_stream_splits(
    path: str | Path,
    train_out: Path,
    ratios: Sequence[float],
    seed: int,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    allow_errors: bool = False,
) -> StreamSplit:
    """One pass over `path`: each row goes where `hash_split` says; train rows are appended to
    `train_out` (canonical JSONL, renamed into place when complete), held-out rows kept in memory.

    A row with an error raises `DataError` (the first `MAX_LISTED` and the count) unless
    `allow_errors`, when it is left out (the data check before has reported it).
    """
    held: dict[str, list[Example]] = {"validation": [], "test": []}
    n_train, fmt, errors = 0, format, StreamCheck()
    with atomic_file(train_out) as f:
        for item in iter_examples(path, format, columns):
            if isinstance(item, Problem) and item.severity == "warning":
                continue  # the data check before reported it; the row is kept
            if isinstance(item, Problem):
                errors.add_error(item)
                continue
            why = untrainable(item)
            if why:
                errors.add_error(Problem(item.source, item.line, "messages", NO_PROMPT, why))
                continue
            fmt = item.format
            name = hash_split(item, ratios, seed)
            if name == "train":
                f.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
                n_train += 1
            else:
                held[name].append(item)
        if errors.rejected and not allow_errors:
            raise DataError(errors.listed_errors(), header=f"{path}: {errors.rejected} rows with errors")
    return StreamSplit(ExampleStream(Path(train_out), n_train), held, fmt)


def hash_file(path: Path, h) -> None:
    """Feed the bytes of `path` to the hash object `h`, 1 MiB at a time."""
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)


# ---- the token store ----------------------------------------------------------------------------


@dataclass
class StoreStats:
    examples: int = 0  # stored
    tokens: int = 0
    truncated: int = 0  # stored examples cut at max_length
    empty: int = 0  # examples with no loss token within max_length: not stored
    empty_where: list[str] = field(default_factory=list)  # the first five of those, as file:line


def build_token_store(
    examples: Iterable[Example], tokenize: Callable[[Example], TokenizedExample], path: Path
) -> StoreStats:
    """Tokenize `examples` one at a time into the token store `path` (a folder), writing every
    `CHUNK_TOKENS` tokens, so memory holds one chunk whatever the number of examples. Examples left
    with no target token are counted and skipped, as `train.sft.tokenize_all` does. The folder is
    built under a temporary name and renamed into place complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    stats = StoreStats()
    try:
        with _StoreWriter(tmp) as writer:
            for ex in examples:
                t = tokenize(ex)
                stats.truncated += t.truncated > 0
                if t.n_loss_tokens == 0:
                    stats.empty += 1
                    stats.empty_where += [ex.where] * (len(stats.empty_where) < 5)
                    continue
                writer.add(t)
                stats.examples += 1
                stats.tokens += len(t.input_ids)
        meta = {"version": 1, "examples": stats.examples, "tokens": stats.tokens}
        atomic_write_json(tmp / "meta.json", meta | {"truncated": stats.truncated, "empty": stats.empty})
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "meta.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process built the same store first: keep that one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


class _StoreWriter:
    """Appends tokenized examples to the store's flat files, one chunk at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ids, self.labels = array.array("i"), array.array("i")
        self.offsets, self.truncated = array.array("q"), array.array("i")
        self.end = 0  # tokens written so far, plus those buffered

    def __enter__(self) -> _StoreWriter:
        names = ("input_ids", "loss_mask", "offsets", "truncated")
        self.files = {n: (self.folder / f"{n}.bin").open("wb") for n in names}
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())
        return self

    def add(self, t: TokenizedExample) -> None:
        self.ids.extend(t.input_ids)
        self.labels.extend(t.labels)
        self.end += len(t.input_ids)
        self.offsets.append(self.end)
        self.truncated.append(t.truncated)
        if len(self.ids) >= CHUNK_TOKENS:
            self.flush()

    def flush(self) -> None:
        ids, labels = np.frombuffer(self.ids, np.int32), np.frombuffer(self.labels, np.int32)
        mask = labels != IGNORE_INDEX
        if not np.array_equal(labels[mask], ids[mask]):
            raise ValueError("a label is neither -100 nor its token's id: the store keeps a loss mask only")
        self.files["input_ids"].write(ids.tobytes())
        self.files["loss_mask"].write(mask.astype(np.uint8).tobytes())
        self.files["offsets"].write(self.offsets.tobytes())
        self.files["truncated"].write(self.truncated.tobytes())
        del ids, labels  # release the views before the buffers shrink
        for buf in (self.ids, self.labels, self.offsets, self.truncated):
            del buf[:]

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.flush()
        for f in self.files.values():
            if exc_type is None:
                f.flush()
                os.fsync(f.fileno())
            f.close()


class TokenStore:
    """A token store, memory-mapped: it behaves as the list of `TokenizedExample` it holds
    (`len`, `store[i]`, iteration), and `lengths` gives the tokens of every example (int32, in
    memory: 4 bytes an example) for length-grouped batching. Pages are read from disk as touched."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        n, tokens = meta["examples"], meta["tokens"]
        self.offsets = self._map("offsets", np.int64, n + 1)
        self.input_ids = self._map("input_ids", np.int32, tokens)
        self.loss_mask = self._map("loss_mask", np.uint8, tokens)
        self.truncated = self._map("truncated", np.int32, n)
        self._lengths: np.ndarray | None = None

    def _map(self, name: str, dtype, n: int) -> np.ndarray:
        if n == 0:  # mmap cannot map an empty file
            return np.zeros(0, dtype)
        return np.memmap(self.path / f"{name}.bin", dtype=dtype, mode="r", shape=(n,))

    def __len__(self) -> int:
        return len(self.truncated)

    def __getitem__(self, i: int) -> TokenizedExample:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token store index {i} out of range ({n} examples)")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = np.asarray(self.input_ids[a:b])
        labels = np.where(self.loss_mask[a:b] != 0, ids, IGNORE_INDEX)
        return TokenizedExample(ids.tolist(), labels.tolist(), truncated=int(self.truncated[i]))

    @property
    def lengths(self) -> np.ndarray:
        """(examples,) int32: the tokens of each example."""
        if self._lengths is None:
            self._lengths = np.diff(self.offsets).astype(np.int32)
        return self._lengths
