"""Every input format: fixtures, one malformed row per problem kind, real files, and random input.

The fixtures in tests/fixtures/formats/ are a good file (loads) and a bad file (known problems at
known lines) for each format; the tables below say what each must give.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import jsonl, write
from conftest import shared_data as shared
from tunekit.data import FORMATS, Message, detect_format, load_examples, read_examples
from tunekit.data.formats import FORMAT_KEYS, FieldError
from tunekit.data.problems import Problem
from tunekit.errors import DataError, TunekitError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def where(problems: list[Problem]) -> list[tuple[int, str, str]]:
    return [(p.line, p.kind, p.field) for p in problems]


def m(role: str, content: str, **extra: object) -> dict:
    return {"role": role, "content": content, **extra}


def t(frm: str, value: str) -> dict:
    return {"from": frm, "value": value}


# ---- fixtures: a good and a bad file per format -------------------------------------------------

# fixture stem -> (format, examples in the good file, (line, kind, field) of each problem in the bad file)
FIXTURE_CASES: dict[str, tuple[str, int, list[tuple[int, str, str]]]] = {
    "chat": (
        "chat",
        3,
        [
            (2, "ends_not_assistant", "messages[2].role"),
            (3, "unknown_role", "messages[0].role"),
            (4, "consecutive_roles", "messages[1].role"),
            (5, "empty_content", "messages[1].content"),
            (6, "invalid_weight", "messages[1].weight"),
            (7, "wrong_type", "messages"),
            (8, "invalid_json", ""),
        ],
    ),
    "prompt_completion": (
        "prompt_completion",
        2,
        [
            (2, "missing_field", "completion"),
            (3, "wrong_type", "prompt"),
            (4, "empty_content", "completion"),
            (5, "format_mismatch", "prompt"),
            (6, "not_an_object", ""),
        ],
    ),
    "alpaca": (
        "alpaca",
        2,
        [
            (2, "missing_field", "output"),
            (3, "wrong_type", "history[0]"),
            (4, "wrong_type", "input"),
            (5, "empty_content", "instruction"),
        ],
    ),
    "classification": (
        "classification",
        3,
        [
            (2, "bad_label", "label"),
            (3, "bad_label", "label"),
            (4, "wrong_type", "text"),
            (5, "missing_field", "label"),
        ],
    ),
    "sharegpt": (
        "sharegpt",
        3,
        [
            (2, "unknown_role", "conversations[1].from"),
            (3, "unknown_tool", "conversations[1].value.name"),
            (4, "ends_not_assistant", "conversations[2].from"),
            (5, "consecutive_roles", "conversations[1].from"),
            (6, "missing_field", "conversations[0].value"),
            (7, "empty_content", "conversations"),
            (8, "invalid_tools", "tools"),
        ],
    ),
    "preference": (
        "preference",
        2,
        [
            (2, "empty_content", "rejected"),
            (3, "wrong_type", "chosen"),
            (4, "missing_field", "prompt"),
            (5, "format_mismatch", "chosen"),
        ],
    ),
    "preference_conversational": (
        "preference",
        3,
        [
            (2, "prompt_mismatch", "chosen[0]"),
            (3, "prompt_mismatch", "rejected[1]"),
            (4, "no_target", "chosen"),
            (5, "consecutive_roles", "chosen[0].role"),
            (6, "no_target", "rejected"),
            (7, "empty_content", "prompt"),
        ],
    ),
    "anthropic_hh": (
        "anthropic_hh",
        2,
        [
            (2, "prompt_mismatch", "rejected"),
            (3, "format_mismatch", "chosen"),
            (4, "ends_not_assistant", "chosen"),
            (5, "consecutive_roles", "chosen"),
            (6, "empty_content", "rejected"),
            (7, "prompt_mismatch", "rejected"),
        ],
    ),
    "sharegpt_preference": (
        "sharegpt_preference",
        2,
        [
            (2, "unknown_role", "chosen.from"),
            (3, "consecutive_roles", "chosen.from"),
            (4, "wrong_type", "rejected"),
            (5, "empty_content", "rejected.value"),
            (6, "missing_field", "rejected"),
        ],
    ),
    "openai_dpo": (
        "openai_dpo",
        2,
        [
            (2, "unsupported_field", "input.tools"),
            (3, "unknown_role", "preferred_output[0].role"),
            (4, "missing_field", "non_preferred_output"),
            (5, "wrong_type", "input"),
        ],
    ),
    "kto": (
        "kto",
        3,
        [
            (2, "bad_label", "label"),
            (3, "no_target", "messages"),
            (4, "missing_field", "completion"),
            (5, "bad_label", "label"),
        ],
    ),
    "text": (
        "text",
        3,
        [
            (2, "empty_content", "text"),
            (3, "wrong_type", "text"),
            (4, "invalid_utf8", "text"),
            (5, "invalid_utf8", ""),
        ],
    ),
}


def test_every_format_has_fixtures():
    assert {fmt for fmt, _, _ in FIXTURE_CASES.values()} == set(FORMATS)
    stems = {p.name.rsplit("_", 1)[0] for p in FIXTURES.glob("*.jsonl")}
    assert stems == set(FIXTURE_CASES)


@pytest.mark.parametrize("stem", FIXTURE_CASES)
def test_good_fixture_loads(stem):
    fmt, count, _ = FIXTURE_CASES[stem]
    examples = load_examples(FIXTURES / f"{stem}_good.jsonl")
    assert len(examples) == count
    assert {e.format for e in examples} == {fmt}
    assert [e.line for e in examples] == list(range(1, count + 1))
    assert all(e.messages[-1].role == "assistant" for e in examples)
    is_pair = fmt in ("preference", "anthropic_hh", "sharegpt_preference", "openai_dpo")
    assert all((e.rejected is not None) == is_pair for e in examples)
    assert all((e.desirable is not None) == (fmt == "kto") for e in examples)


@pytest.mark.parametrize("stem", FIXTURE_CASES)
def test_bad_fixture_reports_each_problem_on_its_line(stem):
    fmt, _, expected = FIXTURE_CASES[stem]
    path = FIXTURES / f"{stem}_bad.jsonl"
    examples, problems = read_examples(path)
    assert where(problems) == expected
    assert [(e.line, e.format) for e in examples] == [(1, fmt)]  # line 1 is the one good row
    assert all(p.file == str(path) and p.severity == "error" and p.message for p in problems)
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert info.value.problems == [str(p) for p in problems]


# ---- what each format becomes -------------------------------------------------------------------


def roles(messages: tuple[Message, ...] | None) -> list[tuple[str, str]]:
    return [(msg.role, msg.content) for msg in messages or ()]


def test_sharegpt_maps_roles_and_the_top_level_system():
    first, second, third = load_examples(FIXTURES / "sharegpt_good.jsonl")
    assert roles(first.messages) == [("user", "2+2?"), ("assistant", "4")]
    assert [msg.role for msg in second.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert roles(third.messages)[0] == ("system", "Answer in one word.")


def test_preference_strings():
    first, _ = load_examples(FIXTURES / "preference_good.jsonl")
    assert roles(first.messages) == [("user", "2+2?"), ("assistant", "4")]
    assert roles(first.rejected) == [("assistant", "5")]
    assert first.to_dict()["rejected"] == [{"role": "assistant", "content": "5"}]


def test_preference_message_lists_drop_the_repeated_prompt():
    first, second, third = load_examples(FIXTURES / "preference_conversational_good.jsonl")
    assert roles(first.messages) == [("user", "2+2?"), ("assistant", "4")]
    # chosen and rejected repeat the prompt (system, user) before the answer: kept once.
    assert roles(second.messages) == [
        ("system", "Be brief."),
        ("user", "Capital of France?"),
        ("assistant", "Paris"),
    ]
    assert roles(second.rejected) == [("assistant", "Lyon")]
    # A string prompt; chosen repeats it as a user turn, rejected holds the answer alone.
    assert roles(third.messages) == [("user", "Hi"), ("assistant", "Hello!")]
    assert roles(third.rejected) == [("assistant", "What?")]


def test_anthropic_hh_prompt_is_every_turn_before_the_last_answer():
    _, multi = load_examples(FIXTURES / "anthropic_hh_good.jsonl")
    assert roles(multi.messages) == [
        ("user", "Hi"),
        ("assistant", "Hello! How can I help?"),
        ("user", "Tell me a fact."),
        ("assistant", "Honey never spoils."),
    ]
    assert roles(multi.rejected) == [("assistant", "No.")]
    assert multi.target == "Honey never spoils."


def test_anthropic_hh_prompt_mismatch_says_where_they_diverge(tmp_path):
    row = {
        "chosen": "\n\nHuman: What is 3+3?\n\nAssistant: 6",
        "rejected": "\n\nHuman: What is 3+4?\n\nAssistant: 6",
    }
    [problem] = read_examples(write(tmp_path, "hh.jsonl", jsonl(row)))[1]
    assert problem.kind == "prompt_mismatch"
    assert "turn 1" in problem.message and "character 11" in problem.message
    assert "'4?'" in problem.message and "'3?'" in problem.message


def test_sharegpt_preference_prompt_plus_answers():
    _, second = load_examples(FIXTURES / "sharegpt_preference_good.jsonl")
    assert [msg.role for msg in second.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert (second.target, roles(second.rejected)) == ("Paris", [("assistant", "Lyon")])


def test_text_is_one_assistant_turn_with_no_prompt():
    first, _, third = load_examples(FIXTURES / "text_good.jsonl")
    assert first.prompt == () and first.messages[0].role == "assistant"
    assert first.target.startswith("table: 1-10015132-11\ncolumns:")
    assert third.target == "  Leading spaces are kept as they are."


# ---- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (("conversations", "chosen", "rejected"), "sharegpt_preference"),
        (("conversations", "tools"), "sharegpt"),
        (("prompt", "chosen", "rejected"), "preference"),
        (("prompt", "chosen", "rejected", "completion"), "preference"),
        (("chosen", "rejected"), "anthropic_hh"),
        (("messages", "label"), "chat"),
        (("input", "preferred_output", "non_preferred_output"), "openai_dpo"),
        (("prompt", "completion"), "prompt_completion"),
        (("instruction", "input", "output"), "alpaca"),
        (("text", "label"), "classification"),
        (("text",), "text"),
        (("text", "meta"), "text"),
        (("question", "answer"), None),
        (("chosen",), None),
    ],
)
def test_detection_does_not_confuse_formats(keys, expected):
    assert detect_format(dict.fromkeys(keys, "x")) == expected


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": [], "label": True}, "kto"),
        ({"conversations": [], "label": False}, "kto"),
        ({"prompt": "x", "completion": "y", "label": False}, "kto"),
        ({"messages": [], "label": "true"}, "chat"),  # a string label is a class
        ({"text": "x", "label": True}, "classification"),  # no conversation: a boolean class
        ({"prompt": "x", "chosen": "y", "rejected": "z", "label": True}, "preference"),
    ],
)
def test_a_boolean_label_on_a_conversation_is_kto_feedback(record, expected):
    assert detect_format(record) == expected


def test_every_format_is_detectable():
    assert list(FORMAT_KEYS) == [
        "sharegpt_preference",
        "preference",
        "openai_dpo",
        "anthropic_hh",
        "kto",
        "sharegpt",
        "chat",
        "prompt_completion",
        "alpaca",
        "classification",
        "text",
    ]
    assert set(FORMAT_KEYS) == set(FORMATS)


def test_explicit_format_checks_its_keys(tmp_path):
    path = write(tmp_path, "x.jsonl", jsonl({"text": "hello", "label": "greeting"}))
    [example] = load_examples(path, format="text")
    assert (example.format, example.target) == ("text", "hello")
    [problem] = read_examples(path, format="sharegpt")[1]
    assert (problem.kind, problem.field) == ("format_mismatch", "conversations")


def test_field_error_carries_its_kind():
    with pytest.raises(FieldError) as info:
        FORMATS["chat"]({"messages": [m("user", "hi"), m("user", "again"), m("assistant", "yes")]})
    error = info.value
    assert (error.field, error.kind) == ("messages[1].role", "consecutive_roles")
    assert str(error) == f"{error.field}: {error.message}"


# ---- one malformed row per problem kind ---------------------------------------------------------

GOOD_CHAT = {"messages": [m("user", "Hi"), m("assistant", "Hello")]}

# kind -> (file name, content, line, field) of the one problem that content gives
KIND_CASES: dict[str, tuple[str, str | bytes, int, str]] = {
    # read problems: the row could not be read at all
    "invalid_json": ("x.jsonl", jsonl(GOOD_CHAT) + '{"messages": [\n', 2, ""),
    "not_an_object": ("x.json", '[\n {"text": "hi"},\n "just a string"\n]\n', 3, ""),
    "invalid_utf8": ("x.jsonl", jsonl(GOOD_CHAT).encode() + b'{"text": "\xff"}\n', 2, ""),
    "wrong_column_count": ("x.csv", "text,label\nhi,greeting\nbye,farewell,extra\n", 3, ""),
    "bad_header": ("x.csv", "text,text\nhi,there\n", 1, ""),
    "invalid_csv": ("x.csv", "text,label\nhi,greeting\nbroken\rline,x\n", 3, ""),
    # field problems: the row was read but does not normalize
    "missing_field": (
        "x.jsonl",
        jsonl({"messages": [{"role": "user"}, m("assistant", "Hello")]}),
        1,
        "messages[0].content",
    ),
    "wrong_type": ("x.jsonl", jsonl({"prompt": ["2+2="], "completion": "4"}), 1, "prompt"),
    "unknown_role": (
        "x.jsonl",
        jsonl({"conversations": [t("human", "Hi"), t("bot", "Hello")]}),
        1,
        "conversations[1].from",
    ),
    "empty_content": ("x.jsonl", jsonl({"text": " \n ", "label": "blank"}), 1, "text"),
    "no_target": ("x.jsonl", jsonl({"messages": [m("system", "Be brief."), m("user", "Hi")]}), 1, "messages"),
    "ends_not_assistant": (
        "x.jsonl",
        jsonl({"conversations": [t("human", "Hi"), t("gpt", "Hello"), t("human", "Bye")]}),
        1,
        "conversations[2].from",
    ),
    "consecutive_roles": (
        "x.jsonl",
        jsonl({"messages": [m("user", "Hi"), m("assistant", "Hello"), m("assistant", "Hello?")]}),
        1,
        "messages[2].role",
    ),
    "invalid_weight": (
        "x.jsonl",
        jsonl({"messages": [m("user", "Hi"), m("assistant", "Hey", weight=2)]}),
        1,
        "messages[1].weight",
    ),
    "prompt_mismatch": (
        "x.jsonl",
        jsonl(
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
                "rejected": "\n\nHuman: Hey\n\nAssistant: Go away",
            }
        ),
        1,
        "rejected",
    ),
    "bad_label": ("x.jsonl", jsonl({"text": "Where is my card?", "label": ["card_arrival"]}), 1, "label"),
    "format_mismatch": (
        "x.jsonl",
        jsonl(GOOD_CHAT, GOOD_CHAT, {"conversations": [t("human", "Hi")]}),
        3,
        "messages",
    ),
    # beyond the basic list: tool definitions on feedback rows, and a broken \u escape inside a valid UTF-8 file
    "unsupported_field": (
        "x.jsonl",
        jsonl({**GOOD_CHAT, "label": True, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        1,
        "tools",
    ),
}
# The same kind from a field, not a line: a lone surrogate escape cannot be saved as UTF-8.
SURROGATE = (
    "x.jsonl",
    '{"messages": [{"role": "user", "content": "Hi \\ud83d"}, {"role": "assistant", "content": "Hello"}]}\n',
    1,
    "messages[0].content",
)

TASK_KINDS = {
    "invalid_json", "not_an_object", "invalid_utf8", "wrong_column_count", "bad_header", "missing_field",
    "wrong_type", "unknown_role", "empty_content", "no_target", "ends_not_assistant", "consecutive_roles",
    "invalid_weight", "prompt_mismatch", "bad_label", "format_mismatch",
}  # fmt: skip


def test_every_problem_kind_has_a_case():
    assert set(KIND_CASES) >= TASK_KINDS


@pytest.mark.parametrize(
    ("kind", "case"), [*KIND_CASES.items(), ("invalid_utf8", SURROGATE)], ids=[*KIND_CASES, "surrogate"]
)
def test_one_malformed_row_per_kind(tmp_path, kind, case):
    name, content, line, field = case
    examples, problems = read_examples(write(tmp_path, name, content))
    assert where(problems) == [(line, kind, field)]
    [problem] = problems
    expected = f"{tmp_path / name}:{line}: " + (f"{field}: " if field else "") + problem.message
    assert str(problem) == expected


@pytest.mark.parametrize("name", ["x.jsonl", "x.json"])
def test_valid_json_that_python_cannot_load_is_a_problem_not_a_crash(tmp_path, name):
    # Nested arrays deep enough to hit the recursion limit, and an integer over Python's 4,300 digits.
    content = jsonl(GOOD_CHAT) + "[" * 100_000 + "]" * 100_000 + "\n" + '{"n": ' + "9" * 5000 + "}\n"
    if name == "x.json":
        content = "[\n" + json.dumps(GOOD_CHAT) + ",\n" + '{"n": ' + "9" * 5000 + "}\n]"
    examples, problems = read_examples(write(tmp_path, name, content))
    assert len(examples) == 1 and {p.kind for p in problems} == {"invalid_json"}
    assert "Exceeds the limit" in problems[-1].message


def test_file_level_failures_still_raise(tmp_path):
    with pytest.raises(TunekitError, match="file not found"):
        read_examples(tmp_path / "missing.jsonl")
    with pytest.raises(TunekitError, match="is a directory"):
        read_examples(tmp_path)
    with pytest.raises(TunekitError, match="unknown extension '.txt'"):
        read_examples(write(tmp_path, "x.txt", "hello"))
    with pytest.raises(TunekitError, match="UTF-16"):
        read_examples(write(tmp_path, "x.jsonl", jsonl(GOOD_CHAT).encode("utf-16")))


# ---- real files ---------------------------------------------------------------------------------


def test_real_llamafactory_dpo_is_sharegpt_preference():
    examples = load_examples(shared("llamafactory-demo/dpo_en_demo.json"))
    assert len(examples) == 300 and {e.format for e in examples} == {"sharegpt_preference"}
    assert all(e.messages[-2].role == "user" and len(e.rejected or ()) == 1 for e in examples)
    # 80 rows open with a system turn inside `conversations`.
    assert sum(e.messages[0].role == "system" for e in examples) == 80


def test_real_llamafactory_tool_calls_are_read_and_checked():
    path = shared("llamafactory-demo/glaive_toolcall_en_demo.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    examples, problems = read_examples(path)
    assert {e.format for e in examples} == {"sharegpt"}
    assert len(examples) + len(problems) == len(rows) == 300  # every row is kept or reported
    with_tool_turns = sum(any(turn["from"] == "function_call" for turn in r["conversations"]) for r in rows)
    assert sum(any(m.tool_calls for m in e.messages) for e in examples) == with_tool_turns - 1 == 152
    assert all(e.tools for e in examples if any(m.tool_calls for m in e.messages))
    # The one call that does not fit its declared schema (tests/test_tool_calls.py has the details).
    assert [(p.kind, p.field) for p in problems] == [
        ("wrong_argument_type", "conversations[3].value.arguments.calories_per_item")
    ]


def test_real_llamafactory_kto_is_kto_feedback():
    examples = load_examples(shared("llamafactory-demo/kto_en_demo.json"))
    assert len(examples) == 300 and {e.format for e in examples} == {"kto"}
    assert sorted({e.desirable for e in examples}) == [False, True] and {e.label for e in examples} == {None}
    # Read as chat (data.format: chat), the booleans are class labels, as before the kto format.
    as_chat = load_examples(shared("llamafactory-demo/kto_en_demo.json"), format="chat")
    assert sorted({e.label for e in as_chat}) == ["false", "true"]


def test_real_mlx_wikisql_is_raw_text():
    path = shared("mlx-wikisql/train.jsonl")
    examples = load_examples(path)
    assert len(examples) == 1000 and {e.format for e in examples} == {"text"}
    assert [e.line for e in examples] == list(range(1, 1001))
    assert all(
        e.prompt == () and e.target == json.loads(line)["text"]
        for e, line in zip(examples, path.read_text(encoding="utf-8").splitlines(), strict=True)
    )


def test_real_openai_toy_chat_has_no_problems():
    examples, problems = read_examples(shared("openai-cookbook-chat/toy_chat_fine_tuning.jsonl"))
    assert (len(examples), problems) == (5, [])


# ---- random input: only TunekitError, never a crash --------------------------------------------

# Keys and strings that the formats look for, so random records often reach deep into a normalizer.
KEYS = sorted({k for keys in FORMAT_KEYS.values() for k in keys} | {
    "role", "content", "weight", "from", "value", "system", "input", "history", "tools", "functions",
})  # fmt: skip
WORDS = ["user", "assistant", "system", "human", "gpt", "function_call", "tool", "", " ", "\n\nHuman: hi",
         "\n\nAssistant: yo", "\n\nAssistant:", "Human: x", "[]", "\ud800"]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.integers()
    | st.floats(allow_nan=True)
    | st.sampled_from(WORDS)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=20,
)
records = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5)
rows = st.lists(records | json_values, min_size=1, max_size=6)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read_and_load(path: Path, format: str = "auto") -> None:
    """Both entry points; anything but a TunekitError escapes and fails the test."""
    try:
        examples, problems = read_examples(path, format)
        assert all(isinstance(p, Problem) for p in problems)
        load_examples(path, format)
    except TunekitError:
        pass


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]))
def test_random_bytes_raise_only_tunekit_errors(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(data)
        read_and_load(path)


@FUZZ
@given(values=rows, format=st.sampled_from(["auto", *FORMATS]), as_array=st.booleans())
def test_random_json_records_raise_only_tunekit_errors_and_nothing_is_dropped(values, format, as_array):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("x.json" if as_array else "x.jsonl")
        text = json.dumps(values, indent=1) if as_array else "".join(json.dumps(v) + "\n" for v in values)
        path.write_text(text, encoding="utf-8")
        read_and_load(path, format)
        try:
            examples, problems = read_examples(path, format)
        except TunekitError:
            return
        # Every row is an example or an error on its line, never both, never neither; warnings are
        # about kept rows.
        errors = [p for p in problems if p.severity == "error"]
        assert len(examples) + len(errors) == len(values)
        assert not {e.line for e in examples} & {p.line for p in errors}
        assert {p.line for p in problems if p.severity == "warning"} <= {e.line for e in examples}


GOOD_ROWS = [json.loads(line) for path in sorted(FIXTURES.glob("*_good.jsonl")) for line in path.open()]


def paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indexes) into a JSON value, the value itself first."""
    found = [prefix]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found += paths(child, (*prefix, key))
    return found


@st.composite
def mutated_rows(draw: st.DrawFn) -> dict:
    """A good row of some format with one to three values replaced by random JSON, or keys removed."""
    row = copy.deepcopy(draw(st.sampled_from(GOOD_ROWS)))
    for _ in range(draw(st.integers(1, 3))):
        inner = paths(row)[1:]
        if not inner:
            break
        *parent_path, key = draw(st.sampled_from(inner))
        parent = row
        for step in parent_path:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw(json_values)
    return row


@FUZZ
@given(values=st.lists(mutated_rows(), min_size=1, max_size=4), format=st.sampled_from(["auto", *FORMATS]))
def test_mutated_good_rows_raise_only_tunekit_errors_and_nothing_is_dropped(values, format):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        path.write_text("".join(json.dumps(v) + "\n" for v in values), encoding="utf-8")
        try:
            examples, problems = read_examples(path, format)
        except TunekitError:
            return
        errors = [p for p in problems if p.severity == "error"]
        assert len(examples) + len(errors) == len(values)
        assert all(e.messages and e.messages[-1].role == "assistant" for e in examples)
        read_and_load(path, format)
