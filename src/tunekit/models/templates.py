"""Chat templates: the model's own, a built-in one by name, or a .jinja file (`chat_template:` in the config).

Which template a run uses (`choose_template`, called by `load_tokenizer`):

1. `chat_template:` set in the config: that built-in or that file, even if the model has its own.
2. Unset: the model's own template, when its tokenizer ships one.
3. Unset and the model has none (a base model, e.g. Gemma 3 270M): the built-in of the model's
   family when its turn tokens are already single tokens of the vocabulary (Gemma's base vocabulary
   has `<start_of_turn>`/`<end_of_turn>`), else `chatml` when `<|im_start|>`/`<|im_end|>` are
   (SmolLM2 base, many others), else `completion` (`### Instruction:` / `### Response:` + eos),
   which needs no new token at all. A default never adds tokens: a new token's embedding starts
   untrained, and so does every row a base model never saw in use; only a template named in the
   config may add them (train/setup.py then resizes the embeddings and trains the new rows).

The built-ins follow each family's official template, with two rules that make the loss mask exact
(tests/test_templates.py): an assistant turn renders as its header, then its content, then the
end-of-turn token and nothing else (the newline the official templates write after that token is
written before the next turn instead, so it carries no loss), and a turn renders the same wherever it
stands in the conversation (so its span can be found by rendering the conversation up to it). The
text a model sees at inference (the prompt with the generation header) is the official one.

System messages:
- chatml, qwen, llama3, phi3: a turn of their own, as in the official templates.
- gemma: folded into the first user turn (`system\n\nuser`), as Gemma 3's official template does
  (Gemma 1 and 2 refuse a system message; their template raises, which `tunekit data check` reports
  with this built-in as the fix).
- mistral: folded into the first user turn (`[INST] system\n\nuser [/INST]`). Mistral's newer
  templates put it in the *last* user turn, which moves as a conversation grows, so earlier
  assistant turns could not be located.
- completion: the system text first, then a blank line.

The choice is recorded in the tokenizer (`init_kwargs["tunekit_chat_template"]`), which every run
saves with its model: eval, serve and export load it back and use the same template.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunekit.errors import ConfigError, ModelError

RECORD_KEY = "tunekit_chat_template"  # in tokenizer_config.json: which template and why


@dataclass(frozen=True)
class Builtin:
    """A built-in template: its Jinja source and the marker tokens it writes (each must be a single
    token of the vocabulary; `apply_template` adds the missing ones for a template named in the config)."""

    jinja: str
    tokens: tuple[str, ...]
    summary: str


def _j(*parts: str) -> str:
    """Jinja written as one line: whitespace between tags would otherwise become output."""
    return "".join(parts)


_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"
_SEP_BEFORE_TURN = "{% if not loop.first %}{{ '\\n' }}{% endif %}"
_SEP_BEFORE_PROMPT = "{% if messages %}{{ '\\n' }}{% endif %}"

# ChatML up to the reply's header; Qwen's template is the same with its thinking switch added.
_CHATML = (
    "{% for m in messages %}",
    _SEP_BEFORE_TURN,
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}",
    _SEP_BEFORE_PROMPT,
    "{{ '<|im_start|>assistant\\n' }}",
)
CHATML = _j(*_CHATML, "{% endif %}")

# Qwen 2.5 and 3: ChatML with tool use and Qwen3's thinking switch. Given `tools`, a system turn lists
# them (after the conversation's own system message, if any) and says how to call them; an assistant
# turn writes each call as a `<tool_call>` block after its content; a run of `tool` turns becomes one
# user turn of `<tool_response>` blocks, as Qwen's own template does (and as data/tokenize.py's
# fallback writes tool use for templates without it, so both give the same text). At inference
# `enable_thinking=False` opens the reply with an empty think block. `<think>` blocks in assistant
# content are kept as written in every turn (Qwen3's own template drops them from turns before the
# last user message, so those turns render differently depending on what follows, and their loss
# spans could not be found).
# The words of data/tools.py's TOOLS_PREAMBLE, split around the tool list (Jinja string escapes);
# tests/test_tool_calls.py checks that this template and the fallback write the same text.
_QWEN_TOOLS = (
    "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>"
)
_QWEN_CALL_HOW = (
    "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call>'
)
QWEN = _j(
    "{% set ns = namespace(turns=0) %}",
    "{% set skip_first = tools and messages and messages[0]['role'] == 'system' %}",
    "{% if tools %}",
    "{{ '<|im_start|>system\\n' + (messages[0]['content'] if skip_first else '') }}",
    "{{ ('" + _QWEN_TOOLS + "' if skip_first else '" + _QWEN_TOOLS[4:] + "') }}",
    "{% for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}",
    "{{ '" + _QWEN_CALL_HOW + "<|im_end|>' }}",
    "{% set ns.turns = 1 %}",
    "{% endif %}",
    "{% for m in messages %}",
    "{% if not (skip_first and loop.first) %}",
    "{% if m['role'] == 'tool' %}",
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}",
    "{% if ns.turns %}{{ '\\n' }}{% endif %}{{ '<|im_start|>user' }}",
    "{% endif %}",
    "{{ '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}",
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>' }}{% endif %}",
    "{% else %}",
    "{% if ns.turns %}{{ '\\n' }}{% endif %}",
    "{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') }}",
    "{% for c in m['tool_calls'] or [] %}",
    "{% set f = c['function'] if c['function'] is defined else c %}",
    "{% if m['content'] or not loop.first %}{{ '\\n' }}{% endif %}",
    "{{ '<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}",
    "{{ f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson) }}",
    "{{ '}\\n</tool_call>' }}",
    "{% endfor %}",
    "{{ '<|im_end|>' }}",
    "{% endif %}",
    "{% set ns.turns = ns.turns + 1 %}",
    "{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}",
    "{% if ns.turns %}{{ '\\n' }}{% endif %}",
    "{{ '<|im_start|>assistant\\n' }}",
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}",
    "{% endif %}",
)

LLAMA3 = _j(
    _BOS,
    "{% for m in messages %}",
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
)

_FOLD_SYSTEM = _j(
    "{% if messages and messages[0]['role'] == 'system' %}",
    "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}",
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}",
)
_ALTERNATE = _j(
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}",
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
    "{% endif %}",
)

GEMMA = _j(
    _BOS,
    _FOLD_SYSTEM,
    "{% for m in turns %}",
    _ALTERNATE,
    _SEP_BEFORE_TURN,
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}",
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}",
    "{% if turns %}{{ '\\n' }}{% endif %}",
    "{{ '<start_of_turn>model\\n' }}",
    "{% endif %}",
)

MISTRAL = _j(
    _BOS,
    _FOLD_SYSTEM,
    "{% for m in turns %}",
    _ALTERNATE,
    "{% if m['role'] == 'user' %}",
    "{{ '[INST] ' + (prefix if loop.first else '') + m['content'] + ' [/INST]' }}",
    "{% else %}{{ m['content'] + eos_token }}{% endif %}",
    "{% endfor %}",
)

# Phi-3's official template ends a conversation that has no generation prompt with an eos; a turn
# would then render differently as the last turn than in the middle, so that eos is left out.
PHI3 = _j(
    "{% for m in messages %}",
    _SEP_BEFORE_TURN,
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}",
    _SEP_BEFORE_PROMPT,
    "{{ '<|assistant|>\\n' }}",
    "{% endif %}",
)

COMPLETION = _j(
    "{% for m in messages %}",
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}",
    "{% if m['role'] == 'system' %}{{ m['content'] }}",
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] }}",
    "{% else %}{{ '### Response:\\n' + m['content'] + eos_token }}{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}",
    "{% if messages %}{{ '\\n\\n' }}{% endif %}",
    "{{ '### Response:\\n' }}",
    "{% endif %}",
)

BUILTINS: dict[str, Builtin] = {
    "chatml": Builtin(CHATML, ("<|im_start|>", "<|im_end|>"), "ChatML: <|im_start|>role ... <|im_end|>"),
    "qwen": Builtin(
        QWEN, ("<|im_start|>", "<|im_end|>"), "ChatML with Qwen's tool calls and Qwen3's <think> switch"
    ),
    "llama3": Builtin(
        LLAMA3,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "Llama 3: header ids, turns end with <|eot_id|>",
    ),
    "gemma": Builtin(
        GEMMA,
        ("<start_of_turn>", "<end_of_turn>"),
        "Gemma: <start_of_turn>user/model ... <end_of_turn>; system folded into the first user turn",
    ),
    "mistral": Builtin(
        MISTRAL, (), "Mistral: [INST] user [/INST] reply</s>; system folded into the first turn"
    ),
    "phi3": Builtin(
        PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "Phi-3: <|user|> ... <|end|>"
    ),
    "completion": Builtin(
        COMPLETION, (), "### Instruction: / ### Response: + eos, for base models (no new tokens)"
    ),
}
ALIASES = {"chatml-with-think": "qwen", "alpaca": "completion"}
TEMPLATE_NAMES = (*BUILTINS, *ALIASES)

# model_type (config.json) -> the built-in of that family, tried first for a base model.
FAMILIES = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
    "llama": "llama3",
    "mistral": "mistral",
    "mixtral": "mistral",
    "phi3": "phi3",
    "qwen2": "chatml",
    "qwen3": "qwen",
    "qwen3_moe": "qwen",
}


@dataclass
class TemplateChoice:
    """Which template a tokenizer renders with, and why: printed at the start of training and saved
    with the tokenizer."""

    name: str  # a built-in's name, "model" (the model's own), or a .jinja file's path
    reason: str
    added_tokens: list[str] = field(default_factory=list)  # new to the vocabulary: embeddings must grow
    marker_tokens: list[str] = field(default_factory=list)  # the template's turn tokens

    @property
    def line(self) -> str:
        """The one line a run prints."""
        what = "the model's own" if self.name == "model" else self.name
        added = f"; added tokens {', '.join(self.added_tokens)}" if self.added_tokens else ""
        return f"chat template: {what} ({self.reason}{added})"

    @property
    def description(self) -> str:
        """How errors name it."""
        if self.name == "model":
            return "the model's own chat template"
        if self.name in BUILTINS:
            return f"the built-in '{self.name}' chat template"
        return f"the chat template file {self.name}"


def is_template_file(spec: str) -> bool:
    """A `chat_template:` value that names a file rather than a built-in."""
    return spec.endswith(".jinja") or "/" in spec or "\\" in spec


def check_spec(spec: str) -> str:
    """Validate a `chat_template:` value (a built-in name or a .jinja path); the message of the
    ValueError names the known names. Returns the value, with an alias resolved."""
    if is_template_file(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"no such template file {spec!r}; give a .jinja file or a built-in name")
        return spec
    if spec in ALIASES:
        return ALIASES[spec]
    if spec not in BUILTINS:
        near = difflib.get_close_matches(spec, TEMPLATE_NAMES, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ValueError(
            f"unknown template {spec!r}; {hint}give a .jinja file or one of: {', '.join(TEMPLATE_NAMES)}"
        )
    return spec


def is_single_token(tokenizer, token: str) -> bool:
    """`token` encodes to exactly itself: one id, not pieces of text."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    return len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token


