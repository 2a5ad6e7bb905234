"""The graders of task: rl (train/graders.py), each on hand-made cases; OpenAI's grader JSON; the
formula parser; and the Scorer that keeps a failing grader from crashing a run."""

from __future__ import annotations

import json
import math
import re
import time

import pytest

from tunekit.train import graders as g
from tunekit.train.graders import GraderError, GraderSpecError, Scorer, grader_from_openai

TICKET = json.dumps({"intent": "technical.bug", "priority": "P2", "product": "mobile_app"})


def test_exact_and_label_match():
    assert g.exact_match("  P2\n", "P2") == 1.0
    assert g.exact_match("p2", "P2") == 0.0 and g.exact_match("p2", "P2", ignore_case=True) == 1.0
    assert g.label_match('"Billing.Refund".', "billing.refund") == 1.0
    assert g.label_match("billing  refund", "billing refund") == 1.0
    assert g.label_match("billing.refunds", "billing.refund") == 0.0


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72.0),
        ("so the answer is #### 1,234", 1234.0),
        ("It costs $18.50 in total, then 3 more", 3.0),  # no marker: the last number
        ("the total is $-5", -5.0),
        ("-0.5 left", -0.5),
        ("no digits at all", None),
    ],
)
def test_final_number(text, number):
    assert g.final_number(text) == number


def test_numeric_match_reads_gsm8k_answers():
    ref = "Weng earns 12/60 = $0.2 per minute.\n#### 10"
    assert g.numeric_match("She earned 10 dollars.", ref) == 1.0
    assert g.numeric_match("She earned #### 10.0000001", ref) == 1.0
    assert g.numeric_match("#### 10 but then 11", ref) == 1.0  # the marked number counts
    assert g.numeric_match("She earned 12.", ref) == 0.0
    assert g.numeric_match("I do not know", ref) == 0.0
    assert g.numeric_match("10.4", ref, tolerance=0.05) == 1.0
    with pytest.raises(GraderError, match="the reference holds no number"):
        g.numeric_match("10", "ten")


def test_regex_and_json_validity():
    assert g.regex_match("ticket P1 opened", re.compile(r"P[1-3]\b")) == 1.0
    assert g.regex_match("ticket P9", re.compile(r"P[1-3]\b")) == 0.0
    assert g.json_valid(TICKET) == 1.0
    assert g.json_valid("```json\n" + TICKET + "\n```") == 1.0  # one Markdown fence is allowed
    assert g.json_valid('{"intent": "x",') == 0.0
    schema = {"type": "object", "required": ["priority"], "properties": {"priority": {"enum": ["P1", "P2"]}}}
    assert g.json_valid(TICKET, schema) == 1.0
    assert g.json_valid('{"priority": "P7"}', schema) == 0.0
    assert g.json_valid("[1, 2]", schema) == 0.0


def test_json_field_accuracy():
    assert g.json_field_accuracy(TICKET, TICKET) == 1.0
    two_of_three = json.dumps({"intent": "technical.bug", "priority": "P1", "product": "mobile_app", "x": 1})
    assert g.json_field_accuracy(two_of_three, TICKET) == pytest.approx(2 / 3)
    assert g.json_field_accuracy('{"priority": "P2"}', TICKET) == pytest.approx(1 / 3)
    assert g.json_field_accuracy("not json", TICKET) == 0.0
    assert g.json_field_accuracy('["P2"]', TICKET) == 0.0
    with pytest.raises(GraderError, match="the reference is not JSON"):
        g.json_field_accuracy(TICKET, "P2")


def test_similarity_metrics():
    assert g.similarity("abcd", "abcd") == 1.0
    assert g.similarity("abcd", "abce") == pytest.approx(0.75)  # difflib: 2 * 3 / 8
    assert g.similarity("", "xyz") == 0.0
    ref = "the cat sat on the mat today"
    for metric in g.SIMILARITY_METRICS:
        same, other = g.similarity(ref, ref, metric), g.similarity("a dog ran in a park", ref, metric)
        assert same == pytest.approx(1.0) and 0 <= other < 0.5, metric
    assert g.similarity("the cat sat on a mat", ref, "rouge_1") == pytest.approx(
        2 * 5 / 6 * 5 / 7 / (5 / 6 + 5 / 7)
    )
    with pytest.raises(GraderError, match="unknown similarity metric"):
        g.similarity("a", "a", "cosine")


def test_python_grader_is_imported_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_graders.py").write_text(
        "def starts(completion, reference):\n    return completion[:1] == reference[:1]\n"
    )
    monkeypatch.chdir(tmp_path)
    grade = g.grader_from_entry({"type": "python", "function": "my_graders:starts"}, "rl.graders.0")
    assert grade("yes", {"reference": "yak"}) is True
    with pytest.raises(GraderSpecError, match=r"rl.graders.0.function: my_graders has no function 'nope'"):
        g.grader_from_entry({"type": "python", "function": "my_graders:nope"}, "rl.graders.0")
    with pytest.raises(GraderSpecError, match=r"rl.graders.0.function: cannot import 'no_such_module'"):
        g.grader_from_entry({"type": "python", "function": "no_such_module:f"}, "rl.graders.0")


