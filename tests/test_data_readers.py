"""Reading data files (line numbers, encodings, bad rows) and normalizing the four formats."""

from __future__ import annotations

import json

import pytest

from conftest import jsonl, write
from conftest import shared_data as shared
from tunekit.data import FORMATS, Message, detect_format, load_examples, read_examples, read_records
from tunekit.errors import DataError, TunekitError


def strs(problems: list) -> list[str]:
    """Problems as their "file:line: field: message" strings."""
    return [str(p) for p in problems]


# ---- read_records: JSON Lines -------------------------------------------------------------------


def test_jsonl_lines_are_one_based_and_blank_lines_are_skipped(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"a": 1}\n\n   \n{"a": 2}\r\n{"a": 3}')
    records, problems = read_records(path)
    assert records == [(1, {"a": 1}), (4, {"a": 2}), (5, {"a": 3})]
    assert problems == []


def test_jsonl_bad_lines_name_file_line_and_fix(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"a": 1}\n{"a": 1 "b": 2}\n[1, 2]\n"text"\n{"a": 5}\n')
    records, problems = read_records(path)
    assert records == [(1, {"a": 1}), (5, {"a": 5})]
    assert strs(problems) == [
        f"{path}:2: invalid JSON (Expecting ',' delimiter at column 9); each line must be one JSON object",
        f"{path}:3: expected a JSON object {{...}}, found an array [...]; each line must be one JSON object",
        f"{path}:4: expected a JSON object {{...}}, found a string; each line must be one JSON object",
    ]


def test_ndjson_extension_and_uppercase_suffix(tmp_path):
    assert read_records(write(tmp_path, "x.ndjson", '{"a": 1}\n'))[0] == [(1, {"a": 1})]
    assert read_records(write(tmp_path, "y.JSONL", '{"a": 1}\n'))[0] == [(1, {"a": 1})]


def test_raw_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"a": "one\u2028two"}\n{"a": 2}\n')
    assert read_records(path) == ([(1, {"a": "one\u2028two"}), (2, {"a": 2})], [])


# ---- read_records: JSON -------------------------------------------------------------------------


def test_json_array_reports_the_line_each_element_starts_on(tmp_path):
    rows = [{"a": 1}, {"a": 2, "b": [1, 2]}, {"a": 3}]
    path = write(tmp_path, "x.json", json.dumps(rows, indent=2))
    records, problems = read_records(path)
    lines = path.read_text().split("\n")
    assert [r for _, r in records] == rows
    assert [line for line, _ in records] == [2, 5, 12]
    assert all(lines[n - 1].strip() == "{" for n, _ in records)
    assert problems == []


def test_json_array_non_object_element_and_syntax_error(tmp_path):
    path = write(tmp_path, "x.json", '[\n  {"a": 1},\n  42,\n  {"a": 3},\n  {"a": }\n]\n')
    records, problems = read_records(path)
    assert records == [(2, {"a": 1}), (4, {"a": 3})]
    assert str(problems[0]) == f"{path}:3: array element 1 is a number, not an object {{...}}"
    assert str(problems[1]).startswith(f"{path}:5: invalid JSON (Expecting value at column 9)")


def test_json_array_trailing_comma_and_extra_data(tmp_path):
    _, problems = read_records(write(tmp_path, "a.json", '[{"a": 1},\n]'))
    assert str(problems[0]).startswith(f"{tmp_path / 'a.json'}:2: invalid JSON (Expecting value")
    _, problems = read_records(write(tmp_path, "b.json", '[{"a": 1}]\n\n{"b": 2}'))
    assert str(problems[0]).startswith(f"{tmp_path / 'b.json'}:3: extra data after the closing ']'")


def test_json_that_is_not_an_array_is_read_as_json_lines(tmp_path):
    path = write(tmp_path, "x.json", '{"a": 1}\n{"a": 2}\n')
    assert read_records(path) == ([(1, {"a": 1}), (2, {"a": 2})], [])
    pretty = write(tmp_path, "one.json", '\n{\n  "a": 1\n}\n')
    assert read_records(pretty) == ([(2, {"a": 1})], [])


def test_empty_json_array(tmp_path):
    assert read_records(write(tmp_path, "x.json", " [ ] \n")) == ([], [])


# ---- read_records: CSV / TSV --------------------------------------------------------------------


