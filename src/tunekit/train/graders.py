"""Programmable graders: the score of a sampled completion against the example's reference answer,
the reward of `task: rl` with `rl.graders` (no reward model), and of OpenAI-style reinforcement jobs.

A grader is a plain function `(completion text, item) -> float`, where `item` is the example's
fields as a mapping; tunekit's RL passes `{"reference": the reference answer}` (the last assistant
message of a conversation row, or the chosen answer of a pair). Built in:

    exact        1 if the completion equals the reference (stripped; `ignore_case`)
    label        1 if both are the same label once case, spacing and end punctuation are normalised
    numeric      1 if the final numbers agree within `tolerance` (GSM8K's `#### N`, else the last number)
    regex        1 if `pattern` occurs in the completion (re.search)
    json_valid   1 if the completion is JSON (a ```json fence allowed), and valid against `json_schema`
    json_fields  the share of the reference JSON object's fields whose values the completion's equal
    similarity   string similarity in [0, 1]: fuzzy_match (difflib's ratio), bleu, gleu, rouge_1..5, rouge_l
    python       a `module:function` of your own, called as function(completion, reference) -> float
    openai       OpenAI's grader JSON (`grader_from_openai`): string_check, text_similarity,
                 score_model (a local model), multi (a weighted formula over named graders)

`Scorer` combines several graders as a weighted mean and never lets one crash a run: a grader that
raises, returns something not a finite number, or runs past the per-call time limit scores 0 for
that sample, and the failure is counted and kept (with the example and the error) for the run's
metrics and train_summary.json. Nothing here evaluates code from a spec: `multi`'s formula is parsed
with `ast` and only arithmetic on the named graders' scores is allowed.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import json
import math
import operator
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Grader = Callable[[str, Mapping[str, Any]], float]


class GraderSpecError(ValueError):
    """A grader spec that cannot be built; the message starts with the key it is about."""


class GraderError(Exception):
    """A grader could not score one sample (scored 0 and reported, never raised out of a run)."""


# ---------------------------------------------------------------------------------------------
# Built-in graders: pure functions of (completion, reference)


def exact_match(output: str, reference: str, ignore_case: bool = False) -> float:
    a, b = output.strip(), reference.strip()
    return float(a.casefold() == b.casefold() if ignore_case else a == b)


def normalize_label(text: str) -> str:
    """A label as written loosely: case-folded, inner spacing collapsed, quotes and end punctuation off."""
    text = " ".join(text.split()).casefold()
    return text.strip(" \"'`").rstrip(".!?;:,").strip(" \"'`")


def label_match(output: str, reference: str) -> float:
    return float(normalize_label(output) == normalize_label(reference))


_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+"


def final_number(text: str) -> float | None:
    """The answer number of a text: after GSM8K's `#### ` marker when there is one, else the last
    number in it; thousands commas and a dollar sign are allowed. None when it holds no number."""
    marked = re.search(r"####\s*(" + _NUMBER + ")", text)
    found = [marked.group(1)] if marked else re.findall(_NUMBER, text)
    if not found:
        return None
    return float(found[-1].replace(",", "").replace("$", ""))


def numeric_match(output: str, reference: str, tolerance: float = 1e-6) -> float:
    """1 if the completion's final number equals the reference's, within `tolerance` (absolute, or
    relative to the reference's size when that is larger)."""
    want = final_number(reference)
    if want is None:
        raise GraderError(f"the reference holds no number: {reference[:80]!r}")
    got = final_number(output)
    return float(got is not None and abs(got - want) <= tolerance * max(1.0, abs(want)))


def regex_match(output: str, pattern: re.Pattern[str]) -> float:
    return float(pattern.search(output) is not None)


def parse_json(text: str) -> Any:
    """The JSON value of a text, which may sit in one Markdown code fence; ValueError if it is not JSON."""
    text = text.strip()
    fenced = re.fullmatch(r"```[a-zA-Z]*\s*\n?(.*?)\n?\s*```", text, re.DOTALL)
    return json.loads(fenced.group(1) if fenced else text)


def json_valid(output: str, schema: Mapping[str, Any] | None = None) -> float:
    """1 if the completion is JSON and (given a JSON schema) valid against it, else 0."""
    try:
        value = parse_json(output)
    except ValueError:
        return 0.0
    if schema is None:
        return 1.0
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    return float(validator.is_valid(value))


def json_field_accuracy(output: str, reference: str) -> float:
    """The share of the reference object's top-level fields whose values the completion's object has
    equal (as JSON values); 0 for a completion that is not a JSON object."""
    try:
        want = parse_json(reference)
    except ValueError as e:
        raise GraderError(f"the reference is not JSON ({e}): {reference[:80]!r}") from None
    if not isinstance(want, dict) or not want:
        raise GraderError(f"the reference is not a non-empty JSON object: {reference[:80]!r}")
    try:
        got = parse_json(output)
    except ValueError:
        return 0.0
    if not isinstance(got, dict):
        return 0.0
    return sum(k in got and got[k] == v for k, v in want.items()) / len(want)


SIMILARITY_METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_l", *(f"rouge_{n}" for n in range(1, 6)))


def similarity(output: str, reference: str, metric: str = "fuzzy_match") -> float:
    """String similarity in [0, 1]. fuzzy_match: difflib's ratio (2 x matching characters / total);
    bleu: sacrebleu's sentence BLEU / 100; gleu: NLTK's sentence GLEU on whitespace tokens;
    rouge_N / rouge_l: the rouge-score package's F-measure (stemmed)."""
    if metric == "fuzzy_match":
        return difflib.SequenceMatcher(None, output, reference, autojunk=False).ratio()
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(output, [reference]).score / 100
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference.split()], output.split()))
    if metric.startswith("rouge_"):
        from rouge_score import rouge_scorer

        name = "rougeL" if metric == "rouge_l" else "rouge" + metric.removeprefix("rouge_")
        return rouge_scorer.RougeScorer([name], use_stemmer=True).score(reference, output)[name].fmeasure
    raise GraderError(f"unknown similarity metric {metric!r}; one of {', '.join(SIMILARITY_METRICS)}")