def test_entries_check_their_fields_and_read_schema_files(tmp_path):
    with pytest.raises(GraderSpecError, match="rl.graders.2.pattern: required by a type: regex grader"):
        g.grader_from_entry({"type": "regex"}, "rl.graders.2")
    with pytest.raises(GraderSpecError, match="metric: not a field of a type: exact grader"):
        g.check_entry({"type": "exact", "metric": "bleu"})
    schema = tmp_path / "ticket.schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["intent"]}))
    grade = g.grader_from_entry({"type": "json_valid", "json_schema": str(schema)}, "k")
    assert grade(TICKET, {}) == 1.0 and grade('{"priority": "P1"}', {}) == 0.0
    schema.write_text(json.dumps({"type": "objekt"}))
    with pytest.raises(GraderSpecError, match="k.json_schema: not a valid JSON schema"):
        g.grader_from_entry({"type": "json_valid", "json_schema": str(schema)}, "k")
    assert g.grader_from_entry({"type": "label"}, "k")("P2.", {"reference": "p2"}) == 1.0


# ---------------------------------------------------------------------------------------------
# OpenAI's grader JSON


def _check(op, reference="{{item.reference}}"):
    return {
        "type": "string_check",
        "name": "s",
        "operation": op,
        "input": "{{sample.output_text}}",
        "reference": reference,
    }


def test_string_check_operations():
    item = {"reference": "Paris"}
    assert grader_from_openai(_check("eq"))("Paris", item) == 1.0
    assert grader_from_openai(_check("eq"))("paris", item) == 0.0
    assert grader_from_openai(_check("ne"))("London", item) == 1.0
    assert grader_from_openai(_check("like"))("It is Paris.", item) == 1.0
    assert grader_from_openai(_check("like"))("It is paris.", item) == 0.0
    assert grader_from_openai(_check("ilike"))("It is PARIS.", item) == 1.0
    # Templates read nested item fields and the completion's JSON.
    nested = _check("eq", "{{item.answer.city}}") | {"input": "{{sample.output_json.city}}"}
    assert grader_from_openai(nested)('{"city": "Paris"}', {"answer": {"city": "Paris"}}) == 1.0
    with pytest.raises(GraderError, match="the example has no field 'answer'"):
        grader_from_openai(nested)('{"city": "Paris"}', {"reference": "Paris"})
    with pytest.raises(GraderError, match="the completion is not JSON"):
        grader_from_openai(nested)("Paris", {"answer": {"city": "Paris"}})


def test_text_similarity_and_multi_with_a_weighted_formula():
    sim = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.reference}}",
           "evaluation_metric": "fuzzy_match"}  # fmt: skip
    assert grader_from_openai(sim)("abce", {"reference": "abcd"}) == pytest.approx(0.75)
    bleu = grader_from_openai(sim | {"evaluation_metric": "bleu"})
    assert bleu("the cat sat on the mat", {"reference": "the cat sat on the mat"}) == pytest.approx(1.0)
    multi = {
        "type": "multi",
        "graders": {"exact": _check("eq"), "close": sim},
        "calculate_output": "0.75 * exact + 0.25 * close ^ 2",  # ^ is a power, as in OpenAI's formulas
    }
    grade = grader_from_openai(multi)
    assert grade("abcd", {"reference": "abcd"}) == pytest.approx(1.0)
    assert grade("abce", {"reference": "abcd"}) == pytest.approx(0.25 * 0.75**2)
    floor = grader_from_openai(multi | {"calculate_output": "max(exact, min(close, 0.5)) - -abs(-0) / 1"})
    assert floor("abce", {"reference": "abcd"}) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "string_check", "input": "x", "reference": "y"}, r"grader.operation: required"),
        (_check("contains"), r"grader.operation: 'contains'; one of eq, ne, like, ilike"),
        (_check("eq") | {"extra": 1}, r"grader.extra: not a field of a string_check grader"),
        (_check("eq", "{{reference}}"), r"grader.reference: \{\{reference\}\} is not a template field"),
        ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "cosine"},
         r"grader.evaluation_metric: 'cosine' is not available here"),
        ({"type": "python", "source": "def grade(s, i): return 1"}, r"grader.type: python graders run source code"),
        ({"type": "label_model"}, r"grader.type: 'label_model'; one of string_check"),
        ({"type": "multi", "graders": {"a": _check("eq")}, "calculate_output": "a + b"},
         r"grader.calculate_output: 'b' is neither a grader"),
        ({"type": "multi", "graders": {"a": _check("eq")}, "calculate_output": "__import__('os').system('x')"},
         r"grader.calculate_output: .* is not allowed"),
        ({"type": "multi", "graders": {"a": _check("eq")}, "calculate_output": "a.real"},
         r"grader.calculate_output: 'a.real' is not allowed"),
        ({"type": "multi", "graders": {"a": _check("nope")}, "calculate_output": "a"},
         r"grader.graders.a.operation: 'nope'"),
        ({"type": "score_model", "model": "m", "input": [{"role": "judge", "content": "x"}]},
         r"grader.input.0: a message"),
        ({"type": "score_model", "model": "m", "input": [{"role": "user", "content": "x"}], "range": [1, 0]},
         r"grader.range: \[low, high\]"),
    ],
)  # fmt: skip
def test_bad_openai_specs_name_the_key(spec, message):
    with pytest.raises(GraderSpecError, match=message):
        grader_from_openai(spec)


