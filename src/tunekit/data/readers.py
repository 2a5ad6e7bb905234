"""Read raw records (dicts) from a data file, each with the 1-based line where it starts.

A JSONL file such as

    {"prompt": "2+2=", "completion": "4"}

    {"prompt": "3+3=", "completion": "6"}

gives ([(1, {"prompt": "2+2=", "completion": "4"}), (3, {...})], []). Nothing here knows about formats:
`formats.py` turns records into `Example`s. A bad row never stops the read; it becomes a `Problem`
(file, line, kind, and what is wrong and how to fix it) and reading goes on, so one pass reports every
bad row. The kinds found here: invalid_utf8, invalid_json, not_an_object, wrong_column_count,
bad_header, invalid_csv.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunekit.data.problems import Problem
from tunekit.errors import TunekitError

Record = tuple[int, dict[str, Any]]
# Internally a problem is (line, kind, message); `read_records` adds the file at the end.
Issue = tuple[int, str, str]

_JSON_WS = re.compile(r"[ \t\n\r]*")  # exactly JSON's whitespace, not Python's wider notion
_JSONL_HINT = "each line must be one JSON object"
_JSON_HINT = "a .json file must hold one JSON array of objects, or one JSON object per line"


def read_records(path: str | Path) -> tuple[list[Record], list[Problem]]:
    """Read every record of a .jsonl/.ndjson, .json, .csv or .tsv file.

    Returns (records, problems): records are (1-based line where the record starts, dict); problems are
    `Problem`s about whole rows (field ""), sorted by line; `str(problem)` is "file:line: message".
    Raises `TunekitError` when the file is missing, is a directory, has an extension that is not
    supported, or is UTF-16 encoded.
    """
    path = Path(path)
    reader = _reader_for(path)
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TunekitError(f"{where}: cannot read the file ({e.strerror})") from e
    text, bad_lines = _decode(data, where)
    records, problems = reader(text, set(bad_lines))
    problems += [(line, "invalid_utf8", msg) for line, msg in bad_lines.items()]
    return records, [
        Problem(where, line, "", kind, msg) for line, kind, msg in sorted(problems, key=lambda p: p[0])
    ]


def iter_jsonl_records(path: str | Path) -> Iterator[Record | Problem]:
    """`read_records` for a JSON Lines file, one line at a time: memory holds one line, not the file.

    Yields, in line order, a (line, dict) record or a `Problem` for each non-blank line, with the
    same kinds and messages as `read_records`. Raises `TunekitError` as it does, and for a file that
    is not .jsonl/.ndjson (a JSON array or a CSV row may span lines, so only JSON Lines streams).
    """
    path = Path(path)
    _reader_for(path)  # missing, a directory, an unknown extension: the same errors as read_records
    where = str(path)
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise TunekitError(
            f"{where}: only JSON Lines (.jsonl, .ndjson) is read one row at a time; convert it"
        )
    try:
        f = path.open("rb")
    except OSError as e:
        raise TunekitError(f"{where}: cannot read the file ({e.strerror})") from e
    with f:
        # Binary lines end at b"\n" only, as `_read_jsonl` splits (a raw U+2028 stays inside its line).
        for n, raw in enumerate(f, start=1):
            raw = raw.removesuffix(b"\n")
            if n == 1:
                text, first = _decode(raw, where)  # drops a BOM; refuses UTF-16
                bad = first.get(1, "")
            else:
                text, bad = _decode_line(raw)
            if bad:
                yield Problem(where, n, "", "invalid_utf8", bad)
                continue
            records, problems = _read_jsonl(text, set())  # one line: its line number is 1
            for _, record in records:
                yield n, record
            for _, kind, msg in problems:
                yield Problem(where, n, "", kind, msg)


def _decode_line(raw: bytes) -> tuple[str, str]:
    """A line's text, or ("", the problem) when it is not valid UTF-8 (as `_decode` words it)."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return (
            "",
            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); save the file as UTF-8",
        )


def _reader_for(path: Path) -> Callable[[str, set[int]], tuple[list[Record], list[Issue]]]:
    if path.is_dir():
        raise TunekitError(f"{path}: is a directory; pass one data file ({', '.join(_READERS)})")
    if not path.exists():
        raise TunekitError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise TunekitError(
            f"{path}: unknown extension {suffix or '(none)'!r}; supported: {', '.join(_READERS)} "
            "(rename the file if its content is one of these)"
        )
    return _READERS[suffix]


def _decode(data: bytes, where: str) -> tuple[str, dict[int, str]]:
    """UTF-8 text (BOM dropped) and {line: problem} for every line that is not valid UTF-8.

    Bad bytes become U+FFFD so the rest of the file still parses; the readers drop any record that
    touches a bad line, whose problem is already reported. Line numbers survive the replacement
    because b"\\n" is never part of a multi-byte UTF-8 sequence.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise TunekitError(f"{where}: the file is UTF-16 encoded; save it as UTF-8")
    try:
        return data.decode("utf-8"), {}
    except UnicodeDecodeError:
        pass
    bad: dict[int, str] = {}
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad[n] = (
                f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); save the file as UTF-8"
            )
    return data.decode("utf-8", errors="replace"), bad


# ---- JSON Lines ---------------------------------------------------------------------------------


def _read_jsonl(text: str, bad: set[int], hint: str = _JSONL_HINT) -> tuple[list[Record], list[Issue]]:
    records: list[Record] = []
    problems: list[Issue] = []
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() splits on.
    for n, line in enumerate(text.split("\n"), start=1):
        if n in bad or not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            problems.append((n, "invalid_json", f"invalid JSON ({_json_error(e)}); {hint}"))
            continue
        if isinstance(obj, dict):
            records.append((n, obj))
        else:
            problems.append(
                (n, "not_an_object", f"expected a JSON object {{...}}, found {_kind(obj)}; {hint}")
            )
    return records, problems


def _json_error(e: ValueError | RecursionError) -> str:
    """What `json` found wrong. Besides syntax errors (JSONDecodeError, a ValueError), valid JSON can
    fail to load: an integer of over 4,300 digits (ValueError) or arrays nested thousands deep."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at column {e.colno}"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e)


