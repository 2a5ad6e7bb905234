"""Detect a data file's format and normalize each of its records into an `Example`.

Each format is a plain function in `FORMATS` that turns one record into an `Example` (or raises
`FieldError` naming the field, the kind of problem and the fix); `FORMAT_KEYS` holds the keys that
identify each, in detection order:

    sharegpt_preference  {"conversations": [{"from": "human", "value": "2+2?"}],
                          "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}
    preference           {"prompt": "2+2?", "chosen": "4", "rejected": "5"}   (or TRL's message lists)
    openai_dpo           {"input": {"messages": [{"role": "user", "content": "2+2?"}]},
                          "preferred_output": [{"role": "assistant", "content": "4"}],
                          "non_preferred_output": [{"role": "assistant", "content": "5"}]}
    anthropic_hh         {"chosen": "\\n\\nHuman: 2+2?\\n\\nAssistant: 4",
                          "rejected": "\\n\\nHuman: 2+2?\\n\\nAssistant: 5"}
    kto                  {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                          "label": true}   (or {"prompt": "2+2?", "completion": "5", "label": false}, TRL's form)
    sharegpt             {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
                         (plus "tools" and function_call / observation turns, as glaive and LLaMA-Factory)
    chat                 {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
                         (plus "rejected": [{"role": "assistant", ...}] in tunekit's canonical pair form;
                         "tools", assistant "tool_calls", "tool" turns and "reasoning_content" as OpenAI's)
    prompt_completion    {"prompt": "2+2=", "completion": "4"}
    alpaca               {"instruction": "Add the numbers.", "input": "2, 2", "output": "4"}
    classification       {"text": "Where is my card?", "label": "card_arrival"}
    text                 {"text": "table: ...\\nQ: ...\\nA: SELECT ..."}

Preference formats give an `Example` whose `messages` are the prompt plus the chosen answer and whose
`rejected` holds the rejected answer; `kto` gives one answer with `desirable` set. A new format is one
function added to `FORMATS` (and its keys to `FORMAT_KEYS` to be auto-detected).

Problem kinds raised here: missing_field, wrong_type, empty_content, unknown_role, no_target,
ends_not_assistant, consecutive_roles, invalid_weight, prompt_mismatch, bad_label, format_mismatch,
unsupported_field, invalid_utf8 (bad_label also for a kto label that is not true/false); for tool use
(data/tools.py) invalid_tools, invalid_tool_call, unknown_tool, missing_argument, unknown_argument,
wrong_argument_type, orphan_tool_result; for reasoning (data/reasoning.py) unclosed_thinking,
duplicate_reasoning; and one
warning, unused_key: a key the format does not read (e.g. `system` on a prompt_completion row), whose
value would otherwise vanish without a word.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tunekit.data import tools as tool_calls
from tunekit.data.example import ROLES, Example, Message
from tunekit.data.problems import FieldError, Problem
from tunekit.data.problems import describe as _kind
from tunekit.data.readers import Record, read_records
from tunekit.data.reasoning import split_thinking
from tunekit.errors import DataError, TunekitError

DETECT_SAMPLE = 100  # a file's format is the most common one among its first records


# ---- chat ---------------------------------------------------------------------------------------

_MESSAGES = "a non-empty list of {role, content} objects"
_STRING_OR_MESSAGES = "a non-empty string, or " + _MESSAGES


def chat(record: dict[str, Any]) -> Example:
    """OpenAI chat: `messages` of {role, content, weight?}, ending with an assistant turn; `label` kept.
    Tool use as OpenAI writes it: `tools`, assistant `tool_calls`, `tool` turns (checked against the
    tools); reasoning as `reasoning_content` or a `<think>` block."""
    turns = _message_list(record["messages"], "messages")
    _check_conversation(turns, [f"messages[{i}].role" for i in range(len(turns))], "messages")
    tools = _tools(record, "tools", "functions")
    _check_calls(turns, tools, lambda i, j, n: f"messages[{i}].tool_calls[{j}].function")
    label = record.get("label")
    # `rejected`: the canonical form of a preference pair, as run directories store their splits.
    rejected = tuple(_message_list(record["rejected"], "rejected")) if "rejected" in record else None
    # `desirable`: the canonical form of a KTO row (see `kto`), as run directories store their splits.
    desirable = _desirable(record["desirable"], "desirable") if "desirable" in record else None
    return Example(
        messages=tuple(turns),
        label=None if label is None else _label(label, "label"),
        rejected=rejected,
        desirable=desirable,
        tools=tools,
    )


def chat_prompt(messages: Any, tools: Any = None) -> tuple[list[Message], tuple[dict[str, Any], ...]]:
    """The turns and declared tools of an OpenAI chat prompt (a request, before its answer), read
    and checked by the rules of `chat`; a FieldError names the wrong field."""
    turns = _message_list(messages, "messages")
    declared = _tools({"tools": tools}, "tools")
    _check_calls(turns, declared, lambda i, j, n: f"messages[{i}].tool_calls[{j}].function")
    return turns, declared


def _message_list(value: Any, field: str, expected: str = _MESSAGES) -> list[Message]:
    if not isinstance(value, list) or not value:
        kind = "empty_content" if isinstance(value, list) else "wrong_type"
        raise FieldError(field, kind, f"must be {expected}, found {_kind(value)}")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _message(m: Any, field: str) -> Message:
    if not isinstance(m, dict):
        raise FieldError(field, "wrong_type", f"must be an object {{role, content}}, found {_kind(m)}")
    role = _required(m, "role", field)
    if role not in ROLES:
        raise FieldError(
            f"{field}.role", "unknown_role", f"unknown role {role!r}; use one of {', '.join(ROLES)}"
        )
    if role != "assistant" and "weight" in m:
        raise FieldError(
            f"{field}.weight",
            "invalid_weight",
            f"only assistant messages take a weight; remove it from this {role} message",
        )
    if role == "tool":
        return Message(
            "tool",
            _tool_result(_required(m, "content", field), f"{field}.content"),
            tool_call_id=_optional_text(m, "tool_call_id", field),
            name=_optional_text(m, "name", field),
        )
    calls: tuple = ()
    if role != "assistant" and m.get("tool_calls"):
        raise FieldError(
            f"{field}.tool_calls", "invalid_tool_call", f"only assistant turns call tools, not {role} turns"
        )
    if m.get("tool_calls"):
        value = m["tool_calls"]
        if not isinstance(value, list):
            raise FieldError(
                f"{field}.tool_calls", "invalid_tool_call", f"must be a list of calls, found {_kind(value)}"
            )
        calls = tuple(tool_calls.parse_call(c, f"{field}.tool_calls[{j}]") for j, c in enumerate(value))
    if calls and m.get("content") in (None, ""):  # OpenAI: a turn that only calls has no content
        content, reasoning = "", _optional_text(m, "reasoning_content", field)
    elif role == "assistant":
        content, reasoning = _answer(_required(m, "content", field), m, field)
    else:
        content, reasoning = _text(_required(m, "content", field), f"{field}.content"), ""
    message = Message(role, content, tool_calls=calls, reasoning=reasoning)
    if reasoning and "reasoning_weight" in m:  # the canonical form of data.reasoning: mask
        message = replace(
            message, reasoning_weight=_weight(m["reasoning_weight"], f"{field}.reasoning_weight")
        )
    if "weight" not in m:
        return message
    return replace(message, weight=_weight(m["weight"], f"{field}.weight"))


def _weight(weight: Any, field: str) -> int:
    # bool is an int in Python; `true` is not a weight.
    if isinstance(weight, bool) or weight not in (0, 1):
        raise FieldError(field, "invalid_weight", f"must be 0 (no loss on this turn) or 1, found {weight!r}")
    return int(weight)


def _answer(value: Any, m: dict[str, Any], field: str, key: str = "content") -> tuple[str, str]:
    """(content, reasoning) of an assistant turn whose text is `value` (at `field`.`key`):
    `reasoning_content`, or a `<think>` block taken out of the text (data/reasoning.py); both at
    once is an error."""
    reasoning, content = split_thinking(_text(value, f"{field}.{key}"), f"{field}.{key}")
    given = _optional_text(m, "reasoning_content", field)
    if reasoning and given:
        raise FieldError(
            f"{field}.reasoning_content",
            "duplicate_reasoning",
            "the content opens with a <think> block too; give the reasoning once, in one of the two",
        )
    if reasoning and not content:
        raise FieldError(f"{field}.{key}", "empty_content", "holds reasoning but no answer after </think>")
    return content, reasoning or given


def _tool_result(value: Any, field: str) -> str:
    """A tool turn's content: any string (a function may return nothing), or JSON kept as its text."""
    if isinstance(value, (dict, list)):
        import json

        return json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str):
        raise FieldError(field, "wrong_type", f"must be the tool's output as a string, found {_kind(value)}")
    return _unicode(value, field)