def model_type(model_path: str | Path) -> str | None:
    """config.json's model_type, where the folder has one."""
    try:
        return json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def default_for_base(tokenizer, model_path: str | Path) -> tuple[str, str]:
    """The built-in a model without a template gets, and why (module docstring, rule 3)."""
    family = FAMILIES.get(model_type(model_path) or "")
    for name in dict.fromkeys([n for n in (family, "chatml") if n]):
        tokens = BUILTINS[name].tokens
        if all(is_single_token(tokenizer, t) for t in tokens):
            have = f"its vocabulary has {', '.join(tokens)}" if tokens else "it needs no new tokens"
            kind = "its family's template" if name == family else "a common template"
            return name, f"the model has no chat template; {kind}, and {have}"
    if tokenizer.eos_token is None:
        raise ModelError(
            f"model at {model_path}: it has no chat template and no eos token, so no template fits "
            f"without new tokens; set `chat_template:` to one of {', '.join(BUILTINS)} (its tokens are "
            "added to the vocabulary and trained)"
        )
    return "completion", (
        "the model has no chat template and its vocabulary has no turn tokens of a known template; "
        f"the completion template ends each reply with the eos {tokenizer.eos_token}"
    )


def read_record(tokenizer) -> TemplateChoice | None:
    """The choice saved with a tokenizer (a run's), if it still matches the template it holds."""
    rec = tokenizer.init_kwargs.get(RECORD_KEY)
    if not isinstance(rec, dict) or rec.get("template") != tokenizer.chat_template:
        return None
    try:
        return TemplateChoice(**{k: v for k, v in rec.items() if k != "template"})
    except TypeError:
        return None


