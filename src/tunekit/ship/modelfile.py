"""An Ollama `Modelfile` beside an exported GGUF: the chat template and stop tokens used in training.

Ollama templates are Go templates, not Jinja. The training template is rendered with marker contents
to find the text each role is wrapped in (ChatML's `<|im_start|>user\\n` ... `<|im_end|>\\n`, the
default system prompt a template adds when there is none), and the Go template is built from those
pieces. Every piece is written as a quoted Go string, so no template whitespace rule can change it.
The pieces are checked by rendering four conversations both ways; a template whose structure they
cannot reproduce (e.g. one that folds the system prompt into the first user turn) gets no TEMPLATE
line, and Ollama falls back to the GGUF's own chat template, with a note saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunekit.models.stops import stop_token_ids

_S, _U, _U2, _A = "\u2402S\u2402", "\u2402U1\u2402", "\u2402U2\u2402", "\u2402A1\u2402"


@dataclass(frozen=True)
class Wrapping:
    """The text around each role's content; `user_after` includes the assistant's opening."""

    default_prefix: str  # before the first message when it is not a system message
    system_before: str
    system_after: str
    user_before: str
    user_after: str
    assistant_after: str

    def render(self, messages: list[dict]) -> str:
        """What the Go template renders for `messages` (this module's model of it)."""
        out = "" if messages and messages[0]["role"] == "system" else self.default_prefix
        for m in messages:
            before, after = {
                "system": (self.system_before, self.system_after),
                "user": (self.user_before, self.user_after),
                "assistant": ("", self.assistant_after),
            }[m["role"]]
            out += before + m["content"] + after
        return out

    def go_template(self) -> str:
        q = json.dumps  # a JSON string is a valid Go interpreted string literal

        return (
            '{{ if not (and .Messages (eq (index .Messages 0).Role "system")) }}'
            f"{{{{ {q(self.default_prefix)} }}}}{{{{ end }}}}"
            "{{ range .Messages }}"
            f'{{{{ if eq .Role "system" }}}}{{{{ {q(self.system_before)} }}}}{{{{ .Content }}}}'
            f"{{{{ {q(self.system_after)} }}}}"
            f'{{{{ else if eq .Role "user" }}}}{{{{ {q(self.user_before)} }}}}{{{{ .Content }}}}'
            f"{{{{ {q(self.user_after)} }}}}"
            f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{{{{ {q(self.assistant_after)} }}}}'
            "{{ end }}{{ end }}"
        )


def _between(text: str, start: str | None, end: str | None) -> str:
    i = text.index(start) + len(start) if start else 0
    j = text.index(end, i) if end else len(text)
    return text[i:j]


def derive_wrapping(tokenizer) -> Wrapping | None:
    """The role wrapping of the tokenizer's chat template, or None where it is not that simple."""

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    u = [{"role": "user", "content": _U}]
    ua = u + [{"role": "assistant", "content": _A}]
    uau = ua + [{"role": "user", "content": _U2}]
    su = [{"role": "system", "content": _S}] + u
    try:
        t1, t2, t3, t4 = render(u, True), render(ua, False), render(uau, True), render(su, True)
        head, user_after = _between(t1, None, _U), _between(t1, _U, None)
        assistant_after = _between(t2, _A, None)
        between_turns = _between(t3, _A, _U2)
        if not between_turns.startswith(assistant_after) or _between(t2, _U, _A) != user_after:
            return None
        user_before = between_turns[len(assistant_after) :]
        if not head.endswith(user_before) or not _between(t4, _S, _U).endswith(user_before):
            return None
        wrap = Wrapping(
            default_prefix=head[: len(head) - len(user_before)],
            system_before=_between(t4, None, _S),
            system_after=_between(t4, _S, _U)[: -len(user_before) or None],
            user_before=user_before,
            user_after=user_after,
            assistant_after=assistant_after,
        )
    except Exception:  # a template that raises on a role order, or whose markers move: not simple
        return None
    checks = [u, su, uau, [su[0]] + uau]
    ok = all(wrap.render(m) == render(m, m[-1]["role"] == "user") for m in checks)
    return wrap if ok else None


def modelfile_text(tokenizer, model, gguf_name: str) -> tuple[str, bool]:
    """The Modelfile's text, and whether it carries a TEMPLATE (False: Ollama uses the GGUF's)."""
    lines = ["# Ollama: ollama create NAME -f Modelfile  (written by tunekit export)", f"FROM ./{gguf_name}"]
    wrap = derive_wrapping(tokenizer)
    if wrap is not None:
        lines.append(f'TEMPLATE """{wrap.go_template()}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not a plain role wrapping; Ollama reads the GGUF's")
    for token in tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer, model)):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    return "\n".join(lines) + "\n", wrap is not None


def write_modelfile(tokenizer, model, gguf_path: Path) -> Path:
    """Write `Modelfile` beside `gguf_path`; returns its path."""
    text, _ = modelfile_text(tokenizer, model, gguf_path.name)
    path = gguf_path.parent / "Modelfile"
    path.write_text(text, encoding="utf-8")
    return path
