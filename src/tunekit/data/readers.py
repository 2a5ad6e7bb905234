"""Read raw records (dicts) from a data file, each with the 1-based line where it starts.

A JSONL file such as

    {"prompt": "2+2=", "completion": "4"}

    {"prompt": "3+3=", "completion": "6"}

gives ([(1, {"prompt": "2+2=", "completion": "4"}), (3, {...})], []). Nothing here knows about formats:
`formats.py` turns records into `Example`s. A bad row never stops the read; it becomes a `Problem`
(file, line, kind, and what is wrong and how to fix it) and reading goes on from the row after it (in
a JSON array, the next element; in a CSV, the line after the bad row's first), so one pass reports
every bad row and every row is counted, kept or rejected. The kinds found here: invalid_utf8,
invalid_json, not_an_object, wrong_column_count, bad_header, invalid_csv (errors: the row is
rejected) and duplicate_key (a warning: the row is kept, with the last value as `json` gives it).
What concerns the whole file (missing, not a regular file, UTF-16, line endings of a lone CR, a CSV
header row that does not parse) raises `TunekitError` instead.
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
WARNING_KINDS = frozenset({"duplicate_key"})  # the row is kept; every other kind found here rejects it
SNIFF_BYTES = 1 << 16  # the start of a file looked at for UTF-16 without a BOM and CR-only line endings
_FIELD_LIMIT = 2**31 - 1  # csv's field size limit (a C long): none, as the whole text is in memory anyway


class _Unreadable(Exception):
    """The whole file cannot be read from `line` on (a CSV header row that does not parse)."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


def read_records(path: str | Path) -> tuple[list[Record], list[Problem]]:
    """Read every record of a .jsonl/.ndjson, .json, .csv or .tsv file.

    Returns (records, problems): records are (1-based line where the record starts, dict); problems are
    `Problem`s about whole rows (field ""), sorted by line; `str(problem)` is "file:line: message".
    Problems of a kind in `WARNING_KINDS` are warnings about a kept record; the others reject a row.
    Raises `TunekitError` when the file is missing, is a directory or not a regular file (a device,
    a pipe), has an extension that is not supported, is UTF-16 encoded (with or without a BOM), its
    lines end with a lone CR, or a CSV's header row does not parse.
    """
    path = Path(path)
    reader = _reader_for(path)
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TunekitError(f"{where}: cannot read the file ({e.strerror})") from e
    _sniff(data[:SNIFF_BYTES], where, whole=len(data) <= SNIFF_BYTES)
    text, bad_lines = _decode(data, where)
    try:
        records, problems = reader(text, set(bad_lines))
    except _Unreadable as e:
        raise TunekitError(f"{where}:{e.line}: {e.message}") from None
    problems += [(line, "invalid_utf8", msg) for line, msg in bad_lines.items()]
    return records, [_problem(where, *p) for p in sorted(problems, key=lambda p: p[0])]


def _problem(where: str, line: int, kind: str, message: str) -> Problem:
    return Problem(where, line, "", kind, message, "warning" if kind in WARNING_KINDS else "error")