def test_csv_multiline_quoted_field_keeps_physical_line_numbers(tmp_path):
    text = 'text,label\n"first\nsecond\nthird",a\n\nplain,b\n"has ""quotes"", and a comma",c\n'
    records, problems = read_records(write(tmp_path, "x.csv", text))
    assert records == [
        (2, {"text": "first\nsecond\nthird", "label": "a"}),
        (6, {"text": "plain", "label": "b"}),
        (7, {"text": 'has "quotes", and a comma', "label": "c"}),
    ]
    assert problems == []


def test_csv_wrong_column_counts_are_problems(tmp_path):
    path = write(tmp_path, "x.csv", "text,label\nok,a\ntoo,many,fields\nfew\n")
    records, problems = read_records(path)
    assert records == [(2, {"text": "ok", "label": "a"})]
    assert strs(problems) == [
        f"{path}:3: expected 2 columns (text, label), found 3; quote fields that hold commas or line breaks",
        f"{path}:4: expected 2 columns (text, label), found 1; quote fields that hold commas or line breaks",
    ]


def test_csv_crlf_and_duplicate_header(tmp_path):
    assert read_records(write(tmp_path, "a.csv", "text,label\r\nhi,x\r\n"))[0] == [
        (2, {"text": "hi", "label": "x"})
    ]
    _, problems = read_records(write(tmp_path, "b.csv", "text,text\nhi,x\n"))
    assert strs(problems) == [
        f"{tmp_path / 'b.csv'}:1: duplicate column name(s) text in the header row; rename them"
    ]


def test_tsv_quotes_are_literal(tmp_path):
    # A real-world TSV (e.g. the UCI SMS spam set) has fields that start with a quote and never close it.
    path = write(tmp_path, "x.tsv", 'label\ttext\nham\t"Hi there" she said\nspam\t"win now\nham\tok\n')
    records, problems = read_records(path)
    assert [(n, r["text"]) for n, r in records] == [(2, '"Hi there" she said'), (3, '"win now'), (4, "ok")]
    assert problems == []


# ---- read_records: encodings --------------------------------------------------------------------


def test_invalid_utf8_is_a_problem_on_its_line_not_a_crash(tmp_path):
    path = write(tmp_path, "x.jsonl", b'{"a": 1}\n{"a": "caf\xe9"}\n{"a": 3}\n')
    records, problems = read_records(path)
    assert records == [(1, {"a": 1}), (3, {"a": 3})]
    assert strs(problems) == [f"{path}:2: not valid UTF-8 (byte 0xe9 at byte 11); save the file as UTF-8"]


def test_invalid_utf8_in_csv_and_json_array(tmp_path):
    records, problems = read_records(write(tmp_path, "x.csv", b"text,label\nok,a\nbad\xff,b\nfine,c\n"))
    assert [n for n, _ in records] == [2, 4]
    assert [str(p).split(": ")[0] for p in problems] == [f"{tmp_path / 'x.csv'}:3"]
    records, problems = read_records(write(tmp_path, "x.json", b'[\n{"a": 1},\n{"a": "\xff"},\n{"a": 3}\n]'))
    assert [n for n, _ in records] == [2, 4]
    assert [str(p).split(": ")[0] for p in problems] == [f"{tmp_path / 'x.json'}:3"]


def test_utf8_bom_is_accepted(tmp_path):
    assert read_records(write(tmp_path, "x.jsonl", b'\xef\xbb\xbf{"a": 1}\n'))[0] == [(1, {"a": 1})]
    assert read_records(write(tmp_path, "x.csv", b"\xef\xbb\xbftext,label\nhi,x\n"))[0] == [
        (2, {"text": "hi", "label": "x"})
    ]


def test_utf16_file_says_to_save_as_utf8(tmp_path):
    with pytest.raises(TunekitError, match="UTF-16 encoded; save it as UTF-8"):
        read_records(write(tmp_path, "x.jsonl", '{"a": 1}\n'.encode("utf-16")))


# ---- read_records: the path itself --------------------------------------------------------------


