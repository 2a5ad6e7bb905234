"""A problem found in a data file: where it is, what is wrong, and how to fix it.

Readers, normalizers and `tunekit data check` all report `Problem`s, so the terminal table, the
JSON report and the error a training run refuses to start on say the same thing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based; 0 when the problem is about the whole file
    field: str  # e.g. "messages[2].role"; "" when about the whole row or file
    kind: str  # a stable machine-readable name, e.g. "invalid_json", "unknown_role", "too_long"
    message: str  # what is wrong and how to fix it
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FieldError(ValueError):
    """One field of one record is wrong; the loader adds the file and line (as a `Problem`).

    `kind` is the stable machine-readable name of the problem (see `Problem.kind`).
    """

    def __init__(self, field: str, kind: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.kind, self.message = field, kind, message


def describe(value: Any) -> str:
    """A JSON value as an error message names it: 'Hi', a string, null, true, the number 2, a list."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 20 else "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