# ---- JSON ---------------------------------------------------------------------------------------


def _read_json(text: str, bad: set[int]) -> tuple[list[Record], list[Issue]]:
    start = _skip_ws(text, 0)
    if text.startswith("[", start):
        return _read_json_array(text, start + 1, bad)
    records, problems = _read_jsonl(text, bad, _JSON_HINT)
    if records or not problems or bad:
        return records, problems
    # Not one line of it is a JSON object: perhaps one pretty-printed object (a record, whose keys the
    # format detection reports if they are no known format, e.g. {"data": [...]}) or a broken one.
    first = text.count("\n", 0, start) + 1
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        line = e.lineno if isinstance(e, json.JSONDecodeError) else first
        return [], [(line, "invalid_json", f"invalid JSON ({_json_error(e)}); {_JSON_HINT}")]
    if isinstance(obj, dict):
        return [(first, obj)], []
    msg = f"expected a JSON array of objects, found {_kind(obj)}; {_JSON_HINT}"
    return [], [(first, "not_an_object", msg)]


def _read_json_array(text: str, pos: int, bad: set[int]) -> tuple[list[Record], list[Issue]]:
    """Walk the array after its "[" at `pos`, one element at a time, noting the line each starts on."""
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    records: list[Record] = []
    problems: list[Issue] = []
    pos = _skip_ws(text, pos)
    if text.startswith("]", pos):
        return records, _after_array(text, pos + 1, lines)
    for index in itertools.count():
        first = lines.at(pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            # After a syntax error the next element's start is unknown: stop here.
            line = e.lineno if isinstance(e, json.JSONDecodeError) else first
            return records, [
                *problems,
                (line, "invalid_json", f"invalid JSON ({_json_error(e)}); {_JSON_HINT}"),
            ]
        if not bad.intersection(range(first, lines.at(end) + 1)):
            if isinstance(obj, dict):
                records.append((first, obj))
            else:
                msg = f"array element {index} is {_kind(obj)}, not an object {{...}}"
                problems.append((first, "not_an_object", msg))
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            return records, problems + _after_array(text, pos + 1, lines)
        else:
            msg = f"invalid JSON (expected ',' or ']'); {_JSON_HINT}"
            return records, [*problems, (lines.at(pos), "invalid_json", msg)]
    raise AssertionError("unreachable")


def _after_array(text: str, pos: int, lines: _LineCounter) -> list[Issue]:
    pos = _skip_ws(text, pos)
    if pos == len(text):
        return []
    return [(lines.at(pos), "invalid_json", f"extra data after the closing ']'; {_JSON_HINT}")]


class _LineCounter:
    """Maps growing character offsets to 1-based lines, counting each newline once (O(file size))."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _skip_ws(text: str, pos: int) -> int:
    return _JSON_WS.match(text, pos).end()  # type: ignore[union-attr]  # [ \t\n\r]* always matches


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array [...]"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


# ---- CSV / TSV ----------------------------------------------------------------------------------


def _read_csv(text: str, bad: set[int]) -> tuple[list[Record], list[Issue]]:
    return _read_delimited(text, bad, ",", csv.QUOTE_MINIMAL, "quote fields that hold commas or line breaks")


def _read_tsv(text: str, bad: set[int]) -> tuple[list[Record], list[Issue]]:
    # TSV fields are not quoted (IANA text/tab-separated-values): a field that merely starts with '"',
    # common in real text, would otherwise swallow the lines up to the next quote without any error.
    return _read_delimited(text, bad, "\t", csv.QUOTE_NONE, "fields must not hold tabs or line breaks")


def _read_delimited(
    text: str, bad: set[int], delimiter: str, quoting: int, fix: str
) -> tuple[list[Record], list[Issue]]:
    """Rows after the header row as dicts; a row's line is the physical line where it starts."""
    # Feed the csv module our own "\n"-split lines so its line_num counts lines exactly as we do.
    physical = [line + "\n" for line in text.split("\n")]
    reader = csv.reader(physical, delimiter=delimiter, quoting=quoting)
    header: list[str] | None = None
    records: list[Record] = []
    problems: list[Issue] = []
    start = 1
    try:
        for row in reader:
            first, start = start, reader.line_num + 1
            if not any(field.strip() for field in row):  # blank line (or a row of empty fields)
                continue
            if header is None:
                header = [name.strip() for name in row]
                problems += _check_header(header, first)
            elif bad.intersection(range(first, reader.line_num + 1)):
                continue
            elif len(row) != len(header):
                msg = f"expected {len(header)} columns ({', '.join(header)}), found {len(row)}; {fix}"
                problems.append((first, "wrong_column_count", msg))
            else:
                records.append((first, dict(zip(header, row, strict=True))))
    except csv.Error as e:
        problems.append((start, "invalid_csv", f"cannot parse ({e}); reading stopped here; {fix}"))
    return records, problems


def _check_header(header: list[str], line: int) -> list[Issue]:
    dupes = sorted({name for name in header if header.count(name) > 1})
    if dupes:
        msg = f"duplicate column name(s) {', '.join(dupes)} in the header row; rename them"
        return [(line, "bad_header", msg)]
    return []


_READERS: dict[str, Callable[[str, set[int]], tuple[list[Record], list[Issue]]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".tsv": _read_tsv,
}