def _check_conversation(
    turns: Sequence[Message], fields: Sequence[str], whole: str, names: Sequence[str] | None = None
) -> None:
    """A trainable conversation: no role twice in a row, an assistant turn last, and one that carries loss.

    `fields[i]` names turn i's role field in the record, `whole` the field of the whole list, and
    `names[i]` the role as the file spells it (ShareGPT's "human" for user), for the messages.
    """
    names = names or [m.role for m in turns]
    for i in range(len(turns)):
        if turns[i].role == "tool" and not (i and (turns[i - 1].role == "tool" or turns[i - 1].tool_calls)):
            after = f"after a {names[i - 1]!r} turn that calls no tool" if i else "with no call before it"
            raise FieldError(
                fields[i],
                "orphan_tool_result",
                f"a tool result {after}; a tool result follows the assistant turn whose call it answers",
            )
        if i and turns[i].role == turns[i - 1].role and turns[i].role != "tool":  # parallel calls' results
            # Chat templates (Llama 2, Mistral, Gemma, ...) refuse such conversations, and in the rest
            # the second turn reads as if nobody answered the first.
            raise FieldError(
                fields[i],
                "consecutive_roles",
                f"a second {turns[i].role} turn in a row (after {fields[i - 1]}); merge the two, "
                "or add the missing turn between them",
            )
    if not any(m.role == "assistant" for m in turns):
        raise FieldError(
            whole, "no_target", "has no assistant turn, so there is nothing to learn; add the answer"
        )
    if turns[-1].role != "assistant":
        raise FieldError(
            fields[-1],
            "ends_not_assistant",
            f"the last message must be the assistant's answer, found {names[-1]!r}",
        )
    if not any(m.role == "assistant" and m.weight == 1 for m in turns):
        raise FieldError(
            whole, "no_target", "every assistant message has weight 0, so nothing is learned; set one to 1"
        )


