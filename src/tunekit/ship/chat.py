"""`tunekit chat RUN_DIR`: talk to a fine-tune in the terminal, with its training chat template.

Replies stream as they are generated and end on the stop tokens training taught. Commands:
/reset forgets the conversation, /exit (or Ctrl-D) leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from tunekit.ship.generation import stream_reply

HELP = "type a message; /reset starts over, /exit leaves"


def chat(
    run_dir: str | Path,
    system: str | None = None,
    temperature: float = 0.0,
    max_tokens: int = 256,
    lines: Iterable[str] | None = None,
    out: TextIO | None = None,
) -> list[dict[str, str]]:
    """Chat with a run's fine-tuned model; returns the conversation. `lines` defaults to stdin."""
    from tunekit.console import err
    from tunekit.ship.export import check_generative
    from tunekit.train.setup import load_trained

    check_generative(Path(run_dir))
    out = out or sys.stdout
    model, tokenizer, _ = load_trained(run_dir)
    err.print(f"chatting with {Path(run_dir).name} ({HELP})")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for line in _prompts(lines, out):
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if system else []
            out.write("(conversation reset)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        pieces, _ = stream_reply(model, tokenizer, history, max_tokens, temperature)
        reply = ""
        for piece in pieces:
            out.write(piece)
            out.flush()
            reply += piece
        out.write("\n")
        history.append({"role": "assistant", "content": reply})
    return history


def _prompts(lines: Iterable[str] | None, out: TextIO):
    """Lines to answer: the given ones, or the terminal's until end of input."""
    if lines is not None:
        yield from lines
        return
    import contextlib

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            yield input("you> ")
        except EOFError:
            out.write("\n")
            return
