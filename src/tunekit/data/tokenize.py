"""Examples to token ids through the model's own chat template, with loss only on assistant turns.

The template is rendered once for the whole conversation; an assistant turn's span is found by
rendering the conversation up to that turn with and without the turn itself. Everything the
template appends after an assistant's content (for ChatML, `<|im_end|>\n`) belongs to the turn, so
the model learns to stop. Tokens outside those spans get label -100 (no loss).

For SmolLM2's ChatML template, [user "2+2?", assistant "4"] renders as

    <|im_start|>system\nYou are a helpful AI assistant ...<|im_end|>\n   <- no loss
    <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n           <- no loss
    4<|im_end|>\n                                                         <- loss

Tool use (`conversation`): a template that renders tools itself (it shows the declared tools, an
assistant turn's `tool_calls` and a `tool` turn's result when given them, which `supports_tools`
tries once per template) gets them in transformers' shape, `apply_chat_template(..., tools=...)`.
Any other template gets the fallback, which every template can render because it uses only
system, user and assistant turns, laid out as Qwen 2.5 and Hermes do: the tool definitions
appended to the system message (`tools.TOOLS_PREAMBLE`), each call written after the assistant's
content as a `<tool_call>` block, and each run of tool results as one user turn of
`<tool_response>` blocks. Either way an assistant turn's calls carry loss like its text.

Reasoning (`data/reasoning.py`) is written as a `<think>` block before the answer; with
`reasoning_weight` 0 (`data.reasoning: mask`) that block's tokens get no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunekit.data.example import Example, Message
from tunekit.data.reasoning import CLOSE, OPEN, reply_with_reasoning, think_block
from tunekit.data.tools import tools_text
from tunekit.errors import DataError

IGNORE_INDEX = -100
MAX_SHAPES_CHECKED = 32  # `check_template`: conversations of distinct role sequences rendered


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: int = 0  # tokens cut off by max_length

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


# A conversation that uses every tool feature, to see whether a template renders them (`supports_tools`).
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "tk_probe_fn",
            "description": "probe",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    }
]
_PROBE_CALL = {"type": "function", "function": {"name": "tk_probe_fn", "arguments": {"q": "tk_probe_arg"}}}
_PROBE = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
    {"role": "tool", "content": "tk_probe_result", "name": "tk_probe_fn"},
    {"role": "assistant", "content": "done"},
]
_TOOL_SUPPORT: dict[str, bool] = {}  # chat template text -> whether it renders tools itself


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tools itself: given them, it shows the
    declared functions, an assistant turn's call and a tool turn's result (tried once per template)."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        return False
    if template not in _TOOL_SUPPORT:
        try:
            declared = tokenizer.apply_chat_template(
                _PROBE[:1], tools=_PROBE_TOOLS, tokenize=False, add_generation_prompt=True
            )
            whole = tokenizer.apply_chat_template(_PROBE, tools=_PROBE_TOOLS, tokenize=False)
            found = "tk_probe_fn" in declared and "tk_probe_arg" in whole and "tk_probe_result" in whole
        except (
            Exception
        ):  # a template that raises on tool turns (e.g. strict role alternation) has no support
            found = False
        _TOOL_SUPPORT[template] = found
    return _TOOL_SUPPORT[template]


def _content(m: Message) -> str:
    """A turn's content as the template gets it: the reasoning's `<think>` block first, if any."""
    return think_block(m.reasoning) + m.content if m.reasoning else m.content


def _native(m: Message) -> dict[str, Any]:
    """A message in transformers' shape for a template with tool support (arguments as an object)."""
    d: dict[str, Any] = {"role": m.role, "content": _content(m)}
    if m.tool_calls:
        d["tool_calls"] = [
            ({"id": c.id} if c.id else {})
            | {"type": "function", "function": {"name": c.name, "arguments": c.args}}
            for c in m.tool_calls
        ]
    if m.role == "tool":
        d |= ({"name": m.name} if m.name else {}) | (
            {"tool_call_id": m.tool_call_id} if m.tool_call_id else {}
        )
    return d