def _tools(record: dict[str, Any], *keys: str) -> tuple[dict[str, Any], ...]:
    """The row's tool definitions, from the first of `keys` it has (OpenAI's `tools`, or the older
    `functions`)."""
    for key in keys:
        found = tool_calls.tool_definitions(record.get(key), key)
        if found:
            return found
    return ()


def _check_calls(turns: Sequence[Message], tools, call_field: Callable[[int, int, int], str]) -> None:
    """Every call of every turn fits the declared tools; `call_field(i, j, n)` names call j of the
    n calls of turn i, for the error."""
    for i, m in enumerate(turns):
        for j, call in enumerate(m.tool_calls):
            tool_calls.check_call(call, tools, call_field(i, j, len(m.tool_calls)))


def _no_tools(
    record: dict[str, Any], prefix: str = "", turns: Sequence[Message] = (), where: str = "messages"
) -> None:
    """Preference and feedback rows with tool use are not supported yet. Dropping the tools would be
    wrong, not just lossy: the answers may rely on them (calling a tool, or declining what no tool
    can do), so the row is an error. `where` is the field holding `turns`."""
    for i, m in enumerate(turns):
        if m.role == "tool" or m.tool_calls:
            raise FieldError(
                prefix + where,
                "unsupported_field",
                f"turn {i + 1} is a tool {'call' if m.tool_calls else 'result'}: tool use in preference "
                "or feedback data is not supported yet (sft data takes it: chat or sharegpt rows); "
                "remove the row",
            )
    for key in ("tools", "functions"):
        value = record.get(key)
        if not value or (isinstance(value, str) and value.strip() in ("", "[]")):  # none, or "[]"
            continue
        raise FieldError(
            prefix + key,
            "unsupported_field",
            "tool definitions in preference or feedback data are not supported yet, and the answers "
            "in this row may rely on them; remove the row (or the tools, if no answer depends on them)",
        )


# ---- ShareGPT -----------------------------------------------------------------------------------

# ShareGPT's `from` values (LLaMA-Factory and FastChat spellings) and the role each becomes.
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
# LLaMA-Factory's tool-use turns: a call (an assistant turn with tool_calls) and a tool's result.
_CALL_ROLES = ("function_call",)
_RESULT_ROLES = ("observation", "tool", "function")


def sharegpt(record: dict[str, Any]) -> Example:
    """ShareGPT: `conversations` of {from, value} (human/gpt/system), optional top-level `system`;
    tool use as LLaMA-Factory writes it: `tools` (JSON text), function_call and observation turns."""
    turns, fields, names = _sharegpt_turns(record, "conversations")
    _check_conversation(turns, fields, "conversations", names)
    tools = _tools(record, "tools", "functions")

    def call_field(i: int, j: int, n: int) -> str:
        value = fields[i].removesuffix(".from") + ".value"
        return f"{value}[{j}]" if n > 1 else value

    _check_calls(turns, tools, call_field)
    return Example(messages=tuple(turns), tools=tools)


def _sharegpt_turns(record: dict[str, Any], key: str) -> tuple[list[Message], list[str], list[str]]:
    """The turns of `record[key]` (after the top-level `system`, if any), their fields and spelled roles."""
    value = record[key]
    if not isinstance(value, list) or not value:
        kind = "empty_content" if isinstance(value, list) else "wrong_type"
        raise FieldError(
            key, kind, f"must be a non-empty list of {{from, value}} objects, found {_kind(value)}"
        )
    turns: list[Message] = []
    fields: list[str] = []
    names: list[str] = []
    system = _optional_text(record, "system")
    if system.strip():
        turns, fields, names = [Message("system", system)], ["system"], ["system"]
    for i, turn in enumerate(value):
        message, name = _sharegpt_turn(turn, f"{key}[{i}]")
        turns.append(message)
        fields.append(f"{key}[{i}].from")
        names.append(name)
    return turns, fields, names


