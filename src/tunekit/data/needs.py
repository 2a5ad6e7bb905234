"""What a task's data must carry, by the task table's `data` kind: labels, preference pairs, or
unpaired feedback (a rated answer: desirable or not), and for the latter both kinds in training; and
what every task needs of a row, whatever its kind: a prompt before the first answer it learns.

The run session checks every split against its task's kind before a model loads, and evaluation
checks the test examples it is given; one check, so the error reads the same everywhere. `tunekit
data check` rejects the rows no task can train on (`untrainable`) with the same words.
"""

from __future__ import annotations

from tunekit.data.example import Example
from tunekit.data.packing import document_text
from tunekit.errors import DataError

# kind -> (what a row lacks, the formats that carry it)
_NEEDS = {
    "labels": (
        "no label",
        "classification ({text, label}; map other column names with data.columns) or chat with a label "
        "(a conversation with a true/false label reads as kto feedback: set data.format: chat to read "
        "true/false as class labels)",
    ),
    "pairs": (
        "no rejected answer",
        "preference ({prompt, chosen, rejected}), sharegpt_preference, openai_dpo or anthropic_hh",
    ),
    "unpaired": (
        "no desirable/undesirable label",
        "kto ({messages, label: true|false}, or {prompt, completion, label: true|false})",
    ),
}
_NOUN = {"labels": "labels", "pairs": "preference pairs", "unpaired": "rated answers (kto feedback)"}
NO_PROMPT = "no_prompt"  # the problem kind of an untrainable row


def untrainable(ex: Example, kind: str = "conversations") -> str | None:
    """Why a task whose data is `kind` cannot train on `ex`, or None. Raw text is what the
    "documents" kind (task: pretrain) trains on, and all it trains on. Every other kind finds an
    answer's tokens by rendering the conversation up to it through the chat template, so an answer
    that carries loss needs a turn before it; a row that starts with one (a `text` row, or a chat
    row of one assistant message) has nothing to render."""
    if kind == "documents":
        if document_text(ex) is not None:
            return None
        return (
            f'task: pretrain trains on raw text, one document a row ({{"text": ...}}), and this row is '
            f"{ex.format or 'a conversation'} data; give text rows (data.format: text), or train a task "
            "that reads conversations (task: sft)"
        )
    first = ex.messages[0] if ex.messages else None
    if first is None or first.role != "assistant" or first.weight == 0:
        return None
    if ex.format == "text":
        return (
            "a text row is raw text with no prompt: train on raw text with task: pretrain (continued "
            "pre-training); for the other tasks give each row a prompt and its answer (prompt_completion, "
            "chat, ...), or, if another column holds a label, map it: data.columns / --column label=COLUMN"
        )
    return (
        "the conversation starts with the assistant's answer, with nothing before it to answer, so no "
        "task can train on it; add the user's turn (or a system prompt) before it"
    )


def require(kind: str, examples: list[Example], split: str, task: str) -> None:
    """Every example of `split` can be trained on (`untrainable`) and carries what `kind` needs
    ("conversations": anything does; "documents": raw text), else a DataError listing each row that does not, with the fix.
    An "unpaired" train split must hold both desirable and undesirable answers (a DataError with the
    counts otherwise)."""
    bad = [(ex, why) for ex in examples if (why := untrainable(ex, kind))]
    if bad:
        raise DataError(
            [f"{ex.where}: {why}" for ex, why in bad],
            header=f"data: {len(bad)} of {len(examples)} {split} examples cannot be trained on",
        )
    if kind not in _NEEDS:
        return
    lacking = [ex for ex in examples if _lacks(kind, ex)]
    if lacking:
        what, formats = _NEEDS[kind]
        ex = lacking[0]
        raise DataError(
            [f"{e.where}: {what}" for e in lacking],
            header=f"data: {ex.source} has no {_NOUN[kind]}: {len(lacking)} of {len(examples)} {split} "
            f"examples (format {ex.format or 'unknown'}); task: {task} needs {_NOUN[kind]}: use {formats}",
        )
    if kind == "unpaired" and split == "train":
        _both_kinds(examples, task)


def _lacks(kind: str, ex: Example) -> bool:
    if kind == "unpaired":
        return ex.desirable is None
    return ex.label is None if kind == "labels" else ex.rejected is None


def feedback_counts(examples: list[Example]) -> tuple[int, int]:
    """(desirable, undesirable) answers among `examples` (rows without feedback count in neither)."""
    good = sum(ex.desirable is True for ex in examples)
    return good, sum(ex.desirable is False for ex in examples)


def _both_kinds(examples: list[Example], task: str) -> None:
    """KTO learns from the contrast of both kinds: with one alone, its loss only pushes every answer
    up (or down) against a KL estimate from the same answers, and learns no preference."""
    good, bad = feedback_counts(examples)
    if good and bad:
        return
    missing = "undesirable (label false)" if good else "desirable (label true)"
    raise DataError(
        [f"{examples[0].source}: {good} desirable and {bad} undesirable answers in the train split"],
        header=f"data: task: {task} needs both desirable and undesirable answers to train on; add "
        f"{missing} examples",
    )
