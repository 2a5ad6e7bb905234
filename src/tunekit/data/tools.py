"""Tool calls: reading tool definitions and calls, checking calls against the definitions, and the
one text form a call takes where a chat template has no tool support of its own.

A glaive / LLaMA-Factory row declares its tools as JSON text and calls them in `function_call` turns:

    {"tools": "[{\\"name\\": \\"get_rate\\", \\"parameters\\": {\\"type\\": \\"object\\", ...}}]",
     "conversations": [{"from": "human", "value": "USD to EUR?"},
                       {"from": "function_call", "value": "{\\"name\\": \\"get_rate\\", \\"arguments\\": {...}}"},
                       {"from": "observation", "value": "{\\"rate\\": 0.92}"},
                       {"from": "gpt", "value": "It is 0.92."}]}

OpenAI's chat rows use `tools` [{type: function, function: {name, description, parameters}}],
assistant `tool_calls` [{id, type: function, function: {name, arguments (JSON text)}}] and `tool`
turns. Both become `ToolCall`s on assistant messages and OpenAI-shaped definitions on `Example.tools`.

Each call is checked against the declared definitions (`check_call`): its arguments must be a JSON
object, its function declared, every `required` argument present, no argument outside `properties`
when the schema sets `additionalProperties: false`, and each argument of the JSON type (and `enum`)
its property declares. Nested schemas are not validated below the first level.

The text form (`ToolCall.block`) is Hermes' and Qwen's, which many small models already know:

    <tool_call>
    {"name": "get_rate", "arguments": {"from": "USD", "to": "EUR"}}
    </tool_call>

`parse_reply` reads calls back out of generated text in that form, or as a bare JSON object or list
of {name, arguments | parameters} (Llama 3.1's and Mistral's shapes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from tunekit.data.example import Example, ToolCall
from tunekit.data.problems import FieldError
from tunekit.data.problems import describe as _kind

# The text that tells a model without its own tool template which functions it has (Qwen 2.5's words;
# the built-in qwen template writes the same, see models/templates.py).
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _json(text: str, field: str, kind: str, fix: str) -> Any:
    """`text` parsed as JSON, or a FieldError of `kind` saying where it breaks and `fix`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FieldError(
            field, kind, f"is not valid JSON ({e.msg} at character {e.pos + 1}); {fix}"
        ) from None
    except (RecursionError, ValueError) as e:  # nested too deeply; an integer too long to convert
        raise FieldError(field, kind, f"is not valid JSON ({type(e).__name__}); {fix}") from None


# ---- definitions --------------------------------------------------------------------------------


def tool_definitions(value: Any, field: str) -> tuple[dict[str, Any], ...]:
    """`value` (a list of definitions, or that list as JSON text as glaive writes it) as OpenAI
    definitions {type: function, function: {name, description?, parameters?}}; () for none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if isinstance(value, str):
        value = _json(value, field, "invalid_tools", "write the definitions as a JSON list")
    if not isinstance(value, list):
        raise FieldError(field, "invalid_tools", f"must be a list of tool definitions, found {_kind(value)}")
    tools, names = [], set()
    for i, tool in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(tool, dict):
            raise FieldError(
                where, "invalid_tools", f"must be an object {{name, parameters}}, found {_kind(tool)}"
            )
        fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict):
            raise FieldError(
                where, "invalid_tools", f"only function tools are supported, found type {tool.get('type')!r}"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise FieldError(
                f"{where}.name", "invalid_tools", f"must be the function's name, found {_kind(name)}"
            )
        if name in names:
            raise FieldError(
                f"{where}.name", "invalid_tools", f"{name!r} is declared twice; keep one definition"
            )
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        required = params.get("required", []) if isinstance(params, dict) else None
        props = params.get("properties", {}) if isinstance(params, dict) else None
        names_ok = isinstance(required, list) and all(isinstance(r, str) for r in required)
        if not (names_ok and isinstance(props, dict)):
            raise FieldError(
                f"{where}.parameters",
                "invalid_tools",
                "must be a JSON schema object {type: object, properties, required: [names]}",
            )
        tools.append({"type": "function", "function": {k: v for k, v in fn.items() if k != "type"}})
    return tuple(tools)


def _schemas(tools: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of each declared function."""
    return {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}