def _sharegpt_turn(turn: Any, field: str) -> tuple[Message, str]:
    if not isinstance(turn, dict):
        raise FieldError(field, "wrong_type", f"must be an object {{from, value}}, found {_kind(turn)}")
    name = _required(turn, "from", field)
    if not isinstance(name, str):
        raise FieldError(f"{field}.from", "wrong_type", f"must be a string, found {_kind(name)}")
    value = _required(turn, "value", field)
    if name in _CALL_ROLES:
        calls = tool_calls.parse_call_text(_text(value, f"{field}.value"), f"{field}.value")
        return Message("assistant", "", tool_calls=calls), name
    if name in _RESULT_ROLES:
        return Message("tool", _tool_result(value, f"{field}.value")), name
    if name not in SHAREGPT_ROLES:
        raise FieldError(
            f"{field}.from",
            "unknown_role",
            f"unknown role {name!r}; use one of human/user, gpt/assistant/model, system, "
            "function_call, observation",
        )
    role = SHAREGPT_ROLES[name]
    if role == "assistant":
        content, reasoning = _answer(value, {}, field, "value")
        return Message("assistant", content, reasoning=reasoning), name
    return Message(role, _text(value, f"{field}.value")), name  # type: ignore[arg-type]  # a Role by construction


def sharegpt_preference(record: dict[str, Any]) -> Example:
    """LLaMA-Factory preference pairs: `conversations` (the prompt, ending on a human turn), and
    `chosen` and `rejected`, each one {from: "gpt", value} answer."""
    prompt, fields, names = _sharegpt_turns(record, "conversations")
    answers = []
    for key in ("chosen", "rejected"):
        answer, name = _sharegpt_turn(record[key], key)
        if answer.role != "assistant":
            raise FieldError(
                f"{key}.from",
                "unknown_role",
                f"must be the assistant's answer (gpt, assistant or model), found {name!r}",
            )
        _check_conversation([*prompt, answer], [*fields, f"{key}.from"], key, [*names, name])
        answers.append(answer)
    _no_tools(record, turns=[*prompt, *answers], where="conversations")
    return Example(messages=(*prompt, answers[0]), rejected=(answers[1],))


# ---- preference (TRL) ---------------------------------------------------------------------------


def preference(record: dict[str, Any]) -> Example:
    """TRL preference pairs: `prompt`, `chosen`, `rejected`, as strings or as message lists.

    String form: the prompt is one user turn, chosen and rejected one assistant turn each. Message
    form (TRL "conversational"): `prompt` is a list of messages (or a string) and `chosen`/`rejected`
    lists of messages holding the answer, or the whole conversation (the prompt's turns, then the answer).
    """
    prompt, fields = _preference_prompt(record["prompt"])
    answers = []
    for key in ("chosen", "rejected"):
        answer, answer_fields = _preference_answer(record[key], key, prompt)
        _check_conversation([*prompt, *answer], [*fields, *answer_fields], key)
        answers.append(answer)
    _no_tools({}, turns=[*prompt, *answers[0], *answers[1]], where="prompt")
    return Example(messages=(*prompt, *answers[0]), rejected=tuple(answers[1]))


def _preference_prompt(value: Any) -> tuple[list[Message], list[str]]:
    """TRL's `prompt`: a string (one user turn) or a list of messages; and the role field of each turn."""
    if isinstance(value, str):
        return [Message("user", _text(value, "prompt"))], ["prompt"]
    prompt = _message_list(value, "prompt", _STRING_OR_MESSAGES)
    return prompt, [f"prompt[{i}].role" for i in range(len(prompt))]


def _preference_answer(value: Any, key: str, prompt: list[Message]) -> tuple[list[Message], list[str]]:
    """The answer turns of `chosen` or `rejected` and their fields, without a copy of the prompt."""
    if isinstance(value, str):
        return [Message("assistant", _text(value, key))], [key]
    turns = _message_list(value, key, _STRING_OR_MESSAGES)
    start = 0
    if any(m.role != "assistant" for m in turns):  # the whole conversation: it must repeat the prompt
        for i, (got, want) in enumerate(zip(turns, prompt, strict=False)):
            if (got.role, got.content) != (want.role, want.content):
                raise FieldError(
                    f"{key}[{i}]",
                    "prompt_mismatch",
                    f"{key} repeats the prompt's turns, but turn {i} differs: "
                    f"{_difference(want, got, 'the prompt')}; {key} must hold the answer alone, "
                    "or the prompt's turns unchanged and then the answer",
                )
        start = len(prompt)
        if len(turns) <= start:
            raise FieldError(key, "no_target", "holds only the prompt's turns; add the assistant's answer")
    return turns[start:], [f"{key}[{i}].role" for i in range(start, len(turns))]


