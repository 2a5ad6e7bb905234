"""Atomic file writes: a crash never leaves a half-written file that looks complete."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tunekit.errors import TunekitError


@contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[str]]:
    """A text file written through a temporary name in the same folder, fsynced and renamed into
    place on success, removed on any error: a crash never leaves a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output(
    path: str | Path, what: str, *, folder: bool = False, inputs: Iterable[str | Path] = ()
) -> Path:
    """Refuse, before any work, an output that cannot be written where it is asked: a file in its
    way (`train.jsonl/report.json`), a folder where a file is wanted or the reverse, a place without
    write permission, or one of `inputs` (the data it is made from). `what` names the option in the
    message, e.g. "--json". Returns `path`; raises `TunekitError`."""
    path = Path(path)
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        found = "a folder" if path.is_dir() else "a file, not a folder"
        raise TunekitError(f"{what} {path}: is {found}; give the path of a {kind} to write")
    # The nearest part of the path that exists is where the missing folders would be made.
    base = next((p for p in path.parents if p.exists() or p == p.parent), path)
    if not base.is_dir():
        raise TunekitError(
            f"{what} {path}: {base} is a file, not a folder, so nothing can be written under it; "
            f"give a {kind} path outside it"
        )
    where = path if folder and path.exists() else base  # an existing folder is written into
    if not os.access(where, os.W_OK | os.X_OK):
        raise TunekitError(f"{what} {path}: no permission to write in {where}")
    for source in inputs:
        if path.exists() and _same_file(path, Path(source)):
            raise TunekitError(
                f"{what} {path}: is the input file {source}; writing it would destroy the data"
            )
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:  # `b` is missing or unreadable: not the same file as an existing `a`
        return False


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, fsync, then rename."""
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
