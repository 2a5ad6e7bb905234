"""Examples to token ids through the model's own chat template, with loss only on assistant turns.

The template is rendered once for the whole conversation; an assistant turn's span is found by
rendering the conversation up to that turn with and without the turn itself. Everything the
template appends after an assistant's content (for ChatML, `<|im_end|>\n`) belongs to the turn, so
the model learns to stop. Tokens outside those spans get label -100 (no loss).

For SmolLM2's ChatML template, [user "2+2?", assistant "4"] renders as

    <|im_start|>system\nYou are a helpful AI assistant ...<|im_end|>\n   <- no loss
    <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n           <- no loss
    4<|im_end|>\n                                                         <- loss
"""

from __future__ import annotations

from dataclasses import dataclass

from tunekit.data.example import Example, Message
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


def _as_dicts(messages: tuple[Message, ...] | list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def render(tokenizer, messages, add_generation_prompt: bool = False, where: str = "") -> str:
    """The chat template applied to `messages`, as text. A template that refuses the conversation
    (Gemma 2's raises on a system message) is a DataError naming the model and the fix."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            _as_dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        roles = {m.role for m in messages}
        problem = f"the template refuses this conversation ({e})"
        if "system" in roles and "system" in str(e).lower():
            problem = f"the template cannot render a system message ({e})"
        raise template_error(tokenizer, where, problem, system="system" in roles) from None


def render_prompt(tokenizer, example: Example) -> str:
    """What the model sees at inference: everything before the target, then the assistant header."""
    return render(tokenizer, example.prompt, add_generation_prompt=True)


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
    msgs, where = example.messages, example.where
    text = render(tokenizer, msgs, where=where)
    for m in msgs:
        if m.role == "system" and m.content.strip() and m.content.strip() not in text:
            raise template_error(tokenizer, where, "the template drops the system message", system=True)
    spans = []
    for i, m in enumerate(msgs):
        if m.role != "assistant" or m.weight == 0:
            continue
        # The answer after any reasoning block: a template may re-lay `<think>` blocks (Qwen3's does).
        answer = m.content.rsplit("</think>", 1)[-1].strip()
        if answer not in text:
            raise template_error(tokenizer, where, f"the template drops the assistant turn (message {i + 1})")
        before = render(tokenizer, msgs[:i], add_generation_prompt=True, where=where)
        through = render(tokenizer, msgs[: i + 1], where=where)
        if not (text.startswith(through) and through.startswith(before)):
            raise template_error(
                tokenizer,
                where,
                "it does not render this conversation incrementally (a prefix of the conversation "
                "renders differently), so assistant turns cannot be located for the loss mask",
            )
        if answer not in through[len(before) :]:
            raise template_error(
                tokenizer,
                where,
                f"the assistant turn (message {i + 1}) is not where the template's prompt ends",
            )
        spans.append((len(before), len(through)))
    return text, spans


def check_template(tokenizer, examples) -> None:
    """Render one conversation of each role sequence in `examples` as training will (`assistant_spans`):
    a template that refuses a system message, or drops one or an assistant turn, raises a DataError
    here, at `tunekit data check` time, rather than mid-training or as a silently wrong loss mask."""
    shapes: dict[tuple[str, ...], Example] = {}
    for ex in examples:
        if len(shapes) >= MAX_SHAPES_CHECKED:
            break
        shapes.setdefault(tuple(m.role for m in ex.messages), ex)
    for ex in shapes.values():
        if any(m.role == "assistant" for m in ex.messages):
            assistant_spans(tokenizer, ex)
        else:
            render(tokenizer, ex.messages, where=ex.where)


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