def _difference(want: Message, got: Message, other: str, names: Mapping[str, str] | None = None) -> str:
    """How turn `got` differs from `want`, the same turn in `other`: its role, or where its text does."""
    name = (names or {}).get
    if got.role != want.role:
        return (
            f"it is a {name(got.role, got.role)} turn where {other} has a {name(want.role, want.role)} turn"
        )
    at = len(os.path.commonprefix([want.content, got.content]))
    return (
        f"from character {at + 1} its text reads {_snippet(got.content, at)} where {other} has "
        f"{_snippet(want.content, at)}"
    )


# ---- OpenAI preference fine-tuning (DPO) --------------------------------------------------------


def openai_dpo(record: dict[str, Any]) -> Example:
    """OpenAI's preference fine-tuning rows: `input` {messages, tools?, parallel_tool_calls?} (the
    prompt), and `preferred_output` and `non_preferred_output`, each a list of assistant messages
    (the answer). The same pair as `preference`; tool definitions are refused as in `chat`."""
    source = record["input"]
    if not isinstance(source, dict):
        raise FieldError(
            "input", "wrong_type", f"must be an object {{messages, tools?}}, found {_kind(source)}"
        )
    prompt = _message_list(_required(source, "messages", "input"), "input.messages")
    fields = [f"input.messages[{i}].role" for i in range(len(prompt))]
    answers = []
    for key in ("preferred_output", "non_preferred_output"):
        answer = _message_list(record[key], key)
        for i, m in enumerate(answer):
            if m.role != "assistant":
                raise FieldError(
                    f"{key}[{i}].role",
                    "unknown_role",
                    f"must be the assistant's answer (role assistant), found {m.role!r}; the prompt's "
                    "turns go in input.messages",
                )
        answer_fields = [f"{key}[{i}].role" for i in range(len(answer))]
        _check_conversation([*prompt, *answer], [*fields, *answer_fields], key)
        answers.append(answer)
    _no_tools(source, "input.", [*prompt, *answers[0], *answers[1]])
    return Example(messages=(*prompt, *answers[0]), rejected=tuple(answers[1]))


# ---- KTO: unpaired preference feedback ----------------------------------------------------------

_KTO_SHAPES = (
    "messages (a conversation ending with the rated answer), conversations (ShareGPT), or prompt "
    "and completion"
)


def kto(record: dict[str, Any]) -> Example:
    """Unpaired preference feedback (KTO): one answer and a thumbs-up or thumbs-down `label` (true:
    desirable, false: undesirable). The conversation is LLaMA-Factory's `messages` (kto_en_demo) or
    ShareGPT `conversations`, or TRL's unpaired preference `prompt` and `completion` (strings or
    message lists); the rated answer is the assistant turns after the last user turn."""
    desirable = _desirable(record["label"], "label")
    shapes = [k for k in ("messages", "conversations", "prompt") if k in record]
    if len(shapes) != 1:
        found = ", ".join(record)
        if not shapes:
            raise FieldError(
                "messages", "missing_field", f"missing; kto rows hold {_KTO_SHAPES} (found: {found})"
            )
        raise FieldError(
            shapes[1],
            "format_mismatch",
            f"a kto row holds one of {_KTO_SHAPES}; this one has {shapes[0]} too",
        )
    if shapes == ["messages"]:
        turns = _message_list(record["messages"], "messages")
        _check_conversation(turns, [f"messages[{i}].role" for i in range(len(turns))], "messages")
    elif shapes == ["conversations"]:
        turns, fields, names = _sharegpt_turns(record, "conversations")
        _check_conversation(turns, fields, "conversations", names)
    else:
        prompt, fields = _preference_prompt(record["prompt"])
        if "completion" not in record:
            raise FieldError(
                "completion",
                "missing_field",
                f"missing; the answer the label rates (found: {', '.join(record)})",
            )
        answer, answer_fields = _preference_answer(record["completion"], "completion", prompt)
        turns = [*prompt, *answer]
        _check_conversation(turns, [*fields, *answer_fields], "completion")
    _no_tools(record, turns=turns, where=shapes[0])
    return Example(messages=tuple(turns), desirable=desirable)