def test_missing_file_directory_and_unknown_extension(tmp_path):
    with pytest.raises(TunekitError, match="file not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(TunekitError, match=r"is a directory; pass one data file \(\.jsonl, \.ndjson"):
        read_records(tmp_path)
    with pytest.raises(
        TunekitError, match=r"unknown extension '\.txt'; supported: \.jsonl, \.ndjson, \.json, \.csv"
    ):
        read_records(write(tmp_path, "x.txt", "hello"))


# ---- formats ------------------------------------------------------------------------------------


def test_detect_format_by_keys():
    assert detect_format({"messages": [], "label": "x"}) == "chat"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"text": "a", "label": 1}) == "classification"
    assert detect_format({"text": "a"}) == "text"
    assert detect_format({"question": "a"}) is None
    assert set(FORMATS) >= {"chat", "prompt_completion", "alpaca", "classification"}


def test_prompt_completion(tmp_path):
    path = write(tmp_path, "pc.jsonl", jsonl({"prompt": "2+2=", "completion": " 4"}))
    [ex] = load_examples(path)
    assert ex.messages == (Message("user", "2+2="), Message("assistant", " 4"))
    assert (ex.source, ex.line, ex.format, ex.label) == (str(path), 1, "prompt_completion", None)
    assert ex.raw == {"prompt": "2+2=", "completion": " 4"}


def test_prompt_completion_bad_rows(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "a", "answer": "b"},
        {"prompt": "a", "completion": ""},
        {"prompt": 3, "completion": "b"},
    ]
    path = write(tmp_path, "pc.jsonl", jsonl(*rows))
    examples, problems = read_examples(path)
    assert [e.line for e in examples] == [1]
    assert strs(problems) == [
        f"{path}:2: completion: missing; prompt_completion rows need keys prompt, completion (found: prompt, answer)",
        f"{path}:3: completion: must be a non-empty string, found ''",
        f"{path}:4: prompt: must be a non-empty string, found the number 3",
    ]


def test_chat_with_weights_and_label(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "weight": 0},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "weight": 1},
        ],
        "label": True,
    }
    path = write(tmp_path, "chat.jsonl", jsonl(row))
    [ex] = load_examples(path, format="chat")  # a boolean label on a conversation reads as kto by default
    assert [m.weight for m in ex.messages] == [1, 1, 0, 1, 1]
    assert ex.messages[2] == Message("assistant", "Hello!", 0)
    assert (ex.target, ex.label, ex.format) == ("4", "true", "chat")
    [rated] = load_examples(path)
    assert (rated.format, rated.desirable, rated.label) == ("kto", True, None)


def test_chat_bad_rows(tmp_path):
    def chat(*messages):
        return {"messages": [{"role": r, "content": c, **extra} for r, c, extra in messages]}

    rows = [
        chat(("user", "hi", {}), ("assistant", "yo", {})),
        chat(("user", "hi", {"weight": 1}), ("assistant", "yo", {})),
        chat(("user", "hi", {}), ("assistant", "yo", {"weight": 2})),
        chat(("user", "hi", {}), ("assistant", "yo", {"weight": 0})),
        chat(("user", "hi", {}), ("assistant", "yo", {}), ("user", "and?", {})),
        chat(("tool", "hi", {}), ("assistant", "yo", {})),
        chat(("user", "  ", {}), ("assistant", "yo", {})),
        {"messages": []},
        chat(("user", "hi", {}), ("assistant", "yo", {"weight": True})),
    ]
    path = write(tmp_path, "chat.jsonl", jsonl(*rows))
    examples, problems = read_examples(path)
    assert [e.line for e in examples] == [1]
    assert strs(problems) == [
        f"{path}:2: messages[0].weight: only assistant messages take a weight; remove it from this user message",
        f"{path}:3: messages[1].weight: must be 0 (no loss on this turn) or 1, found 2",
        f"{path}:4: messages: every assistant message has weight 0, so nothing is learned; set one to 1",
        f"{path}:5: messages[2].role: the last message must be the assistant's answer, found 'user'",
        f"{path}:6: messages[0].role: a tool result with no call before it; a tool result follows the "
        "assistant turn whose call it answers",
        f"{path}:7: messages[0].content: must be a non-empty string, found '  '",
        f"{path}:8: messages: must be a non-empty list of {{role, content}} objects, found a list",
        f"{path}:9: messages[1].weight: must be 0 (no loss on this turn) or 1, found True",
    ]