# ---- calls --------------------------------------------------------------------------------------


def parse_call(value: Any, field: str) -> ToolCall:
    """One call: OpenAI's {id?, type?, function: {name, arguments}} or glaive's {name, arguments},
    the arguments a JSON object or its text."""
    if not isinstance(value, dict):
        raise FieldError(
            field, "invalid_tool_call", f"must be an object {{name, arguments}}, found {_kind(value)}"
        )
    fn, where = (value["function"], f"{field}.function") if "function" in value else (value, field)
    if not isinstance(fn, dict):
        raise FieldError(
            where, "invalid_tool_call", f"must be an object {{name, arguments}}, found {_kind(fn)}"
        )
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise FieldError(
            f"{where}.name", "invalid_tool_call", f"must be the called function's name, found {_kind(name)}"
        )
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str) and args.strip():
        args = _json(args, f"{where}.arguments", "invalid_tool_call", "write the arguments as a JSON object")
    if isinstance(args, str):  # empty text: no arguments
        args = {}
    if not isinstance(args, dict):
        raise FieldError(
            f"{where}.arguments", "invalid_tool_call", f"must be a JSON object, found {_kind(args)}"
        )
    call_id = value.get("id") or ""
    return ToolCall(name, json.dumps(args, ensure_ascii=False), str(call_id))


def parse_call_text(text: str, field: str) -> tuple[ToolCall, ...]:
    """A ShareGPT `function_call` turn's value: one call, or a list of parallel calls, as JSON text."""
    value = _json(text, field, "invalid_tool_call", 'write {"name": ..., "arguments": {...}}')
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise FieldError(field, "invalid_tool_call", "is an empty list of calls; write at least one call")
    return tuple(
        parse_call(c, f"{field}[{i}]" if isinstance(value, list) else field) for i, c in enumerate(calls)
    )


def check_call(call: ToolCall, tools: tuple[dict[str, Any], ...], field: str) -> None:
    """Raise a FieldError naming `field` when `call` does not fit the declared `tools`."""
    schemas = _schemas(tools)
    if not schemas:
        raise FieldError(
            f"{field}.name",
            "unknown_tool",
            f"calls {call.name!r} but the row declares no tools; add its definition to `tools`",
        )
    if call.name not in schemas:
        raise FieldError(
            f"{field}.name",
            "unknown_tool",
            f"calls {call.name!r}, which is not among the declared tools ({', '.join(schemas)})",
        )
    schema, args = schemas[call.name], call.args
    props = schema.get("properties") or {}
    for name in schema.get("required", []):
        if name not in args:
            raise FieldError(
                f"{field}.arguments.{name}",
                "missing_argument",
                f"{call.name} requires argument {name!r}, which this call leaves out",
            )
    for name, value in args.items():
        if name not in props:
            if schema.get("additionalProperties") is False:
                raise FieldError(
                    f"{field}.arguments.{name}",
                    "unknown_argument",
                    f"{call.name} takes no argument {name!r} (it takes: {', '.join(props) or 'none'})",
                )
            continue
        problem = _type_problem(value, props[name])
        if problem:
            raise FieldError(
                f"{field}.arguments.{name}", "wrong_argument_type", f"{call.name}.{name} {problem}"
            )


