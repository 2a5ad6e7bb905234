"""Detect a data file's format and normalize each of its records into an `Example`.

Four formats, each a plain function in `FORMATS` that turns one record into an `Example` (or raises
`FieldError` naming the field and the fix); `FORMAT_KEYS` holds the keys that identify each:

    chat               {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    prompt_completion  {"prompt": "2+2=", "completion": "4"}
    alpaca             {"instruction": "Add the numbers.", "input": "2, 2", "output": "4"}
    classification     {"text": "Where is my card?", "label": "card_arrival"}

A new format is one function added to `FORMATS` (and its keys to `FORMAT_KEYS` to be auto-detected).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tunekit.data.example import ROLES, Example, Message
from tunekit.data.readers import Record, read_records
from tunekit.errors import DataError, TunekitError

DETECT_SAMPLE = 100  # a file's format is the most common one among its first records


class FieldError(ValueError):
    """One field of one record is wrong; the loader adds the file and line."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


# ---- the formats --------------------------------------------------------------------------------


def chat(record: dict[str, Any]) -> Example:
    """OpenAI chat: `messages` of {role, content, weight?}, ending with an assistant turn; `label` kept."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise FieldError(
            "messages", f"must be a non-empty list of {{role, content}} objects, found {_kind(messages)}"
        )
    turns = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(messages))
    if turns[-1].role != "assistant":
        raise FieldError(
            f"messages[{len(turns) - 1}].role",
            f"the last message must be the assistant's answer, found {turns[-1].role!r}",
        )
    if not any(m.role == "assistant" and m.weight == 1 for m in turns):
        raise FieldError(
            "messages", "every assistant message has weight 0, so nothing is learned; set one to 1"
        )
    label = record.get("label")
    return Example(messages=turns, label=None if label is None else _label(label, "label"))


def _message(m: Any, field: str) -> Message:
    if not isinstance(m, dict):
        raise FieldError(field, f"must be an object {{role, content}}, found {_kind(m)}")
    role = m.get("role")
    if role not in ROLES:
        raise FieldError(f"{field}.role", f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    content = _text(m.get("content"), f"{field}.content")
    if "weight" not in m:
        return Message(role, content)
    weight = m["weight"]
    if role != "assistant":
        raise FieldError(
            f"{field}.weight", f"only assistant messages take a weight; remove it from this {role} message"
        )
    # bool is an int in Python; `true` is not a weight.
    if isinstance(weight, bool) or weight not in (0, 1):
        raise FieldError(f"{field}.weight", f"must be 0 (no loss on this turn) or 1, found {weight!r}")
    return Message(role, content, int(weight))


def prompt_completion(record: dict[str, Any]) -> Example:
    """`prompt` and `completion` strings: one user turn and its answer (text kept as is, spaces included)."""
    prompt = _text(record["prompt"], "prompt")
    completion = _text(record["completion"], "completion")
    return Example(messages=(Message("user", prompt), Message("assistant", completion)))


def alpaca(record: dict[str, Any]) -> Example:
    """Alpaca as in LLaMA-Factory: `instruction`, `input`?, `output`, `system`?, `history`? of [user, assistant]."""
    messages: list[Message] = []
    system = _optional_text(record, "system")
    if system:
        messages.append(Message("system", system))
    messages += _history(record.get("history"))
    user = _text(record["instruction"], "instruction")
    extra = _optional_text(record, "input")
    if extra:
        user += "\n\n" + extra
    messages += [Message("user", user), Message("assistant", _text(record["output"], "output"))]
    return Example(messages=tuple(messages))


def _history(history: Any) -> list[Message]:
    if history is None:
        return []
    if not isinstance(history, list):
        raise FieldError("history", f"must be a list of [user, assistant] pairs, found {_kind(history)}")
    messages = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise FieldError(
                f"history[{i}]", f"must be a [user, assistant] pair of strings, found {_kind(pair)}"
            )
        messages.append(Message("user", _text(pair[0], f"history[{i}][0]")))
        messages.append(Message("assistant", _text(pair[1], f"history[{i}][1]")))
    return messages


def classification(record: dict[str, Any]) -> Example:
    """`text` and `label` (string or integer): the user says the text, the assistant answers the label."""
    text = _text(record["text"], "text")
    label = _label(record["label"], "label")
    return Example(messages=(Message("user", text), Message("assistant", label)), label=label)


FORMATS: dict[str, Callable[[dict[str, Any]], Example]] = {
    "chat": chat,
    "prompt_completion": prompt_completion,
    "alpaca": alpaca,
    "classification": classification,
}

# Detection order matters: a record with `messages` and `label` (e.g. KTO data) is chat, not classification.
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "classification": ("text", "label"),
}


# ---- field helpers ------------------------------------------------------------------------------


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FieldError(field, f"must be a non-empty string, found {_kind(value)}")
    return value


def _optional_text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FieldError(key, f"must be a string when present, found {_kind(value)}")
    return value


def _label(value: Any, field: str) -> str:
    # bool is an int in Python; spell it as JSON does so `true` stays `true`.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise FieldError(field, f"must be a non-empty string or an integer, found {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 20 else "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# ---- detection and loading ----------------------------------------------------------------------


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys identify (see `FORMAT_KEYS`), or None."""
    for name, keys in FORMAT_KEYS.items():
        if all(k in record for k in keys):
            return name
    return None