def test_alpaca_with_input_system_and_history(tmp_path):
    rows = [
        {"instruction": "Add.", "input": "2, 2", "output": "4"},
        {"instruction": "Hi", "input": "", "output": "Hello", "system": "Be kind.", "history": [["a", "b"]]},
    ]
    first, second = load_examples(write(tmp_path, "a.json", json.dumps(rows, indent=1)))
    assert first.messages == (Message("user", "Add.\n\n2, 2"), Message("assistant", "4"))
    assert [(m.role, m.content) for m in second.messages] == [
        ("system", "Be kind."),
        ("user", "a"),
        ("assistant", "b"),
        ("user", "Hi"),
        ("assistant", "Hello"),
    ]
    assert (first.line, second.line, first.format) == (2, 7, "alpaca")


def test_alpaca_bad_history(tmp_path):
    path = write(tmp_path, "a.jsonl", jsonl({"instruction": "x", "output": "y", "history": [["only one"]]}))
    assert strs(read_examples(path)[1]) == [
        f"{path}:1: history[0]: must be a [user, assistant] pair of strings, found a list"
    ]


def test_classification_label_string_or_integer(tmp_path):
    path = write(tmp_path, "c.jsonl", jsonl({"text": "great", "label": 1}, {"text": "bad", "label": "neg"}))
    first, second = load_examples(path)
    assert first.messages == (Message("user", "great"), Message("assistant", "1"))
    assert (first.label, second.label, second.target) == ("1", "neg", "neg")
    bad = write(tmp_path, "d.jsonl", jsonl({"text": "x", "label": 1.5}))
    assert strs(read_examples(bad)[1]) == [
        f"{bad}:1: label: must be a non-empty string or an integer, found the number 1.5"
    ]


def test_auto_detection_uses_the_most_common_format(tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"prompt": "p", "completion": "c"}]
    path = write(tmp_path, "c.jsonl", jsonl(*rows))
    examples, problems = read_examples(path)
    assert [e.format for e in examples] == ["classification", "classification"]
    assert strs(problems) == [
        f"{path}:3: text: missing; classification rows need keys text, label (found: prompt, completion)"
    ]


def test_explicit_format_and_unknown_format(tmp_path):
    path = write(tmp_path, "c.jsonl", jsonl({"text": "a", "label": "x", "prompt": "p", "completion": "c"}))
    assert load_examples(path)[0].format == "prompt_completion"
    assert load_examples(path, format="classification")[0].format == "classification"
    with pytest.raises(
        TunekitError, match="unknown data format 'openai'; use one of: auto, chat, prompt_completion"
    ):
        read_examples(path, format="openai")


def test_columns_mapping_renames_before_detection_and_raw_keeps_the_source(tmp_path):
    path = write(tmp_path, "b.csv", "text,category\nwhere is my card?,card_arrival\n")
    [ex] = load_examples(path, columns={"label": "category"})
    assert (ex.format, ex.label, ex.line) == ("classification", "card_arrival", 2)
    assert ex.raw == {"text": "where is my card?", "category": "card_arrival"}
    with pytest.raises(
        DataError, match=r"columns: 'categry' \(for label\) not found in the file; its keys are text"
    ):
        read_examples(path, columns={"label": "categry"})


def test_nothing_detected_names_keys_and_formats(tmp_path):
    path = write(tmp_path, "q.jsonl", jsonl({"question": "2+2?", "answer": "4"}))
    with pytest.raises(DataError) as info:
        read_examples(path)
    message = str(info.value)
    assert "no known format in keys question, answer" in message
    assert "prompt_completion (prompt, completion)" in message and "classification (text, label)" in message


def test_load_examples_raises_on_any_problem_and_on_no_examples(tmp_path):
    path = write(tmp_path, "x.jsonl", jsonl({"prompt": "a", "completion": "b"}) + "oops\n")
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert info.value.problems == [
        f"{path}:2: invalid JSON (Expecting value at column 1); each line must be one JSON object"
    ]
    assert "1 rows read" in str(info.value)
    with pytest.raises(DataError, match="no examples"):
        load_examples(write(tmp_path, "empty.jsonl", "\n\n"))


def test_problems_are_sorted_by_line(tmp_path):
    path = write(
        tmp_path,
        "x.jsonl",
        jsonl({"prompt": "a", "completion": ""}) + "oops\n" + jsonl({"prompt": 1, "completion": "b"}),
    )
    _, problems = read_examples(path)
    assert [p.line for p in problems] == [1, 2, 3]