def iter_jsonl_records(path: str | Path) -> Iterator[Record | Problem]:
    """`read_records` for a JSON Lines file, one line at a time: memory holds one line, not the file.

    Yields, in line order, a (line, dict) record or a `Problem` for each non-blank line (and a
    warning `Problem` before the record it is about), with the same kinds and messages as
    `read_records`. Raises `TunekitError` as it does, and for a file that is not .jsonl/.ndjson (a
    JSON array or a CSV row may span lines, so only JSON Lines streams).
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
        head = f.read(SNIFF_BYTES)
        _sniff(head, where, whole=len(head) < SNIFF_BYTES)
        f.seek(0)
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
            for _, kind, msg in problems:
                yield _problem(where, n, kind, msg)
            for _, record in records:
                yield n, record


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
    if not path.is_file():
        # A device (/dev/zero never ends), a named pipe (blocks) or a socket: never data to read whole.
        via = " (through a symbolic link)" if path.is_symlink() else ""
        raise TunekitError(
            f"{path}: not a regular file{via} but a device, pipe or socket; pass a data file "
            f"({', '.join(_READERS)})"
        )
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise TunekitError(
            f"{path}: unknown extension {suffix or '(none)'!r}; supported: {', '.join(_READERS)} "
            "(rename the file if its content is one of these)"
        )
    return _READERS[suffix]


def _sniff(head: bytes, where: str, whole: bool) -> None:
    """Refuse, from the first bytes, what would otherwise read as every line broken: UTF-16 without a
    byte-order mark, and line endings of a lone CR (classic Mac OS), which make the file one line.
    `whole` says `head` is the entire file."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise TunekitError(f"{where}: the file is UTF-16 encoded; save it as UTF-8")
    # UTF-16 text is mostly ASCII punctuation and names here ({, ", :, keys), each a 0 byte beside
    # its character: many zeros, nearly all at odd offsets (little-endian) or at even ones (big).
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if len(head) >= 4 and max(even, odd) * 8 >= len(head) and max(even, odd) >= 4 * min(even, odd):
        order = "little-endian" if odd > even else "big-endian"
        raise TunekitError(
            f"{where}: the file looks UTF-16 encoded ({order}, without a byte-order mark: every other "
            "byte is 0); save it as UTF-8"
        )
    body = head if whole else head[: head.rfind(b"\r") + 1]
    if b"\n" not in head and b"\r" in body.rstrip(b" \t\r"):
        raise TunekitError(
            f"{where}: lines end with a lone carriage return (CR, as classic Mac OS wrote them), so the "
            "whole file reads as one line; convert the line endings to LF (or CRLF), e.g. "
            "tr '\\r' '\\n' < FILE > FIXED"
        )


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


# ---- JSON objects -------------------------------------------------------------------------------