def import_function(target: str, key: str) -> Callable[..., Any]:
    """The function a `module:function` string names (module importable from the current folder
    or the installed packages). GraderSpecError naming `key` when it cannot be found."""
    module_name, sep, func_name = target.partition(":")
    if not sep or not module_name or not func_name:
        raise GraderSpecError(f"{key}: {target!r} is not module:function (e.g. mygraders:grade)")
    import sys

    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a grader file beside the config, as `python -m` finds it
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any error it raises on import
        raise GraderSpecError(f"{key}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise GraderSpecError(f"{key}: {module_name} has no function {func_name!r}")
    return func


# ---------------------------------------------------------------------------------------------
# OpenAI's grader JSON

_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")
STRING_OPERATIONS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "like": lambda a, b: b in a,  # the input contains the reference
    "ilike": lambda a, b: b.casefold() in a.casefold(),
}


def render(template: str, output: str, item: Mapping[str, Any]) -> str:
    """A grader template with `{{sample.output_text}}`, `{{sample.output_json[.path]}}` and
    `{{item.path}}` filled in (a non-string value as JSON); GraderError for a missing field."""

    def value(m: re.Match[str]) -> str:
        root, *path = m.group(1).split(".")
        if root == "sample" and path[:1] == ["output_text"] and len(path) == 1:
            return output
        if root == "sample" and path[:1] == ["output_json"]:
            try:
                current: Any = parse_json(output)
            except ValueError:
                raise GraderError(
                    "the completion is not JSON (the template reads sample.output_json)"
                ) from None
            path = path[1:]
        elif root == "item":
            current = item
        else:
            raise GraderError(
                f"{{{{{m.group(1)}}}}}: only sample.output_text, sample.output_json and item.* exist"
            )
        for part in path:
            if not isinstance(current, Mapping) or part not in current:
                raise GraderError(f"{{{{{m.group(1)}}}}}: the example has no field {part!r}")
            current = current[part]
        return current if isinstance(current, str) else json.dumps(current)

    return _TEMPLATE.sub(value, template)