# ---- real files ---------------------------------------------------------------------------------


def test_real_openai_toy_chat():
    examples = load_examples(shared("openai-cookbook-chat/toy_chat_fine_tuning.jsonl"))
    assert len(examples) == 5 and {e.format for e in examples} == {"chat"}
    assert [e.line for e in examples] == [1, 2, 3, 4, 5]
    assert sum(not any(m.role == "system" for m in e.messages) for e in examples) == 1
    assert sum(not any(m.role == "user" for m in e.messages) for e in examples) == 1
    assert sorted(len(e.messages) for e in examples) == [2, 2, 3, 3, 9]


def test_real_alpaca_demo():
    path = shared("llamafactory-demo/alpaca_en_demo.json")
    examples = load_examples(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert len(examples) == 999 and {e.format for e in examples} == {"alpaca"}
    assert all(lines[e.line - 1].strip() == "{" for e in examples)


def test_real_banking77_csv():
    path = shared("banking77/train.csv")
    examples = load_examples(path, columns={"label": "category"})
    assert len(examples) == 10_003
    assert len({e.label for e in examples}) == 77
    assert {e.format for e in examples} == {"classification"}
    # Some texts span lines (quoted newlines), so the last row starts past line 10,004.
    assert examples[-1].line == len(path.read_bytes().split(b"\n")) - 1


# ---- every row accounted for after a bad one (issue 20, item 8) ----------------------------------

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(20)]


def _array_with(element_5: str) -> str:
    """ROWS as a pretty JSON array (one element a line, as editors write them) with element 5 replaced."""
    elements = [json.dumps(r) for r in ROWS]
    elements[5] = element_5
    return "[\n  " + ",\n  ".join(elements) + "\n]\n"


BROKEN_ELEMENTS = {
    "missing_value": '{"prompt": "question 5", "completion": }',
    "unclosed_string": '{"prompt": "question 5, "completion": "answer 5"}',
    "missing_brace": '{"prompt": "question 5", "completion": "answer 5"',
    "extra_brace": '{"prompt": "question 5", "completion": "answer 5"}}',
    "missing_comma": '{"prompt": "question 5", "completion": "answer 5"} {"prompt": "junk"}',
    "bare_word": "nonsense",
    "not_an_object": '["question 5", "answer 5"]',
    "brackets_in_strings": '{"prompt": "q [{ 5", "completion": "a ]} 5" "oops"}',
}


@pytest.mark.parametrize("broken", sorted(BROKEN_ELEMENTS))
def test_json_array_elements_after_a_bad_one_are_still_read(tmp_path, broken):
    """Before: reading stopped at the first syntax error, so 20 rows with one bad reported 5."""
    path = write(tmp_path, "x.json", _array_with(BROKEN_ELEMENTS[broken]))
    records, problems = read_records(path)
    kept = [r for _, r in records]
    assert [r for r in ROWS if r in kept] == [r for i, r in enumerate(ROWS) if i != 5]
    assert [p.line for p in problems if p.severity == "error"] == [7], strs(problems)  # element 5's line
    assert len(records) + len({p.line for p in problems}) == len(ROWS)


def test_json_array_pretty_printed_elements_resync_on_their_indentation(tmp_path):
    """A missing '}' leaves the brackets unbalanced to the end: the next element at the same
    indentation that parses is where reading goes on, not a nested object inside one."""
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(6)]  # fmt: skip
    text = json.dumps(rows, indent=2)
    lines = text.split("\n")
    second = [i for i, line in enumerate(lines) if line == "  {"][2]  # row 2's first line
    end = next(i for i in range(second, len(lines)) if lines[i] == "  },")
    lines[end] = "  ,"  # row 2 loses its closing brace
    records, problems = read_records(write(tmp_path, "x.json", "\n".join(lines)))
    assert [r for _, r in records] == rows[:2] + rows[3:]
    assert len([p for p in problems if p.severity == "error"]) == 1


def test_json_array_trailing_comma_after_a_bad_element(tmp_path):
    path = write(tmp_path, "x.json", '[\n{"a": 1},\n{"a": },\n{"a": 3},\n]\n')
    records, problems = read_records(path)
    assert records == [(2, {"a": 1}), (4, {"a": 3})]
    assert [p.line for p in problems] == [3, 5]