class _Objects:
    """`json`'s object_pairs_hook: builds each object as `json` does (the last of a repeated key
    wins), noting every key that one object gives twice, so the row can say so."""

    def __init__(self) -> None:
        self.repeated: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            self.repeated += [k for k, _ in pairs if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
        return obj

    def issues(self, line: int) -> list[Issue]:
        """The duplicate-key warning for the object just decoded (none if no key repeats); resets."""
        if not self.repeated:
            return []
        keys = ", ".join(repr(k) for k in dict.fromkeys(self.repeated))
        self.repeated = []
        msg = f"key {keys} given twice in one object; only the last value is used: remove the other"
        return [(line, "duplicate_key", msg)]


# ---- JSON Lines ---------------------------------------------------------------------------------


def _read_jsonl(text: str, bad: set[int], hint: str = _JSONL_HINT) -> tuple[list[Record], list[Issue]]:
    records: list[Record] = []
    problems: list[Issue] = []
    objects = _Objects()
    decode = json.JSONDecoder(object_pairs_hook=objects).decode
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() splits on.
    for n, line in enumerate(text.split("\n"), start=1):
        if n in bad or not line.strip():
            continue
        try:
            obj = decode(line)
        except (ValueError, RecursionError) as e:
            objects.repeated = []
            problems.append((n, "invalid_json", f"invalid JSON ({_json_error(e)}); {hint}"))
            continue
        if isinstance(obj, dict):
            records.append((n, obj))
            problems += objects.issues(n)
        else:
            objects.repeated = []
            problems.append(
                (n, "not_an_object", f"expected a JSON object {{...}}, found {_kind(obj)}; {hint}")
            )
    return records, problems


def _json_error(e: ValueError | RecursionError, line: int | None = None) -> str:
    """What `json` found wrong. Besides syntax errors (JSONDecodeError, a ValueError), valid JSON can
    fail to load: an integer of over 4,300 digits (ValueError) or arrays nested thousands deep.
    `line` is where the problem is reported: a syntax error on another line names its own."""
    if isinstance(e, json.JSONDecodeError):
        at = f"line {e.lineno}, column" if line is not None and e.lineno != line else "column"
        return f"{e.msg} at {at} {e.colno}"
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
    objects = _Objects()
    try:
        obj = json.loads(text, object_pairs_hook=objects)
    except (ValueError, RecursionError) as e:
        line = e.lineno if isinstance(e, json.JSONDecodeError) else first
        return [], [(line, "invalid_json", f"invalid JSON ({_json_error(e)}); {_JSON_HINT}")]
    if isinstance(obj, dict):
        return [(first, obj)], objects.issues(first)
    msg = f"expected a JSON array of objects, found {_kind(obj)}; {_JSON_HINT}"
    return [], [(first, "not_an_object", msg)]


def _read_json_array(text: str, pos: int, bad: set[int]) -> tuple[list[Record], list[Issue]]:
    """Walk the array after its "[" at `pos`, one element at a time, noting the line each starts on.

    An element that does not parse is one rejected row, reported at the line where it starts;
    reading goes on from the next element (`_next_element`), so the elements after it are still
    read and counted."""
    objects = _Objects()
    decoder = json.JSONDecoder(object_pairs_hook=objects)
    lines = _LineCounter(text)
    records: list[Record] = []
    problems: list[Issue] = []
    pos = _skip_ws(text, pos)
    if text.startswith("]", pos):
        return records, _after_array(text, pos + 1, lines)
    for index in itertools.count():
        first = lines.at(pos)
        skip_from = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            issue = (first, "invalid_json", f"invalid JSON ({_json_error(e, first)}); {_JSON_HINT}")
        else:
            last, after = lines.at(end), _skip_ws(text, end)
            skip_from = after
            if not text.startswith((",", "]"), after) and lines.at(after) == last:
                # Text after the element on its own last line (a stray '}', a second object): the
                # row is broken, not just the text after it.
                msg = f"invalid JSON (expected ',' or ']' after the element, on line {last}); {_JSON_HINT}"
                issue = (first, "invalid_json", msg)
            else:
                if bad.intersection(range(first, last + 1)):
                    pass  # its invalid_utf8 problem says why
                elif isinstance(obj, dict):
                    records.append((first, obj))
                    problems += objects.issues(first)
                else:
                    msg = f"array element {index} is {_kind(obj)}, not an object {{...}}"
                    problems.append((first, "not_an_object", msg))
                objects.repeated = []
                if text.startswith("]", after):
                    return records, problems + _after_array(text, after + 1, lines)
                if text.startswith(",", after):
                    pos = _skip_ws(text, after + 1)
                    continue
                # A later line that is not ',' or ']': a missing comma, so that text is a row of its
                # own, rejected, and skipped like a broken element.
                msg = f"invalid JSON (expected ',' or ']' before this); {_JSON_HINT}"
                issue = (lines.at(after), "invalid_json", msg)
        objects.repeated = []
        problems.append(issue)
        found = _next_element(text, skip_from, decoder)
        if found is None:
            msg = (
                f"no element after line {issue[0]} could be found (its brackets never close); the "
                f"rest of the file is not read: fix that element; {_JSON_HINT}"
            )
            return records, [*problems, (issue[0], "invalid_json", msg)]
        pos, closed = found
        if closed:
            return records, problems + _after_array(text, pos + 1, lines)
        pos = _skip_ws(text, pos)
    raise AssertionError("unreachable")


_SCAN = re.compile(r'[][{}",\n\\]')  # the characters that open, close or separate JSON values


def _next_element(text: str, start: int, decoder: json.JSONDecoder) -> tuple[int, bool] | None:
    """Where reading resumes after the broken array element at `start`: (just after the comma that
    ends it, False) or (the position of the array's closing ']', True); None if nothing is found.

    Brackets are counted outside strings; a raw line break ends a string (JSON strings cannot hold
    one, so an unclosed quote spoils one line, not the file). When the brackets never balance (a
    missing '}'), the next line that starts, at the broken element's indentation, an object that
    parses and is followed by ',' or ']' is taken as the next element."""
    depth, in_string, escaped_to = 0, False, -1
    for m in _SCAN.finditer(text, start):
        i, c = m.start(), m.group()
        if i < escaped_to:
            continue
        if in_string:
            if c == "\\":
                escaped_to = i + 2
            elif c in '"\n':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            if depth == 0:
                if c == "]" and _skip_ws(text, i + 1) == len(text):
                    return i, True
                continue  # a stray bracket (a ']' with more after it is not the array's end)
            depth -= 1
        elif c == "," and depth == 0:
            return i + 1, False
    return _next_line_element(text, start, decoder)


def _next_line_element(text: str, start: int, decoder: json.JSONDecoder) -> tuple[int, bool] | None:
    line_start = text.rfind("\n", 0, start) + 1
    indent = text[line_start:start]
    if indent.strip(" \t"):  # the element does not start its line: no indentation to go by
        return None
    for m in re.finditer("\n" + re.escape(indent) + "{", text[start:]):
        at = start + m.end() - 1
        try:
            obj, end = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            continue
        after = _skip_ws(text, end)
        if isinstance(obj, dict) and text.startswith((",", "]"), after):
            return at, False
    return None


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
    """Rows after the header row as dicts; a row's line is the physical line where it starts.

    A row that does not parse (a quote never closed, or closed mid-field) is rejected and reading
    starts again at the line after its first, so the rows its bad quote would swallow are still read."""
    # Feed the csv module our own "\n"-split lines so its line_num counts lines exactly as we do.
    physical = [line + "\n" for line in text.split("\n")]
    header: list[str] | None = None
    records: list[Record] = []
    problems: list[Issue] = []
    at = 0  # the index in `physical` of the line the current reader started on
    limit = csv.field_size_limit(_FIELD_LIMIT)
    try:
        while at < len(physical):
            reader = csv.reader(
                (physical[i] for i in range(at, len(physical))), delimiter=delimiter, quoting=quoting
            )
            first = at + 1  # 1-based line where the next row starts
            try:
                for row in reader:
                    end = at + reader.line_num  # the row's last physical line
                    if first < end and quoting != csv.QUOTE_NONE:
                        _check_quotes(physical[first - 1 : end], delimiter, first, end)
                    row_first, first = first, end + 1
                    if not any(field.strip() for field in row):  # blank line (or a row of empty fields)
                        continue
                    if header is None:
                        header = [name.strip() for name in row]
                        problems += _check_header(header, row_first)
                    elif bad.intersection(range(row_first, end + 1)):
                        continue
                    elif len(row) != len(header):
                        msg = f"expected {len(header)} columns ({', '.join(header)}), found {len(row)}; {fix}"
                        problems.append((row_first, "wrong_column_count", msg))
                    else:
                        records.append((row_first, dict(zip(header, row, strict=True))))
                break
            except csv.Error as e:
                if header is None:
                    raise _Unreadable(first, f"the header row cannot be parsed ({e}); {fix}") from None
                msg = f"cannot parse ({e}); reading goes on at line {first + 1}; {fix}"
                problems.append((first, "invalid_csv", msg))
                at = first  # the line after the bad row's first (`at` is 0-based)
    finally:
        csv.field_size_limit(limit)
    return records, problems


def _check_quotes(lines: list[str], delimiter: str, first: int, end: int) -> None:
    """A row spanning lines `first`..`end` must parse under strict quoting; else its quote was never
    closed (the lenient reader ran on to the end of the file) or closed mid-field: `csv.Error`."""
    try:
        for _ in csv.reader(lines, delimiter=delimiter, strict=True):
            pass
    except csv.Error as e:
        raise csv.Error(
            f"the quoted field opened on line {first} runs to line {end} and is not closed properly: {e}"
        ) from None


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
