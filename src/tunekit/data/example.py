"""The canonical example: every input format is normalized into this one type.

Everything downstream of the readers (tokenization, splitting, evaluation) reads only `Example`.
A row such as {"prompt": "2+2=", "completion": "4"} becomes

    Example(messages=(Message("user", "2+2="), Message("assistant", "4")), source="x.jsonl", line=1)

Tool use and reasoning live on the messages: an assistant turn may carry `tool_calls` (and empty
content), a `tool` turn holds a call's result, `Example.tools` the declared functions (OpenAI's
JSON-schema definitions), and an assistant turn's `reasoning` its thinking (OpenAI's
`reasoning_content`, or a `<think>` block taken out of the content), so `content` is always the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import xxhash

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant turn makes: the name and the arguments as JSON object text
    (a string, so a Message stays hashable; `args` parses it)."""

    name: str
    arguments: str = "{}"
    id: str = ""

    @property
    def args(self) -> dict[str, Any]:
        return json.loads(self.arguments)

    @property
    def block(self) -> str:
        """The call as text, in Hermes' and Qwen's form (data/tools.py), as a model trained through the
        fallback rendering writes it: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""
        body = json.dumps({"name": self.name, "arguments": self.args}, ensure_ascii=False)
        return f"<tool_call>\n{body}\n</tool_call>"

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's shape: {id?, type: function, function: {name, arguments (a JSON string)}}."""
        d: dict[str, Any] = {"id": self.id} if self.id else {}
        return d | {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    # OpenAI's per-message weight: 0 excludes an assistant turn from the loss. Only assistant
    # turns carry loss at all, so the weight of other roles is ignored.
    weight: int = 1
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns: the functions it calls
    tool_call_id: str = ""  # tool turns: the call this result answers
    name: str = ""  # tool turns: the function that produced it
    reasoning: str = ""  # assistant turns: the thinking before the answer (data/reasoning.py)
    # 0: the reasoning stays in the context but carries no loss (`data.reasoning: mask`).
    reasoning_weight: int = 1

    @property
    def reply(self) -> str:
        """The turn's answer as text: its content, then each tool call as a `<tool_call>` block."""
        return "\n".join([self.content] * bool(self.content) + [c.block for c in self.tool_calls])

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form of one message (OpenAI chat, fields at their defaults left out)."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.weight != 1:
            d["weight"] = self.weight
        if self.tool_calls:
            d["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.tool_call_id:
            d["tool_call_id"] = self.tool_call_id
        if self.name:
            d["name"] = self.name
        if self.reasoning:
            d["reasoning_content"] = self.reasoning
            if self.reasoning_weight != 1:
                d["reasoning_weight"] = self.reasoning_weight
        return d


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
    # The functions the conversation may call, each an OpenAI tool definition
    # {"type": "function", "function": {"name", "description", "parameters"}}.
    tools: tuple[dict[str, Any], ...] = field(default=(), hash=False)
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
        """The final assistant turn's answer: what a model should reply, its thinking left out and
        its tool calls written as `<tool_call>` blocks (`Message.reply`)."""
        return self.messages[-1].reply

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
        d: dict[str, Any] = {"messages": [m.to_dict() for m in self.messages]}
        if self.tools:
            d["tools"] = list(self.tools)
        if self.label is not None:
            d["label"] = self.label
        if self.rejected is not None:
            d["rejected"] = [m.to_dict() for m in self.rejected]
        if self.desirable is not None:
            d["desirable"] = self.desirable
        return d

    def content_hash(self) -> str:
        """A stable hash of the content (not of where it came from): equal content, equal hash."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return xxhash.xxh3_64_hexdigest(blob.encode("utf-8"))
