"""Reasoning traces: the thinking an assistant turn writes before its answer.

A row gives it as OpenAI's `reasoning_content` beside the content, or as a `<think>` block at the
start of the content (DeepSeek-R1, Qwen3):

    {"role": "assistant", "content": "<think>\\n2 and 2 make 4.\\n</think>\\n\\n4"}
    {"role": "assistant", "reasoning_content": "2 and 2 make 4.", "content": "4"}

Both become `Message(reasoning="2 and 2 make 4.", content="4")`, and render as the `<think>` block
(`think_block`) before the answer. `data.reasoning` chooses what training does with it
(`apply_reasoning`):

- `train` (default): the thinking carries loss like the answer; the model learns to think first.
- `mask`: the thinking stays in the context the answer is learned from, but carries no loss (the
  `<think>` block's tokens get label -100): for traces you want the answer to follow from, not to imitate.
- `drop`: the thinking is removed; the model learns to answer directly.

Evaluation scores the answer only: `strip_thinking` removes a `<think>` block from a generated reply
(and a reply cut off inside one has no answer at all).
"""

from __future__ import annotations

from dataclasses import replace

from tunekit.data.example import Example, Message
from tunekit.data.problems import FieldError

REASONING_MODES = ("train", "mask", "drop")
OPEN, CLOSE = "<think>", "</think>"


def split_thinking(content: str, field: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant turn's content: a leading `<think>` block (its opening tag
    may be left out, as when a template's prompt writes it) taken out; ("", content) without one."""
    if CLOSE not in content:
        if OPEN in content:
            raise FieldError(
                field,
                "unclosed_thinking",
                f"opens a {OPEN} block that is never closed; end the reasoning with {CLOSE} before the answer",
            )
        return "", content
    thinking, _, answer = content.partition(CLOSE)
    return thinking.strip().removeprefix(OPEN).strip(), answer.strip()


def think_block(reasoning: str) -> str:
    """How a turn's reasoning is written before its answer (Qwen3's and DeepSeek-R1's layout)."""
    return f"{OPEN}\n{reasoning}\n{CLOSE}\n\n"


def reply_with_reasoning(message: Message) -> str:
    """An assistant turn as a model trained on it writes it: its `<think>` block, then its answer."""
    return (think_block(message.reasoning) if message.reasoning else "") + message.reply


def strip_thinking(text: str) -> str:
    """The answer of a generated reply: what follows its `</think>`; a reply that opens a `<think>`
    block and never closes it has not answered ("")."""
    if CLOSE in text:
        return text.rsplit(CLOSE, 1)[1].strip()
    if text.lstrip().startswith(OPEN):
        return ""
    return text


def apply_reasoning(examples: list[Example], mode: str) -> list[Example]:
    """The examples as `data.reasoning: mode` trains them (module docstring)."""
    if mode not in REASONING_MODES:
        raise ValueError(f"data.reasoning: {mode!r}; use one of {', '.join(REASONING_MODES)}")
    if mode == "train":
        return examples
    out = []
    for ex in examples:
        if not any(m.reasoning for m in ex.messages):
            out.append(ex)
            continue
        if mode == "drop":
            messages = tuple(replace(m, reasoning="", reasoning_weight=1) for m in ex.messages)
        else:
            messages = tuple(replace(m, reasoning_weight=0) if m.reasoning else m for m in ex.messages)
        out.append(replace(ex, messages=messages))
    return out