def _check_template(template: Any, key: str) -> str:
    if not isinstance(template, str):
        raise GraderSpecError(f"{key}: expected a string template, got {type(template).__name__}")
    for m in _TEMPLATE.finditer(template):
        root, *path = m.group(1).split(".")
        ok = (root == "sample" and path and path[0] in ("output_text", "output_json")) or (
            root == "item" and path
        )
        if not ok:
            raise GraderSpecError(
                f"{key}: {{{{{m.group(1)}}}}} is not a template field; use {{{{sample.output_text}}}}, "
                "{{sample.output_json.FIELD}} or {{item.FIELD}}"
            )
    return template


def _require(spec: Mapping[str, Any], key: str, allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(spec) - allowed - {"type", "name"})
    if unknown:
        raise GraderSpecError(
            f"{key}.{unknown[0]}: not a field of a {spec['type']} grader; fields: {sorted(allowed)}"
        )
    missing = sorted(required - set(spec))
    if missing:
        raise GraderSpecError(f"{key}.{missing[0]}: required by a {spec['type']} grader")


OPENAI_TYPES = ("string_check", "text_similarity", "score_model", "multi")


def grader_from_openai(spec: Mapping[str, Any], key: str = "grader") -> Grader:
    """A grader `(completion text, item) -> float` from OpenAI's grader JSON, e.g.
    {"type": "string_check", "operation": "eq", "input": "{{sample.output_text}}",
    "reference": "{{item.reference}}"}. Types: string_check (eq, ne, like, ilike), text_similarity
    (fuzzy_match, bleu, gleu, rouge_1..5, rouge_l), score_model (a local model given by alias or
    folder: its first number in the reply, clipped to `range`), multi (`graders` by name and a
    `calculate_output` arithmetic formula over their scores). The spec is checked whole before
    anything runs; GraderSpecError names the offending key under `key`."""
    if not isinstance(spec, Mapping):
        raise GraderSpecError(f"{key}: a grader is a JSON object, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind == "string_check":
        _require(spec, key, {"input", "reference", "operation"}, {"input", "reference", "operation"})
        op = spec["operation"]
        if op not in STRING_OPERATIONS:
            raise GraderSpecError(f"{key}.operation: {op!r}; one of {', '.join(STRING_OPERATIONS)}")
        test, inp = STRING_OPERATIONS[op], _check_template(spec["input"], f"{key}.input")
        ref = _check_template(spec["reference"], f"{key}.reference")
        return lambda out, item: float(test(render(inp, out, item), render(ref, out, item)))
    if kind == "text_similarity":
        _require(
            spec, key, {"input", "reference", "evaluation_metric", "pass_threshold"}, {"input", "reference"}
        )
        metric = spec.get("evaluation_metric", "fuzzy_match")
        if metric not in SIMILARITY_METRICS:
            raise GraderSpecError(
                f"{key}.evaluation_metric: {metric!r} is not available here; one of {', '.join(SIMILARITY_METRICS)}"
                " (meteor and cosine need data or embeddings tunekit does not ship)"
            )
        inp, ref = (
            _check_template(spec["input"], f"{key}.input"),
            _check_template(spec["reference"], f"{key}.reference"),
        )
        return lambda out, item: similarity(render(inp, out, item), render(ref, out, item), metric)
    if kind == "score_model":
        return _score_model(spec, key)
    if kind == "multi":
        _require(spec, key, {"graders", "calculate_output"}, {"graders", "calculate_output"})
        subs = spec["graders"]
        if not isinstance(subs, Mapping) or not subs:
            raise GraderSpecError(f"{key}.graders: a non-empty object of name -> grader")
        built = {name: grader_from_openai(sub, f"{key}.graders.{name}") for name, sub in subs.items()}
        calc = formula(spec["calculate_output"], set(built), f"{key}.calculate_output")
        return lambda out, item: calc({name: g(out, item) for name, g in built.items()})
    if kind == "python":
        raise GraderSpecError(
            f"{key}.type: python graders run source code from the spec, which tunekit does not execute; "
            "put the function in a module and use a module:function grader (rl.graders: type: python)"
        )
    raise GraderSpecError(f"{key}.type: {kind!r}; one of {', '.join(OPENAI_TYPES)}")


def _score_model(spec: Mapping[str, Any], key: str) -> Grader:
    """score_model: a local causal LM reads the rendered `input` messages and answers with a score.
    The model loads on first use (once), answers greedily; its first number is the score, clipped
    to `range` (default [0, 1]); a reply with no number is a grader error."""
    _require(spec, key, {"model", "input", "range", "sampling_params", "pass_threshold"}, {"model", "input"})
    messages = spec["input"]
    if not isinstance(messages, list) or not messages:
        raise GraderSpecError(f"{key}.input: a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise GraderSpecError(
                f"{key}.input.{i}: a message {{role: system|developer|user|assistant, content}}"
            )
        _check_template(m.get("content"), f"{key}.input.{i}.content")
    lo, hi = spec.get("range", [0, 1])
    if not (isinstance(lo, int | float) and isinstance(hi, int | float) and lo < hi):
        raise GraderSpecError(f"{key}.range: [low, high] with low < high")
    max_tokens = int((spec.get("sampling_params") or {}).get("max_completions_tokens", 16))
    loaded: dict[str, Any] = {}
    lock = threading.Lock()

    def grade(out: str, item: Mapping[str, Any]) -> float:
        import torch

        from tunekit.data.example import Message
        from tunekit.data.tokenize import render as render_chat
        from tunekit.models import load_model, load_tokenizer, resolve_model

        with lock:
            if not loaded:
                path = resolve_model(str(spec["model"]))
                loaded["tok"], loaded["model"] = load_tokenizer(path), load_model(path).eval()
        tok, model = loaded["tok"], loaded["model"]
        chat = [
            Message("system" if m["role"] == "developer" else m["role"], render(m["content"], out, item))
            for m in messages
        ]
        text = render_chat(tok, chat, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(
                **ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        reply = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        return score_from_reply(reply, (float(lo), float(hi)))

    return grade


def score_from_reply(reply: str, bounds: tuple[float, float]) -> float:
    """A model grader's score: the first number in its reply, clipped to `bounds`."""
    m = re.search(r"-?\d+(?:\.\d+)?|-?\.\d+", reply)
    if m is None:
        raise GraderError(f"the grader model's reply holds no number: {reply[:80]!r}")
    return min(max(float(m.group()), bounds[0]), bounds[1])


# multi's calculate_output: arithmetic only. `^` is a power, as in OpenAI's formulas (Python's `**` too).
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}


def formula(
    text: Any, names: set[str], key: str = "calculate_output"
) -> Callable[[Mapping[str, float]], float]:
    """An arithmetic formula over the named scores, e.g. `0.7 * fields + 0.3 * valid`, checked once
    (only numbers, the names, + - * / ^ ** and min max abs floor ceil exp sqrt log) and evaluated by
    walking its syntax tree: no Python code from the spec ever runs."""
    if not isinstance(text, str) or not text.strip():
        raise GraderSpecError(f"{key}: a formula string, e.g. '0.5 * a + 0.5 * b'")
    # `^` is written as `**` before parsing: Python's `^` (xor) binds looser than + and *, a power
    # tighter. A formula holds no strings, so the swap cannot change anything else.
    source = text.strip().replace("^", "**")
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as e:
        raise GraderSpecError(f"{key}: {text!r} is not a formula ({e.msg})") from None
    for node in ast.walk(tree):
        ok = isinstance(node, ast.Expression | ast.Load) or type(node) in _BINARY or type(node) in _UNARY
        if isinstance(node, ast.BinOp | ast.UnaryOp):
            ok = type(node.op) in _BINARY or type(node.op) in _UNARY
        elif isinstance(node, ast.Constant):
            ok = isinstance(node.value, int | float) and not isinstance(node.value, bool)
        elif isinstance(node, ast.Name):
            ok = node.id in names or node.id in _FUNCTIONS
            if not ok:
                raise GraderSpecError(
                    f"{key}: {node.id!r} is neither a grader ({', '.join(sorted(names))}) nor a function"
                )
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords
        if not ok:
            raise GraderSpecError(
                f"{key}: {ast.get_source_segment(source, node) or type(node).__name__!r} is not allowed; "
                "a formula holds numbers, grader names, + - * / ^ and min max abs floor ceil exp sqrt log"
            )

    def walk(node: ast.AST, scores: Mapping[str, float]) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body, scores)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return scores[node.id]
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](walk(node.left, scores), walk(node.right, scores))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](walk(node.operand, scores))
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)  # checked above
        return float(_FUNCTIONS[node.func.id](*(walk(a, scores) for a in node.args)))

    def evaluate(scores: Mapping[str, float]) -> float:
        try:
            return walk(tree, scores)
        except (ArithmeticError, ValueError, TypeError) as e:  # 1/0, log(0), sqrt(-1), min()
            raise GraderError(f"{key}: {text!r}: {type(e).__name__}: {e}") from None

    return evaluate