def test_formula_errors_at_grading_time_are_grader_errors():
    calc = g.formula("a / b + log(a)", {"a", "b"})
    assert calc({"a": 1.0, "b": 2.0}) == pytest.approx(0.5)
    with pytest.raises(GraderError, match="ZeroDivisionError"):
        calc({"a": 1.0, "b": 0.0})
    with pytest.raises(GraderError, match="ValueError"):
        calc({"a": 0.0, "b": 1.0})  # log(0)


def test_score_model_reads_the_first_number_of_the_reply():
    assert g.score_from_reply("Score: 7 out of 10", (0, 10)) == 7.0
    assert g.score_from_reply("1.5", (0, 1)) == 1.0  # clipped to the range
    with pytest.raises(GraderError, match="holds no number"):
        g.score_from_reply("excellent", (0, 1))


def test_score_model_runs_a_local_model(tiny_model_dir):
    """A tiny random model answers no number: a grader error (scored 0 by the Scorer), not a crash."""
    spec = {"type": "score_model", "name": "judge", "model": str(tiny_model_dir), "range": [0, 1],
            "input": [{"role": "system", "content": "Score the answer from 0 to 1."},
                      {"role": "user", "content": "Answer: {{sample.output_text}}\nReference: {{item.reference}}"}],
            "sampling_params": {"max_completions_tokens": 4}}  # fmt: skip
    scorer = Scorer([("judge", 1.0, grader_from_openai(spec))], timeout=60)
    total, each = scorer.score("Paris", {"reference": "Paris"}, index=3, where="t.jsonl:4")
    if scorer.failures:  # the usual case: random tokens
        assert total == 0.0 and "holds no number" in scorer.examples[0]["error"]
    else:
        assert 0.0 <= total <= 1.0


# ---------------------------------------------------------------------------------------------
# Several graders, failures, time limits


def test_scorer_weights_graders_and_reports_each_failure():
    def boom(out, item):
        raise KeyError("no such field")

    scorer = Scorer(
        [
            ("fields", 3.0, lambda out, item: g.json_field_accuracy(out, item["reference"])),
            ("valid", 1.0, lambda out, item: g.json_valid(out)),
            ("nan", 1.0, lambda out, item: math.nan),
            ("boom", 1.0, boom),
            ("text", 1.0, lambda out, item: "1"),
        ]
    )
    total, each = scorer.score('{"priority": "P2"}', {"reference": TICKET}, index=7, where="t.jsonl:8")
    assert each == {"fields": pytest.approx(1 / 3), "valid": 1.0, "nan": 0.0, "boom": 0.0, "text": 0.0}
    assert total == pytest.approx((3 * (1 / 3) + 1) / 7)
    report = scorer.report()
    assert report["calls"] == 5 and report["failed"] == 3
    assert report["by_grader"] == {"nan": 1, "boom": 1, "text": 1}
    assert report["examples"] == [
        {"index": 7, "where": "t.jsonl:8", "grader": "nan", "error": "returned nan, not a finite number"},
        {"index": 7, "where": "t.jsonl:8", "grader": "boom", "error": "KeyError: 'no such field'"},
        {"index": 7, "where": "t.jsonl:8", "grader": "text", "error": "returned str, not a number"},
    ]


def test_a_slow_grader_is_stopped_at_the_limit_and_scored_zero():
    def slow(out, item):
        time.sleep(10)
        return 1.0

    def busy(out, item):
        while True:
            pass

    scorer = Scorer([("slow", 1.0, slow), ("busy", 1.0, busy), ("ok", 1.0, lambda o, i: 1.0)], timeout=0.2)
    t0 = time.perf_counter()
    total, each = scorer.score("x", {"reference": "x"}, index=0)
    assert time.perf_counter() - t0 < 2  # both interrupted, not waited out
    assert each == {"slow": 0.0, "busy": 0.0, "ok": 1.0} and total == pytest.approx(1 / 3)
    assert [e["error"] for e in scorer.examples] == ["ran past the 0.2 s limit (rl.grader_timeout)"] * 2


def test_build_scorer_names_and_distinct_names():
    scorer = g.build_scorer(
        [{"type": "exact"}, {"type": "openai", "spec": _check("eq")}, {"type": "exact", "name": "exact2"}],
        1.0,
    )
    assert [name for name, _, _ in scorer.graders] == ["exact", "s", "exact2"]
    with pytest.raises(GraderSpecError, match=r"rl.graders.1.name: 'exact' is used by an earlier grader"):
        g.build_scorer([{"type": "exact"}, {"type": "exact"}], 1.0)