def _desirable(value: Any, field: str) -> bool:
    """A KTO label: a JSON boolean, or the text true/false (a CSV cell has no booleans)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise FieldError(
        field,
        "bad_label",
        f"must be true (a desirable answer) or false (an undesirable one), found {_kind(value)}",
    )


def _is_kto(record: dict[str, Any]) -> bool:
    """A boolean `label` on a conversation is KTO feedback; any other label is a class (chat)."""
    return isinstance(record.get("label"), bool) and any(
        k in record for k in ("messages", "conversations", "prompt")
    )


# ---- Anthropic HH-RLHF --------------------------------------------------------------------------

# A transcript is "\n\nHuman: ...\n\nAssistant: ..." turns; an empty last answer may lack the space.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_NAMES = {role: name for name, role in _HH_ROLES.items()}


def anthropic_hh(record: dict[str, Any]) -> Example:
    """Anthropic HH-RLHF: `chosen` and `rejected` whole transcripts that differ only in the last answer.

    The prompt is every turn before the last Assistant turn; both transcripts must share it.
    """
    chosen = _hh_turns(record["chosen"], "chosen")
    rejected = _hh_turns(record["rejected"], "rejected")
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False)):
        if a != b:
            raise FieldError(
                "rejected",
                "prompt_mismatch",
                f"turn {i + 1}, before the last Assistant turn, differs from chosen's: "
                f"{_difference(a, b, 'chosen', _HH_NAMES)}; both transcripts must share every turn "
                "before their last Assistant turn (the prompt)",
            )
    if len(chosen) != len(rejected):
        raise FieldError(
            "rejected",
            "prompt_mismatch",
            f"has {_turns(len(rejected) - 1)} before its last Assistant turn where chosen has "
            f"{_turns(len(chosen) - 1)}; both transcripts must share every turn before their last "
            "Assistant turn (the prompt)",
        )
    return Example(messages=tuple(chosen), rejected=(rejected[-1],))


def _hh_turns(value: Any, field: str) -> list[Message]:
    transcript = _text(value, field)
    # With a capturing group, split gives [before the first marker, role, content, role, content, ...].
    parts = _HH_TURN.split("\n\n" + transcript.lstrip())
    if len(parts) == 1 or parts[0].strip():
        raise FieldError(
            field,
            "format_mismatch",
            "must be a transcript of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns, starting with one, "
            f"found {_snippet(transcript, 0)}",
        )
    names, contents = parts[1::2], parts[2::2]
    for i, (name, content) in enumerate(zip(names, contents, strict=True)):
        if not content.strip():
            raise FieldError(field, "empty_content", f"turn {i + 1} ({name}) is empty; write its text")
        if i and name == names[i - 1]:
            raise FieldError(
                field,
                "consecutive_roles",
                f"turns {i} and {i + 1} are both {name} turns; merge them, "
                "or add the missing turn between them",
            )
    if "Assistant" not in names:
        raise FieldError(field, "no_target", "has no Assistant turn, so there is nothing to learn")
    if names[-1] != "Assistant":
        raise FieldError(
            field,
            "ends_not_assistant",
            f"must end with the Assistant's answer, but its last turn is {names[-1]}",
        )
    return [Message(_HH_ROLES[n], c) for n, c in zip(names, contents, strict=True)]  # type: ignore[arg-type]


def _turns(n: int) -> str:
    return f"{n} turn" if n == 1 else f"{n} turns"


def _snippet(s: str, at: int) -> str:
    part = s[at : at + 30]
    return repr(part + "...") if len(s) > at + 30 else repr(part) if part else "the end"


# ---- single-turn formats ------------------------------------------------------------------------


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
        raise FieldError(
            "history", "wrong_type", f"must be a list of [user, assistant] pairs, found {_kind(history)}"
        )
    messages = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise FieldError(
                f"history[{i}]",
                "wrong_type",
                f"must be a [user, assistant] pair of strings, found {_kind(pair)}",
            )
        messages.append(Message("user", _text(pair[0], f"history[{i}][0]")))
        messages.append(Message("assistant", _text(pair[1], f"history[{i}][1]")))
    return messages


def classification(record: dict[str, Any]) -> Example:
    """`text` and `label` (string or integer): the user says the text, the assistant answers the label."""
    said = _text(record["text"], "text")
    label = _label(record["label"], "label")
    return Example(messages=(Message("user", said), Message("assistant", label)), label=label)


def text(record: dict[str, Any]) -> Example:
    """`text` alone: raw text for continued pretraining. There is no prompt; the whole text is the
    target, held as one assistant turn (so every token of it carries loss)."""
    return Example(messages=(Message("assistant", _text(record["text"], "text")),))


FORMATS: dict[str, Callable[[dict[str, Any]], Example]] = {
    "chat": chat,
    "prompt_completion": prompt_completion,
    "alpaca": alpaca,
    "classification": classification,
    "text": text,
    "sharegpt": sharegpt,
    "preference": preference,
    "anthropic_hh": anthropic_hh,
    "sharegpt_preference": sharegpt_preference,
    "openai_dpo": openai_dpo,
    "kto": kto,
}

# Detection order matters: the first format whose keys a record has wins, so a format whose keys
# hold another's comes first. Preference pairs before the rest ({conversations, chosen, rejected} is
# not plain ShareGPT, {prompt, chosen, rejected} not prompt_completion); a conversation with a boolean
# `label` is KTO feedback (`DETECT_WHEN`), with any other label chat, not classification; `text` and
# `label` is classification, `text` alone raw text.
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "sharegpt_preference": ("conversations", "chosen", "rejected"),
    "preference": ("prompt", "chosen", "rejected"),
    "openai_dpo": ("input", "preferred_output", "non_preferred_output"),
    "anthropic_hh": ("chosen", "rejected"),
    "kto": ("label",),
    "sharegpt": ("conversations",),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "classification": ("text", "label"),
    "text": ("text",),
}

# A format detected by its values too: its keys are not enough (kto's `label` is also a class's).
DETECT_WHEN: dict[str, Callable[[dict[str, Any]], bool]] = {"kto": _is_kto}


# The keys each format reads besides its `FORMAT_KEYS`; any other key of a row is reported (unused_key).
OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("label", "rejected", "desirable", "tools", "functions"),
    "kto": ("messages", "conversations", "prompt", "completion", "system", "tools", "functions"),
    "sharegpt": ("system", "tools", "functions"),
    "sharegpt_preference": ("system", "tools", "functions"),
    "alpaca": ("input", "system", "history"),
}
# The keys read inside each message of a list field, by format: other keys (a chat message's `name`,
# a ShareGPT turn's `weight`) are reported too.
_MESSAGE_KEYS = {
    "role",
    "content",
    "weight",
    "tool_calls",
    "tool_call_id",
    "name",
    "reasoning_content",
    "reasoning_weight",
}
_TURN_KEYS = {"from", "value"}
# Message keys read only on turns of these roles (a user message's `name` is not read).
_ROLE_KEYS: dict[str, tuple[str, ...]] = {
    "tool_calls": ("assistant",),
    "reasoning_content": ("assistant",),
    "reasoning_weight": ("assistant",),
    "tool_call_id": ("tool",),
    "name": ("tool",),
}
_MESSAGE_FIELDS: dict[str, tuple[tuple[str, set[str]], ...]] = {
    "chat": (("messages", _MESSAGE_KEYS), ("rejected", _MESSAGE_KEYS)),
    "preference": (("prompt", _MESSAGE_KEYS), ("chosen", _MESSAGE_KEYS), ("rejected", _MESSAGE_KEYS)),
    "sharegpt": (("conversations", _TURN_KEYS),),
    "sharegpt_preference": (("conversations", _TURN_KEYS), ("chosen", _TURN_KEYS), ("rejected", _TURN_KEYS)),
    "openai_dpo": (
        ("input", {"messages", "tools", "parallel_tool_calls"}),
        ("input.messages", _MESSAGE_KEYS),
        ("preferred_output", _MESSAGE_KEYS),
        ("non_preferred_output", _MESSAGE_KEYS),
    ),
    "kto": (
        ("messages", _MESSAGE_KEYS),
        ("conversations", _TURN_KEYS),
        ("prompt", _MESSAGE_KEYS),
        ("completion", _MESSAGE_KEYS),
    ),
}


def unused_keys(fmt: str, record: dict[str, Any]) -> list[str]:
    """The fields of `record` that format `fmt` does not read, e.g. ["system", "messages[0].name"]."""
    used = set(FORMAT_KEYS.get(fmt, ())) | set(OPTIONAL_KEYS.get(fmt, ()))
    found = [key for key in record if key not in used]
    for key, keys in _MESSAGE_FIELDS.get(fmt, ()):
        value: Any = record
        for part in key.split("."):  # "input.messages": record["input"]["messages"]
            value = value.get(part) if isinstance(value, dict) else None
        items = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
        for i, m in enumerate(items):
            if isinstance(m, dict):
                where = key if isinstance(value, dict) else f"{key}[{i}]"
                role = m.get("role")
                found += [
                    f"{where}.{k}" for k in m if k not in keys or role not in _ROLE_KEYS.get(k, (role,))
                ]
    return found


class UnusedKeys:
    """Collects unused keys over a file's rows: one warning a key (its index made `[*]`), at the
    first line that has it, with how many rows have it, so a column on every row is one line."""

    def __init__(self, where: str, fmt: str):
        self.where, self.fmt = where, fmt
        self.seen: dict[str, list[int]] = {}  # key -> [first line, rows]

    def add(self, line: int, record: dict[str, Any]) -> list[str]:
        """Count `record`'s unused keys; returns those seen for the first time."""
        new = []
        for key in dict.fromkeys(re.sub(r"\[\d+\]", "[*]", k) for k in unused_keys(self.fmt, record)):
            if key in self.seen:
                self.seen[key][1] += 1
            else:
                self.seen[key] = [line, 1]
                new.append(key)
        return new

    def problem(self, key: str) -> Problem:
        line, rows = self.seen[key]
        more = f" (and in {rows - 1} more rows)" if rows > 1 else ""
        msg = (
            f"the {self.fmt} format does not use this key{more}, so its value is ignored; remove it, or "
            "rename it to a key the format reads (data.columns / --column)"
        )
        return Problem(self.where, line, key, "unused_key", msg, "warning")

    def problems(self) -> list[Problem]:
        return [self.problem(key) for key in self.seen]