def _type_problem(value: Any, prop: Any) -> str | None:
    """What is wrong with `value` against a property's schema (its `type` and `enum`), or None."""
    if not isinstance(prop, dict):
        return None
    if "enum" in prop and isinstance(prop["enum"], list) and value not in prop["enum"]:
        return f"must be one of {prop['enum']}, found {value!r}"
    wanted = prop.get("type")
    names = [wanted] if isinstance(wanted, str) else wanted if isinstance(wanted, list) else []
    known = [n for n in names if n in _JSON_TYPES]
    if not known:
        return None
    # bool is an int in Python; JSON's true is neither a number nor an integer.
    ok = any(
        isinstance(value, _JSON_TYPES[n]) and not (isinstance(value, bool) and n != "boolean") for n in known
    )
    if not ok and "integer" in known and isinstance(value, float) and value.is_integer():
        ok = True
    return None if ok else f"must be of type {' or '.join(known)}, found {_kind(value)}"


# ---- text forms ---------------------------------------------------------------------------------


def tools_text(tools: tuple[dict[str, Any], ...]) -> str:
    """The declared tools as the fallback writes them into the system message."""
    return TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


@dataclass(frozen=True)
class ParsedCall:
    """A call read from generated text: its name and arguments, or `valid` False where its JSON
    does not parse into {name, arguments: object}."""

    name: str | None
    arguments: dict[str, Any] | None
    valid: bool


def parse_reply(text: str) -> tuple[str, list[ParsedCall]]:
    """(the text outside calls, the calls) of a generated reply: `<tool_call>` blocks (an unclosed
    last one included, as a reply cut by max_tokens leaves it), else a reply that is one bare JSON
    call or a list of them (after Mistral's `[TOOL_CALLS]` marker, if any)."""
    blocks = _CALL_BLOCK.findall(text)
    if blocks:
        rest = _CALL_BLOCK.sub("", text).strip()
        return rest, [_parsed(b) for b in blocks]
    bare = text.strip().removeprefix("[TOOL_CALLS]").strip()
    if bare[:1] in ("{", "["):
        try:
            value = json.loads(bare)
        except (ValueError, RecursionError):
            return text.strip(), []
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(v, dict) and "name" in v for v in items):
            return "", [_parsed(v) for v in items]
    return text.strip(), []


def _parsed(value: Any) -> ParsedCall:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return ParsedCall(None, None, False)
    if not isinstance(value, dict):
        return ParsedCall(None, None, False)
    name = value.get("name")
    args = value.get("arguments", value.get("parameters"))
    if isinstance(args, str):  # OpenAI's shape: arguments as JSON text
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            args = None
    if not isinstance(name, str) or not isinstance(args, dict):
        return ParsedCall(name if isinstance(name, str) else None, None, False)
    return ParsedCall(name, args, True)


def openai_reply(text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
    """(the assistant message, the finish reason) OpenAI's chat API answers for a generated reply
    to a request that declared tools: its calls as `tool_calls` (arguments as JSON text, an id
    each), the text outside them as `content` (null when empty), and finish reason "tool_calls"
    when the reply ended by itself. A reply with no call, or with a call whose JSON does not parse,
    is plain content, as generated."""
    import uuid

    content, calls = parse_reply(text)
    if not calls or not all(c.valid for c in calls):
        return {"role": "assistant", "content": text}, finish_reason
    shaped = [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for c in calls
    ]
    message = {"role": "assistant", "content": content or None, "tool_calls": shaped}
    return message, "tool_calls" if finish_reason == "stop" else finish_reason


def with_call_points(examples: list[Example]) -> list[Example]:
    """`examples`, each followed by one example per call it makes before its last turn: the
    conversation up to and including that call (what a model must answer at that point). Evaluation
    scores the last assistant turn of each example, so without these a glaive-style conversation
    (question, call, result, answer) would never score its call."""
    out = []
    for ex in examples:
        out.append(ex)
        for i, m in enumerate(ex.messages[:-1]):
            if m.role == "assistant" and m.tool_calls and m.weight:
                out.append(replace(ex, messages=ex.messages[: i + 1]))
    return out
