"""What a task's data must carry, by the task table's `data` kind: labels, or preference pairs.

The run session checks every split against its task's kind before a model loads, and evaluation
checks the test examples it is given; one check, so the error reads the same everywhere.
"""

from __future__ import annotations

from tunekit.data.example import Example
from tunekit.errors import DataError

# kind -> (what a row lacks, the formats that carry it)
_NEEDS = {
    "labels": (
        "no label",
        "classification ({text, label}; map other column names with data.columns) or chat with a label",
    ),
    "pairs": (
        "no rejected answer",
        "preference ({prompt, chosen, rejected}), sharegpt_preference or anthropic_hh",
    ),
}
_NOUN = {"labels": "labels", "pairs": "preference pairs"}


def _lacks(kind: str, ex: Example) -> bool:
    return ex.label is None if kind == "labels" else ex.rejected is None


def require(kind: str, examples: list[Example], split: str, task: str) -> None:
    """Every example of `split` carries what `kind` needs ("conversations": anything does), else a
    DataError listing each row that lacks it, with the formats that carry it."""
    if kind not in _NEEDS:
        return
    lacking = [ex for ex in examples if _lacks(kind, ex)]
    if not lacking:
        return
    what, formats = _NEEDS[kind]
    ex = lacking[0]
    raise DataError(
        [f"{e.where}: {what}" for e in lacking],
        header=f"data: {ex.source} has no {_NOUN[kind]}: {len(lacking)} of {len(examples)} {split} examples "
        f"(format {ex.format or 'unknown'}); task: {task} needs {_NOUN[kind]}: use {formats}",
    )