# ---- field helpers ------------------------------------------------------------------------------


def _required(obj: dict[str, Any], key: str, field: str) -> Any:
    if key not in obj:
        found = ", ".join(obj) or "none"
        raise FieldError(f"{field}.{key}", "missing_field", f"missing (found keys: {found})")
    return obj[key]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise FieldError(field, "wrong_type", f"must be a non-empty string, found {_kind(value)}")
    if not value.strip():
        raise FieldError(field, "empty_content", f"must be a non-empty string, found {_kind(value)}")
    return _unicode(value, field)


def _optional_text(record: dict[str, Any], key: str, within: str = "") -> str:
    """`record[key]` as text, "" when absent; `within` is the field holding `record`, for errors."""
    field = f"{within}.{key}" if within else key
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FieldError(field, "wrong_type", f"must be a string when present, found {_kind(value)}")
    return _unicode(value, field)


def _unicode(value: str, field: str) -> str:
    """`value`, if it can be saved as UTF-8. A JSON escape such as "\\ud83d" without its pair decodes to
    a lone surrogate, which would fail only later, when the examples are written or tokenized."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(
            field,
            "invalid_utf8",
            f"holds a lone surrogate \\u{ord(value[e.start]):04x} at character {e.start + 1} (a broken "
            "\\u escape), which is not valid Unicode; fix the escape or remove it",
        ) from None
    return value


def _label(value: Any, field: str) -> str:
    # bool is an int in Python; spell it as JSON does so `true` stays `true`.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise FieldError(
            field, "bad_label", f"must be a non-empty string or an integer, found {_kind(value)}"
        )
    return _unicode(value, field)


# ---- detection and loading ----------------------------------------------------------------------


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys identify (the first in `FORMAT_KEYS` whose keys it has, and whose
    `DETECT_WHEN` rule, if any, holds), or None."""
    for name, keys in FORMAT_KEYS.items():
        if all(k in record for k in keys) and DETECT_WHEN.get(name, lambda r: True)(record):
            return name
    return None