def conversation(
    tokenizer, messages: Sequence[Message], tools: Sequence[dict] = ()
) -> tuple[list[dict[str, Any]], list[dict] | None, list[Message | None]]:
    """(the turns as the chat template gets them, its `tools` argument, the message each turn comes
    from). Tool use goes to a template that supports it as is, else through the fallback (module
    docstring), where a run of tool results becomes one user turn (its source: the last of them)
    and the tools' text a system turn of its own when the conversation has none (source None)."""
    uses_tools = bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages)
    if not uses_tools:
        return [{"role": m.role, "content": _content(m)} for m in messages], None, list(messages)
    if supports_tools(tokenizer):
        return [_native(m) for m in messages], list(tools) or None, list(messages)
    turns: list[dict[str, Any]] = []
    sources: list[Message | None] = []
    for m in messages:
        if m.role == "tool":
            block = f"<tool_response>\n{m.content}\n</tool_response>"
            if sources and sources[-1] is not None and sources[-1].role == "tool":
                turns[-1]["content"] += "\n" + block
                sources[-1] = m
                continue
            turns.append({"role": "user", "content": block})
        elif m.role == "assistant":
            turns.append({"role": "assistant", "content": reply_with_reasoning(m)})
        else:
            turns.append({"role": m.role, "content": m.content})
        sources.append(m)
    if tools:
        described = tools_text(tuple(tools))
        if turns and turns[0]["role"] == "system":
            turns[0]["content"] += "\n\n" + described
        else:
            turns.insert(0, {"role": "system", "content": described})
            sources.insert(0, None)
    return turns, None, sources


def _apply(
    tokenizer, turns: list[dict], tools: list[dict] | None, add_generation_prompt: bool, where: str
) -> str:
    """The chat template applied to `turns`, as text. A template that refuses the conversation
    (Gemma 2's raises on a system message) is a DataError naming the model and the fix."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            turns, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        roles = {t["role"] for t in turns}
        problem = f"the template refuses this conversation ({e})"
        if "system" in roles and "system" in str(e).lower():
            problem = f"the template cannot render a system message ({e})"
        raise template_error(tokenizer, where, problem, system="system" in roles) from None


def render(
    tokenizer, messages, add_generation_prompt: bool = False, where: str = "", tools: Sequence[dict] = ()
) -> str:
    """The chat template applied to `messages` (and the declared `tools`), as text."""
    turns, tools_arg, _ = conversation(tokenizer, messages, tools)
    return _apply(tokenizer, turns, tools_arg, add_generation_prompt, where)


def render_prompt(tokenizer, example: Example) -> str:
    """What the model sees at inference: everything before the target, then the assistant header."""
    return render(tokenizer, example.prompt, add_generation_prompt=True, tools=example.tools)


def render_request(tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None) -> str:
    """An OpenAI chat request's prompt (messages as dicts, as a server receives them, and its
    `tools`) rendered exactly as training rendered its data: read by the chat format's own rules.
    A request the rules refuse is a DataError naming the field."""
    from tunekit.data.formats import FieldError, chat_prompt

    try:
        turns, declared = chat_prompt(messages, tools)
    except FieldError as e:
        raise DataError([f"{e.field}: {e.message}"], header="messages") from None
    return render(tokenizer, turns, add_generation_prompt=True, tools=declared)


def template_error(tokenizer, where: str, problem: str, system: bool = False) -> DataError:
    """A template that would give a wrong loss mask (or none): the error names the model, the
    template and the fix. Found by `tunekit data check` (`check_template`) before training starts."""
    from tunekit.models.templates import template_choice

    choice = template_choice(tokenizer)
    fix = "set `chat_template:` in the config to a built-in (chatml, llama3, gemma, mistral, qwen, phi3, completion) or a .jinja file"
    if system:
        fix += (
            ", e.g. `chat_template: gemma` (it folds a system message into the first user turn, as Gemma 3 "
            "does), or remove the system messages from the data"
        )
    head = f"{where}: " if where else ""
    return DataError(
        [f"{head}model at {tokenizer.name_or_path}, {choice.description}: {problem}; {fix}"],
        header="chat template",
    )


def assistant_spans(tokenizer, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of assistant turns that carry loss.

    A template that drops a system message or an assistant turn, or renders a turn differently
    depending on what follows, raises a DataError (`template_error`): never a silently wrong mask."""
    where = example.where
    turns, tools, sources = conversation(tokenizer, example.messages, example.tools)
    text = _apply(tokenizer, turns, tools, False, where)
    for m in example.messages:
        if m.role == "system" and m.content.strip() and m.content.strip() not in text:
            raise template_error(tokenizer, where, "the template drops the system message", system=True)
    spans = []
    for i, m in enumerate(sources):
        if m is None or m.role != "assistant" or m.weight == 0:
            continue
        answer = m.content.strip()
        if answer not in text:
            raise template_error(tokenizer, where, f"the template drops the assistant turn (message {i + 1})")
        before = _apply(tokenizer, turns[:i], tools, True, where)
        through = _apply(tokenizer, turns[: i + 1], tools, False, where)
        if not (text.startswith(through) and through.startswith(before)):
            raise template_error(
                tokenizer,
                where,
                "it does not render this conversation incrementally (a prefix of the conversation "
                "renders differently), so assistant turns cannot be located for the loss mask",
            )
        turn = through[len(before) :]
        if answer not in turn:
            raise template_error(
                tokenizer,
                where,
                f"the assistant turn (message {i + 1}) is not where the template's prompt ends",
            )
        for call in m.tool_calls:
            if call.name not in turn:
                raise template_error(tokenizer, where, f"the template drops the tool call of message {i + 1}")
        masked = _masked_reasoning(m, turn) if m.reasoning and m.reasoning_weight == 0 else None
        if masked is None:
            spans.append((len(before), len(through)))
            continue
        start, end = masked
        if start == -1:
            raise template_error(tokenizer, where, f"the template drops the reasoning of message {i + 1}")
        spans += [
            (a, b)
            for a, b in ((len(before), len(before) + start), (len(before) + end, len(through)))
            if b > a
        ]
    return text, spans


