"""What a task's data must carry, by the task table's `data` kind: labels, or preference pairs; and
what every task needs of a row, whatever its kind: a prompt before the first answer it learns.

The run session checks every split against its task's kind before a model loads, and evaluation
checks the test examples it is given; one check, so the error reads the same everywhere. `tunekit
data check` rejects the rows no task can train on (`untrainable`) with the same words.
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
NO_PROMPT = "no_prompt"  # the problem kind of an untrainable row


def untrainable(ex: Example) -> str | None:
    """Why no task can train on `ex`, or None. Training finds an answer's tokens by rendering the
    conversation up to it through the chat template, so an answer that carries loss needs a turn
    before it; a row that starts with one (a `text` row, or a chat row of one assistant message)
    has nothing to render."""
    first = ex.messages[0] if ex.messages else None
    if first is None or first.role != "assistant" or first.weight == 0:
        return None
    if ex.format == "text":
        return (
            "a text row is raw text with no prompt, and training on raw text (continued pre-training) "
            "is not supported yet; give each row a prompt and its answer (prompt_completion, chat, ...), "
            "or, if another column holds a label, map it: data.columns / --column label=COLUMN"
        )
    return (
        "the conversation starts with the assistant's answer, with nothing before it to answer, so no "
        "task can train on it; add the user's turn (or a system prompt) before it"
    )


def require(kind: str, examples: list[Example], split: str, task: str) -> None:
    """Every example of `split` can be trained on (`untrainable`) and carries what `kind` needs
    ("conversations": anything does), else a DataError listing each row that does not, with the fix."""
    bad = [(ex, why) for ex in examples if (why := untrainable(ex))]
    if bad:
        raise DataError(
            [f"{ex.where}: {why}" for ex, why in bad],
            header=f"data: {len(bad)} of {len(examples)} {split} examples cannot be trained on",
        )
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


def _lacks(kind: str, ex: Example) -> bool:
    return ex.label is None if kind == "labels" else ex.rejected is None