def read_examples(
    path: str | Path, format: str = "auto", columns: Mapping[str, str] | None = None
) -> tuple[list[Example], list[Problem]]:
    """Read a file's examples and every problem found (unreadable rows and rows that do not normalize).

    `format` is "auto" or a name in `FORMATS`; `columns` maps canonical names to the file's own, e.g.
    {"label": "category"}, and is applied to every record before detection. Problems are sorted by
    line; those of severity "warning" (duplicate_key, unused_key) are about rows that are kept, the
    others each reject a row. Raises `TunekitError` (or its `DataError`) for what concerns the whole
    file: it cannot be read, no known format is detected, or a `columns` name is in no record.
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
    unused = UnusedKeys(where, fmt)
    for (line, record), (_, raw) in zip(renamed, records, strict=True):
        try:
            examples.append(replace(_normalize(fmt, record), source=where, line=line, format=fmt, raw=raw))
        except FieldError as e:
            problems.append(Problem(where, line, e.field, e.kind, e.message))
        else:
            unused.add(line, record)  # of kept rows only: a rejected row's error lists its keys
    return examples, sorted(problems + unused.problems(), key=lambda p: p.line)


def load_examples(
    path: str | Path, format: str = "auto", columns: Mapping[str, str] | None = None
) -> list[Example]:
    """Like `read_examples`, but raise `DataError` listing every error (warnings are let pass), or if
    there are no examples."""
    examples, problems = read_examples(path, format, columns)
    problems = [p for p in problems if p.severity == "error"]
    if problems:
        raise DataError(
            [str(p) for p in problems], header=f"{path}: {len(examples)} rows read, rows with errors"
        )
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
        # A row whose keys are another format's (and not just some of this one's) is in the wrong file.
        other = detect_format(record)
        kind = "format_mismatch" if other and not set(FORMAT_KEYS[other]) <= set(keys) else "missing_field"
        raise FieldError(
            missing[0], kind, f"missing; {fmt} rows need keys {', '.join(keys)} (found: {found})"
        )
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
