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
from tunekit.errors import TunekitError

IGNORE_INDEX = -100


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


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    """The chat template applied to `messages`, as text."""
    return tokenizer.apply_chat_template(
        _as_dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_prompt(tokenizer, example: Example) -> str:
    """What the model sees at inference: everything before the target, then the assistant header."""
    return render(tokenizer, example.prompt, add_generation_prompt=True)


def assistant_spans(tokenizer, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of assistant turns that carry loss."""
    msgs = example.messages
    text = render(tokenizer, msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m.role != "assistant" or m.weight == 0:
            continue
        before = render(tokenizer, msgs[:i], add_generation_prompt=True)
        through = render(tokenizer, msgs[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise TunekitError(
                f"{example.where}: the model's chat template does not render this conversation "
                "incrementally (a prefix of the conversation renders differently), so assistant "
                "turns cannot be located for loss masking. Use a model with a standard chat template."
            )
        spans.append((len(before), len(through)))
    return text, spans


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