def read_examples(
    path: str | Path, format: str = "auto", columns: Mapping[str, str] | None = None
) -> tuple[list[Example], list[str]]:
    """Read a file's examples and every problem found (unreadable rows and rows that do not normalize).

    `format` is "auto" or a name in `FORMATS`; `columns` maps canonical names to the file's own, e.g.
    {"label": "category"}, and is applied to every record before detection.
    """
    if format != "auto" and format not in FORMATS:
        raise TunekitError(f"unknown data format {format!r}; use one of: auto, {', '.join(FORMATS)}")
    where = str(path)
    records, problems = read_records(path)
    _check_columns(records, columns, where)
    renamed = [(line, _rename(record, columns)) for line, record in records]
    if not records:
        return [], problems
    fmt = _detect_file_format(renamed, where) if format == "auto" else format
    examples = []
    for (line, record), (_, raw) in zip(renamed, records, strict=True):
        try:
            examples.append(replace(_normalize(fmt, record), source=where, line=line, format=fmt, raw=raw))
        except FieldError as e:
            problems.append(f"{where}:{line}: {e.field}: {e.message}")
    return examples, sorted(problems, key=lambda p: _line_of(p, where))


def load_examples(
    path: str | Path, format: str = "auto", columns: Mapping[str, str] | None = None
) -> list[Example]:
    """Like `read_examples`, but raise `DataError` listing every problem, or if there are no examples."""
    examples, problems = read_examples(path, format, columns)
    if problems:
        raise DataError(problems, header=f"{path}: {len(examples)} rows read, rows with errors")
    if not examples:
        raise DataError(
            [f"{path}: no examples; the file is empty or holds only blank lines"], header="no data"
        )
    return examples


def _normalize(fmt: str, record: dict[str, Any]) -> Example:
    keys = FORMAT_KEYS.get(fmt, ())
    missing = [k for k in keys if k not in record]
    if missing:
        found = ", ".join(record) or "none"
        raise FieldError(missing[0], f"missing; {fmt} rows need keys {', '.join(keys)} (found: {found})")
    return FORMATS[fmt](record)


def _rename(record: dict[str, Any], columns: Mapping[str, str] | None) -> dict[str, Any]:
    if not columns:
        return record
    renamed = dict(record)
    for canonical, source in columns.items():
        if source in record:
            renamed[canonical] = renamed.pop(source)
    return renamed


def _check_columns(records: list[Record], columns: Mapping[str, str] | None, where: str) -> None:
    """A `columns` source name that no record has is a typo; say so once instead of once a row."""
    if not columns or not records:
        return
    seen = {k for _, record in records for k in record}
    unknown = [f"{src!r} (for {canonical})" for canonical, src in columns.items() if src not in seen]
    if unknown:
        raise DataError(
            [f"{where}: columns: {', '.join(unknown)} not found in the file; its keys are {_keys(records)}"],
            header="bad columns mapping",
        )


def _detect_file_format(records: list[Record], where: str) -> str:
    votes = Counter(detect_format(record) for _, record in records[:DETECT_SAMPLE])
    votes.pop(None, None)
    if votes:
        return votes.most_common(1)[0][0]
    supported = "; ".join(f"{name} ({', '.join(keys)})" for name, keys in FORMAT_KEYS.items())
    raise DataError(
        [
            f"{where}: no known format in keys {_keys(records[:DETECT_SAMPLE])}; supported formats "
            f"(keys): {supported}. Rename the keys, or map them with columns, e.g. {{'label': 'category'}}"
        ],
        header="cannot detect the data format",
    )


def _keys(records: list[Record]) -> str:
    keys = dict.fromkeys(k for _, record in records for k in record)  # first-seen order, no repeats
    return ", ".join(keys) or "(none)"


def _line_of(problem: str, where: str) -> int:
    """The line number in a "file:line: ..." problem, for sorting; 0 when it names no line."""
    head = problem[len(where) + 1 :].split(":", 1)[0]
    return int(head) if head.isdigit() else 0