# ---------------------------------------------------------------------------------------------
# rl.graders entries -> graders

# type -> the fields (besides type, weight, name) its config entry may set
CONFIG_FIELDS: dict[str, set[str]] = {
    "exact": {"ignore_case"},
    "label": set(),
    "numeric": {"tolerance"},
    "regex": {"pattern"},
    "json_valid": {"json_schema"},
    "json_fields": set(),
    "similarity": {"metric"},
    "python": {"function"},
    "openai": {"spec"},
}
_REQUIRED = {"regex": "pattern", "python": "function", "openai": "spec"}


def check_entry(entry: Mapping[str, Any]) -> None:
    """The checks of one `rl.graders` entry that need no file or import (config load time):
    the fields its type takes, a regex that compiles, a known metric, OpenAI's spec."""
    kind = entry["type"]
    extra = sorted(k for k in entry if k not in CONFIG_FIELDS[kind] | {"type", "weight", "name"})
    if extra:
        takes = ", ".join(sorted(CONFIG_FIELDS[kind])) or "only weight and name"
        raise GraderSpecError(f"{extra[0]}: not a field of a type: {kind} grader (it takes {takes})")
    if kind in _REQUIRED and entry.get(_REQUIRED[kind]) is None:
        raise GraderSpecError(f"{_REQUIRED[kind]}: required by a type: {kind} grader")
    if kind == "regex":
        try:
            re.compile(entry["pattern"])
        except re.error as e:
            raise GraderSpecError(
                f"pattern: {entry['pattern']!r} is not a regular expression ({e})"
            ) from None
    if kind == "similarity" and entry.get("metric", "fuzzy_match") not in SIMILARITY_METRICS:
        raise GraderSpecError(f"metric: {entry['metric']!r}; one of {', '.join(SIMILARITY_METRICS)}")
    if kind == "python" and not re.fullmatch(r"[\w.]+:\w+", entry["function"]):
        raise GraderSpecError(
            f"function: {entry['function']!r} is not module:function (e.g. mygraders:grade)"
        )
    if kind == "openai":
        grader_from_openai(entry["spec"], "spec")


