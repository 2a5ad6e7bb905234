"""The canonical example: every input format is normalized into this one type.

Everything downstream of the readers (tokenization, splitting, evaluation) reads only `Example`.
A row such as {"prompt": "2+2=", "completion": "4"} becomes

    Example(messages=(Message("user", "2+2="), Message("assistant", "4")), source="x.jsonl", line=1)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import xxhash

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    # OpenAI's per-message weight: 0 excludes an assistant turn from the loss. Only assistant
    # turns carry loss at all, so the weight of other roles is ignored.
    weight: int = 1


@dataclass(frozen=True)
class Example:
    """One training or evaluation example as a conversation.

    The target is the last assistant message; `prompt` is everything before it. For
    classification, `label` holds the class and the last assistant message is the label text.
    """

    messages: tuple[Message, ...]
    label: str | None = None
    # Preference pairs: `messages` is the prompt plus the chosen answer, `rejected` the rejected
    # answer's turns (usually one assistant message) that replace the chosen ones after the prompt.
    rejected: tuple[Message, ...] | None = None
    # Unpaired preference feedback (KTO): whether the final assistant turn(s) after the prompt are a
    # desirable (True) or undesirable (False) answer to it; None for every other kind of row.
    desirable: bool | None = None
    source: str = ""  # the file it came from
    line: int = 0  # 1-based line in that file where the row starts (CSV: the physical line)
    format: str = ""  # the detected or given input format, e.g. "chat", "alpaca"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def prompt(self) -> tuple[Message, ...]:
        """The messages before the final assistant turn: what a model is asked."""
        return self.messages[:-1]

    @property
    def target(self) -> str:
        """The final assistant turn: what a model should answer."""
        return self.messages[-1].content

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def pair(self) -> tuple[tuple[Message, ...], tuple[Message, ...], tuple[Message, ...]]:
        """A preference pair as (prompt, chosen turns, rejected turns): the chosen answer is the
        assistant turns after the last user or system turn, the rejected one all of `rejected`.
        The one reading of a pair that reward, dpo, rl and their evaluation share."""
        if not self.rejected:
            from tunekit.errors import DataError

            raise DataError(
                [f"{self.where}: not a preference pair (no rejected answer)"],
                header="preference tasks train on pairs: rows with `chosen` and `rejected`",
            )
        k = len(self.messages)
        while k > 0 and self.messages[k - 1].role == "assistant":
            k -= 1
        return self.messages[:k], self.messages[k:], self.rejected

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form (OpenAI chat, plus `label`, `rejected` and `desirable` when set)."""
        d: dict[str, Any] = {
            "messages": [
                {"role": m.role, "content": m.content} | ({} if m.weight == 1 else {"weight": m.weight})
                for m in self.messages
            ]
        }
        if self.label is not None:
            d["label"] = self.label
        if self.rejected is not None:
            d["rejected"] = [{"role": m.role, "content": m.content} for m in self.rejected]
        if self.desirable is not None:
            d["desirable"] = self.desirable
        return d

    def content_hash(self) -> str:
        """A stable hash of the content (not of where it came from): equal content, equal hash."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return xxhash.xxh3_64_hexdigest(blob.encode("utf-8"))