def _csv(rows: list[str]) -> str:
    return "prompt,completion\n" + "".join(r + "\n" for r in rows)


CSV_ROWS = [f"question {i},answer {i}" for i in range(10)]


def test_csv_unclosed_quote_rejects_its_row_and_reads_the_rest(tmp_path):
    """Before: the open quote swallowed every later line into one field, and the row was kept."""
    rows = list(CSV_ROWS)
    rows[3] = 'question 3,"answer 3'
    records, problems = read_records(write(tmp_path, "x.csv", _csv(rows)))
    assert [n for n, _ in records] == [2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert [(p.line, p.kind) for p in problems] == [(5, "invalid_csv")]
    assert "opened on line 5" in problems[0].message and "not closed" in problems[0].message


def test_csv_quote_closed_mid_field_later_rejects_only_its_row(tmp_path):
    rows = list(CSV_ROWS)
    rows[3] = 'question 3,"answer 3'
    rows[7] = 'question 7,answer" 7'  # a stray quote that "closes" the field opened on row 3
    records, problems = read_records(write(tmp_path, "x.csv", _csv(rows)))
    assert len(records) + len(problems) == 10
    assert [(p.line, p.kind) for p in problems] == [(5, "invalid_csv")]
    assert dict(records)[9] == {"prompt": "question 7", "completion": 'answer" 7'}


def test_csv_huge_field_is_read_and_so_are_the_rows_after_it(tmp_path):
    """Before: a field over csv's 128 KiB limit stopped the read there."""
    rows = list(CSV_ROWS)
    rows[3] = "question 3," + "a" * 300_000
    records, problems = read_records(write(tmp_path, "x.csv", _csv(rows)))
    assert (len(records), problems) == (10, [])
    assert len(dict(records)[5]["completion"]) == 300_000
    import csv

    assert csv.field_size_limit() == 131072  # the module's global limit is restored


def test_csv_header_that_does_not_parse_is_a_file_error(tmp_path):
    with pytest.raises(TunekitError, match=r"x\.csv:1: the header row cannot be parsed"):
        read_records(write(tmp_path, "x.csv", 'prompt,"completion\nq,a\n'))


# ---- duplicate and unused keys (issue 20, item 13) ----------------------------------------------


def test_duplicate_keys_are_a_warning_with_the_line(tmp_path):
    """Before: json kept the last value without a word."""
    text = '{"prompt": "a", "completion": "b"}\n{"prompt": "first", "prompt": "second", "completion": "c"}\n'
    for name, content in (("x.jsonl", text), ("x.json", "[\n" + text.replace("}\n{", "},\n{") + "]\n")):
        records, problems = read_records(write(tmp_path, name, content))
        line = 2 if name == "x.jsonl" else 3  # the array's "[" has a line of its own
        assert records[1] == (line, {"prompt": "second", "completion": "c"})  # kept, with the last value
        [p] = problems
        assert (p.line, p.kind, p.severity) == (line, "duplicate_key", "warning")
        assert "'prompt' given twice" in p.message


def test_duplicate_key_in_a_nested_object_and_when_streaming(tmp_path):
    from tunekit.data.readers import iter_jsonl_records

    row = '{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}'
    path = write(tmp_path, "x.jsonl", jsonl({"prompt": "a", "completion": "b"}) + row + "\n")
    _, problems = read_records(path)
    assert [(p.line, p.kind) for p in problems] == [(2, "duplicate_key")]
    streamed = [x for x in iter_jsonl_records(path) if not isinstance(x, tuple)]
    assert [(p.line, p.kind, p.severity) for p in streamed] == [(2, "duplicate_key", "warning")]


def test_keys_a_format_does_not_use_are_warnings_with_the_line(tmp_path):
    """Before: `system`, `history` and `weight` on prompt/completion rows vanished without a word."""
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "a", "completion": "b", "system": "Be brief.", "weight": 0},
        {"prompt": "a", "completion": "b", "history": [["x", "y"]], "system": "Be kind."},
    ]
    examples, problems = read_examples(write(tmp_path, "x.jsonl", jsonl(*rows)))
    assert len(examples) == 3
    got = [(p.line, p.field, p.kind, p.severity) for p in problems]
    assert got == [
        (2, "system", "unused_key", "warning"),
        (2, "weight", "unused_key", "warning"),
        (3, "history", "unused_key", "warning"),
    ]
    assert "prompt_completion format does not use" in problems[0].message
    assert "1 more rows" in problems[0].message  # `system` is on two rows: one warning says so
    assert len(load_examples(tmp_path / "x.jsonl")) == 3  # warnings do not stop a load