def _masked_reasoning(m: Message, turn: str) -> tuple[int, int]:
    """The characters of the rendered assistant `turn` that `data.reasoning: mask` takes out of the
    loss: its `<think>` block and the blank after it ((-1, -1) when the reasoning is not there)."""
    at = turn.find(m.reasoning)
    if at == -1:
        return -1, -1
    opened = turn.rfind(OPEN, 0, at)
    start = opened if opened != -1 else at
    closed = turn.find(CLOSE, at + len(m.reasoning))
    end = closed + len(CLOSE) if closed != -1 else at + len(m.reasoning)
    while end < len(turn) and turn[end] in " \n":
        end += 1
    return start, end


def check_template(tokenizer, examples) -> None:
    """Render one conversation of each role sequence in `examples` as training will (`assistant_spans`):
    a template that refuses a system message, or drops one or an assistant turn, raises a DataError
    here, at `tunekit data check` time, rather than mid-training or as a silently wrong loss mask."""
    shapes: dict[tuple, Example] = {}
    for ex in examples:
        if len(shapes) >= MAX_SHAPES_CHECKED:
            break
        kinds = tuple(
            (m.role, bool(m.tool_calls), bool(m.reasoning), m.reasoning_weight) for m in ex.messages
        )
        shapes.setdefault((bool(ex.tools), *kinds), ex)
    for ex in shapes.values():
        if any(m.role == "assistant" for m in ex.messages):
            assistant_spans(tokenizer, ex)
        else:
            render(tokenizer, ex.messages, where=ex.where, tools=ex.tools)


def tokenize_example(tokenizer, example: Example, max_length: int) -> TokenizedExample:
    """Token ids and labels for one example; labels are -100 outside assistant spans."""
    text, spans = assistant_spans(tokenizer, example)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, _end) in enumerate(offsets):
        # A token belongs to the span its first character falls in.
        if any(a <= start < b for a, b in spans):
            labels[k] = ids[k]
    cut = max(0, len(ids) - max_length)
    return TokenizedExample(ids[:max_length], labels[:max_length], truncated=cut)