def grader_from_entry(entry: Mapping[str, Any], key: str) -> Grader:
    """One `rl.graders` entry (its fields as a dict, those at their defaults absent) as a grader; reads a schema
    file and imports a python grader's module. GraderSpecError names `key`.FIELD."""
    try:
        check_entry(entry)
    except GraderSpecError as e:
        raise GraderSpecError(f"{key}.{e}") from None
    kind = entry["type"]
    if kind == "exact":
        ignore_case = bool(entry.get("ignore_case", False))
        return lambda out, item: exact_match(out, _reference(item), ignore_case)
    if kind == "label":
        return lambda out, item: label_match(out, _reference(item))
    if kind == "numeric":
        tolerance = float(entry.get("tolerance", 1e-6))
        return lambda out, item: numeric_match(out, _reference(item), tolerance)
    if kind == "regex":
        pattern = re.compile(entry["pattern"])
        return lambda out, item: regex_match(out, pattern)
    if kind == "json_valid":
        schema = _schema(entry.get("json_schema"), f"{key}.json_schema")
        return lambda out, item: json_valid(out, schema)
    if kind == "json_fields":
        return lambda out, item: json_field_accuracy(out, _reference(item))
    if kind == "similarity":
        metric = entry.get("metric", "fuzzy_match")
        return lambda out, item: similarity(out, _reference(item), metric)
    if kind == "python":
        func = import_function(entry["function"], f"{key}.function")
        return lambda out, item: func(out, _reference(item))
    return grader_from_openai(entry["spec"], f"{key}.spec")