def test_unused_keys_inside_messages(tmp_path):
    row = {
        "messages": [{"role": "user", "content": "a", "name": "bob"}, {"role": "assistant", "content": "b"}]
    }
    _, problems = read_examples(write(tmp_path, "x.jsonl", jsonl(row, row)))
    assert [(p.line, p.field, p.kind) for p in problems] == [(1, "messages[*].name", "unused_key")]
    sg = {"conversations": [{"from": "human", "value": "a", "weight": 1}, {"from": "gpt", "value": "b"}]}
    _, problems = read_examples(write(tmp_path, "y.jsonl", jsonl(sg)))
    assert [(p.line, p.field) for p in problems] == [(1, "conversations[*].weight")]


def test_keys_every_format_reads_are_not_reported(tmp_path):
    rows = {
        "alpaca": {"instruction": "a", "input": "b", "output": "c", "system": "s", "history": [["x", "y"]]},
        "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                 "weight": 1}], "label": "l"},
        "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
                     "system": "s", "tools": ""},
    }  # fmt: skip
    for name, row in rows.items():
        examples, problems = read_examples(write(tmp_path, f"{name}.jsonl", jsonl(row)))
        assert (len(examples), problems) == (1, []), name


# ---- whole-file problems: encodings, line endings, what the path is (issue 20, item 14) ---------


@pytest.mark.parametrize(("codec", "order"), [("utf-16-le", "little-endian"), ("utf-16-be", "big-endian")])
@pytest.mark.parametrize("name", ["x.jsonl", "x.csv", "x.json"])
def test_utf16_without_a_bom_says_to_save_as_utf8(tmp_path, codec, order, name):
    """Before: every line was an invalid JSON row (the zero bytes are valid UTF-8)."""
    text = (
        '{"prompt": "caf\u00e9 \u4f60\u597d", "completion": "b"}\n'
        if name != "x.csv"
        else "text,label\nhi,x\n"
    )
    path = write(tmp_path, name, text.encode(codec))
    with pytest.raises(TunekitError, match=f"looks UTF-16 encoded \\({order}, without a byte-order mark"):
        read_records(path)


def test_cr_only_line_endings_say_how_to_convert(tmp_path):
    """Before: the whole file was one line: one invalid JSON row, or one CSV error."""
    for name, text in (
        ("x.jsonl", jsonl(*ROWS[:3])),
        ("x.csv", _csv(CSV_ROWS[:3])),
        ("x.json", _array_with("{}")),
    ):
        path = write(tmp_path, name, text.replace("\n", "\r"))
        with pytest.raises(TunekitError, match="lone carriage return"):
            read_records(path)
    from tunekit.data.readers import iter_jsonl_records

    with pytest.raises(TunekitError, match="lone carriage return"):
        list(iter_jsonl_records(tmp_path / "x.jsonl"))
    # CRLF is fine, and so is one line that ends with a CR.
    assert len(read_records(write(tmp_path, "y.jsonl", jsonl(*ROWS[:3]).replace("\n", "\r\n")))[0]) == 3
    assert len(read_records(write(tmp_path, "z.jsonl", json.dumps(ROWS[0]) + "\r"))[0]) == 1


def test_a_symlink_to_a_device_is_refused(tmp_path):
    """Before: a device was read as a file (/dev/null as an empty one; /dev/zero until memory ran out,
    so this test links /dev/null: a regression fails instead of hanging)."""
    from tunekit.data.readers import iter_jsonl_records

    link = tmp_path / "null.jsonl"
    link.symlink_to("/dev/null")
    with pytest.raises(TunekitError, match=r"not a regular file \(through a symbolic link\) but a device"):
        read_records(link)
    with pytest.raises(TunekitError, match="not a regular file"):
        next(iter_jsonl_records(link))