def apply_template(tokenizer, spec: str | None, model_path: str | Path) -> TemplateChoice:
    """Give `tokenizer` the template the config asks for (`spec`: a built-in name, a .jinja path, or
    None for the model's own or a default), adding the tokens a named built-in needs. Records and
    returns the choice."""
    saved = read_record(tokenizer) if spec is None else None
    if saved is not None:  # a run's tokenizer: keep the name and reason chosen at training
        return saved
    if spec is None and tokenizer.chat_template:
        choice = TemplateChoice("model", "the model ships one")
    elif spec is None:
        name, reason = default_for_base(tokenizer, model_path)
        choice = _use_builtin(tokenizer, name, reason)
    elif is_template_file(spec):
        choice = _use_file(tokenizer, spec)
    else:
        try:
            name = check_spec(spec)
        except ValueError as e:
            raise ConfigError([f"chat_template: {e}"]) from None
        choice = _use_builtin(tokenizer, name, "set in the config (chat_template)")
    tokenizer.init_kwargs[RECORD_KEY] = asdict(choice) | {"template": tokenizer.chat_template}
    return choice


def _use_builtin(tokenizer, name: str, reason: str) -> TemplateChoice:
    builtin = BUILTINS[name]
    missing = [t for t in builtin.tokens if not is_single_token(tokenizer, t)]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    tokenizer.chat_template = builtin.jinja
    return TemplateChoice(name, reason, added_tokens=missing, marker_tokens=list(builtin.tokens))


def _use_file(tokenizer, spec: str) -> TemplateChoice:
    path = Path(spec).expanduser()
    try:
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"chat_template: cannot read {spec} ({e})"]) from None
    return TemplateChoice(str(path), "set in the config (chat_template)")


def template_choice(tokenizer) -> TemplateChoice:
    """The choice `apply_template` recorded on this tokenizer (the model's own where none was)."""
    return read_record(tokenizer) or TemplateChoice("model", "the model ships one")