def _reference(item: Mapping[str, Any]) -> str:
    return str(item["reference"])


def _schema(value: Any, key: str) -> Mapping[str, Any] | None:
    """A JSON schema given inline (a mapping) or as a file; checked against its metaschema."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        path = Path(value)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise GraderSpecError(f"{key}: cannot read {path} ({e.strerror})") from None
        except ValueError as e:
            raise GraderSpecError(f"{key}: {path} is not JSON ({e})") from None
    import jsonschema

    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as e:
        raise GraderSpecError(f"{key}: not a valid JSON schema ({e.message})") from None
    return value


def entry_name(entry: Mapping[str, Any]) -> str:
    """A grader's name in metrics: `name`, else an OpenAI spec's name, else its type."""
    spec_name = entry.get("spec", {}).get("name") if isinstance(entry.get("spec"), Mapping) else None
    return str(entry.get("name") or spec_name or entry["type"])


# ---------------------------------------------------------------------------------------------
# Several graders, weighted, under a time limit, never crashing the run


class GraderTimeout(GraderError):
    pass


def call_limited(grader: Grader, output: str, item: Mapping[str, Any], seconds: float) -> float:
    """grader(output, item) as a finite float, within `seconds`; GraderError otherwise. In the main
    thread a timer signal interrupts a grader still running Python at the limit; one stuck inside C
    code (or called from another thread) is only judged when it returns, and scored 0 if late."""
    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if use_alarm:

        def on_alarm(signum, frame):
            raise GraderTimeout(f"ran past the {seconds:g} s limit (rl.grader_timeout)")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.perf_counter()
    try:
        value = grader(output, item)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - t0
    if elapsed > seconds:
        raise GraderTimeout(f"took {elapsed:.2f} s, past the {seconds:g} s limit (rl.grader_timeout)")
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, int | float):
        raise GraderError(f"returned {type(value).__name__}, not a number")
    if not math.isfinite(value):
        raise GraderError(f"returned {value}, not a finite number")
    return float(value)


@dataclass
class Scorer:
    """The weighted mean of several graders' scores; failures score 0 and are kept.

    `failures` counts every failed call by grader; `examples` keeps the first `keep` of them as
    {index, where, grader, error} for train_summary.json."""

    graders: list[tuple[str, float, Grader]]
    timeout: float = 5.0
    keep: int = 20
    calls: int = 0
    failures: Counter = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def score(
        self, output: str, item: Mapping[str, Any], index: int = -1, where: str = ""
    ) -> tuple[float, dict[str, float]]:
        """(the combined score, each grader's score) of one completion."""
        each: dict[str, float] = {}
        for name, _, grader in self.graders:
            self.calls += 1
            try:
                each[name] = call_limited(grader, output, item, self.timeout)
            except Exception as e:  # a grader's own bug is the user's: reported, never a crash
                each[name] = 0.0
                self.failures[name] += 1
                if len(self.examples) < self.keep:
                    error = f"{type(e).__name__}: {e}" if not isinstance(e, GraderError) else str(e)
                    self.examples.append(
                        {"index": index, "where": where, "grader": name, "error": error[:300]}
                    )
        total = sum(w for _, w, _ in self.graders)
        return sum(w * each[name] for name, w, _ in self.graders) / total, each

    def report(self) -> dict[str, Any]:
        """The failures, for train_summary.json: counts by grader and the first examples."""
        return {
            "calls": self.calls,
            "failed": sum(self.failures.values()),
            "by_grader": dict(self.failures),
            "examples": list(self.examples),
        }


def build_scorer(entries: list[Mapping[str, Any]], timeout: float, key: str = "rl.graders") -> Scorer:
    """The Scorer of `rl.graders` (each entry's set fields as a dict). Names must be distinct, as
    each becomes a metric."""
    graders, seen = [], set()
    for i, entry in enumerate(entries):
        name = entry_name(entry)
        if name in seen:
            raise GraderSpecError(
                f"{key}.{i}.name: {name!r} is used by an earlier grader; give each a distinct name"
            )
        seen.add(name)
        graders.append((name, float(entry.get("weight", 1.0)), grader_from_entry(entry, f"{key}.{i}")))
    return Scorer(graders, timeout)
