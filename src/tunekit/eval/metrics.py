"""Task metrics: plain functions of (predictions, references), registered by name in METRICS.

A metric either scores each example (a list of floats, e.g. exact match: 1 or 0), so its value is
the mean and its confidence interval comes from resampling examples, or scores the whole corpus (a
float, e.g. macro-F1, BLEU), so the interval comes from recomputing it on resampled corpora.
`eval.metrics` in the config names metrics from METRICS or any `module:function` callable of the
same shape, e.g. `eval.metrics: [exact_match, mypkg.metrics:keyword_recall]`. A `module:function` is
code to import, so evaluation takes it only from the user (`tunekit eval RUN --metric mypkg:fn`,
`evaluate(run, metrics=[...])`), never from a run directory's config alone: see `metrics_to_score`.

Every metric scores the final answer: a `<think>` block is stripped from predictions and references
first (data/reasoning.py). Tool calls (data/tools.py) are scored by the tool_call_* metrics, which
read the `<tool_call>` blocks (or a bare JSON call) of each reply; where the references hold calls,
tunekit's text metrics score the text outside the calls (a `module:function` metric gets whole replies).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from tunekit.data.reasoning import strip_thinking
from tunekit.data.tools import ParsedCall, parse_reply
from tunekit.errors import ConfigError


def normalize(text: str) -> str:
    """Strip and collapse whitespace: formatting noise is not a wrong answer."""
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------
# Per-example metrics: (predictions, references) -> one score per example


def exact_match_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    return [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references, strict=True)]


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def final_number(text: str) -> float | None:
    """The answer number of a text: after GSM8K's `#### ` marker if present, else the last number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return float(found[-1 if "####" not in text else 0].replace(",", "").rstrip("."))
    except ValueError:
        return None


def numeric_match(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1 where the prediction's answer number equals the reference's (GSM8K `#### 42`)."""
    out = []
    for p, r in zip(predictions, references, strict=True):
        a, b = final_number(p), final_number(r)
        out.append(float(a is not None and b is not None and abs(a - b) < 1e-6))
    return out


def parse_json(text: str):
    """The JSON value in a reply (a ```json fence around it is allowed), or None."""
    t = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", t, re.S)
    if fence:
        t = fence.group(1)
    try:
        return json.loads(t)
    except (json.JSONDecodeError, ValueError):
        return None


def json_valid(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    return [float(parse_json(p) is not None) for p in predictions]


def field_accuracy(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Share of the reference JSON object's fields the prediction got right (0 for invalid JSON)."""
    out = []
    for p, r in zip(predictions, references, strict=True):
        ref, pred = parse_json(r), parse_json(p)
        if not isinstance(ref, dict) or not ref:
            out.append(float(normalize(p) == normalize(r)))
            continue
        pred = pred if isinstance(pred, dict) else {}
        out.append(sum(pred.get(k) == v for k, v in ref.items()) / len(ref))
    return out


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure per example (Google's rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]


# ---------------------------------------------------------------------------------------------
# Tool calls: per example; an example whose reference makes no call scores 1 when the reply makes none


def _calls(text: str) -> list[ParsedCall]:
    return parse_reply(text)[1]


def _call_key(call: ParsedCall) -> str:
    """A call compared as JSON: its name and its arguments (key order and spacing do not matter)."""
    return json.dumps([call.name, call.arguments], sort_keys=True)


def tool_call_match(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1 where the reply makes the reference's calls: the same functions with arguments equal as
    JSON, in any order (parallel calls), and no other call."""
    out = []
    for p, r in zip(predictions, references, strict=True):
        got, want = _calls(p), _calls(r)
        ok = all(c.valid for c in got) and Counter(map(_call_key, got)) == Counter(map(_call_key, want))
        out.append(float(ok))
    return out


def tool_call_name(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1 where the reply calls the reference's functions (by name, in any order), whatever the arguments."""
    return [
        float(Counter(c.name for c in _calls(p)) == Counter(c.name for c in _calls(r)))
        for p, r in zip(predictions, references, strict=True)
    ]


def tool_call_valid(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1 where each call of the reply is valid JSON {name, arguments: object}, and the reply makes
    a call if the reference does (a missing call is not a valid one)."""
    out = []
    for p, r in zip(predictions, references, strict=True):
        got, want = _calls(p), _calls(r)
        out.append(float(all(c.valid for c in got) and (bool(got) or not want)))
    return out


def has_calls(reference: str) -> bool:
    """A reference that makes a tool call (`Example.target` writes calls as `<tool_call>` blocks)."""
    return "<tool_call>" in reference


def text_part(reply: str) -> str:
    """The text of a reply outside its tool calls."""
    return parse_reply(reply)[0]


# ---------------------------------------------------------------------------------------------
# Corpus metrics: (predictions, references) -> one float


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean F1 over the reference labels (a prediction outside the label set counts as wrong)."""
    preds = [normalize(p) for p in predictions]
    refs = [normalize(r) for r in references]
    labels = sorted(set(refs))
    if not labels:
        return 0.0
    tp = Counter(r for p, r in zip(preds, refs, strict=True) if p == r)
    pred_n, ref_n = Counter(preds), Counter(refs)
    f1s = []
    for lab in labels:
        prec = tp[lab] / pred_n[lab] if pred_n[lab] else 0.0
        rec = tp[lab] / ref_n[lab]
        f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
    return sum(f1s) / len(f1s)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's standard 13a tokenisation), 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Sequence[str], Sequence[str]], list[float] | float]
    per_example: bool
    # Reads whole replies, tool calls included (the tool_call_* metrics, a user's metric); tunekit's
    # text metrics read, on tool data, the text outside the calls.
    calls: bool = False


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("exact_match", exact_match_scores, True),
        Metric("accuracy", exact_match_scores, True),
        Metric("numeric_match", numeric_match, True),
        Metric("json_valid", json_valid, True),
        Metric("field_accuracy", field_accuracy, True),
        Metric("rouge_l", rouge_l, True),
        Metric("macro_f1", macro_f1, False),
        Metric("bleu", bleu, False),
        Metric("tool_call_match", tool_call_match, True, calls=True),
        Metric("tool_call_name", tool_call_name, True, calls=True),
        Metric("tool_call_valid", tool_call_valid, True, calls=True),
    )
}
TOOL_METRICS = ["tool_call_match", "tool_call_name", "tool_call_valid"]


def resolve_metric(spec: str) -> Metric:
    """A metric by name, or a user's `module:function`; a bad name is a config error naming the key."""
    if spec in METRICS:
        return METRICS[spec]
    if ":" not in spec:
        raise ConfigError(
            [f"eval.metrics: unknown metric {spec!r}; use one of {', '.join(METRICS)} or 'module:function'"]
        )
    module, _, func = spec.partition(":")
    try:
        fn = getattr(import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            [f"eval.metrics: cannot import {spec!r} ({e}); the module must be importable (on PYTHONPATH)"]
        ) from None
    if not callable(fn):
        raise ConfigError([f"eval.metrics: {spec!r} is not callable"])
    # Whether it scores examples or the corpus is seen from its first result (see score_metric).
    return Metric(func, fn, per_example=False, calls=True)


def is_custom(spec: str) -> bool:
    """A `module:function` metric (code to import), not one of tunekit's."""
    return spec not in METRICS and ":" in spec


def metrics_to_score(
    config_specs: Sequence[str] | None, given: Sequence[str] | None, config_path
) -> list[str] | None:
    """The metric specs an evaluation scores: `given` (the command line's `--metric`, or the API's
    `metrics=`) in place of the run config's `eval.metrics`, else the config's; None: choose from
    the references.

    A run directory may come from anyone, and importing a module runs its code, so a
    `module:function` in the run's config is refused unless the user names it in `given`. The
    error, raised before any model loads, names the config file and the command to run."""
    if given:
        return list(given)
    custom = [s for s in config_specs or () if is_custom(s)]
    if custom:
        flags = " ".join(f"--metric {s}" for s in config_specs)
        raise ConfigError(
            [
                f"eval.metrics: {', '.join(map(repr, custom))} names code to import, and tunekit imports a "
                "custom metric only when you name it yourself (a run directory must not run code on "
                f"your machine). Run: tunekit eval {Path(config_path).parent} {flags} "
                "(Python: evaluate(run_dir, metrics=[...]))"
            ],
            source=str(config_path),
        )
    return list(config_specs) if config_specs else None


def default_metrics(references: Sequence[str], is_classification: bool) -> list[str]:
    """Metrics that fit the references; the first is the report's task metric. References with tool
    calls add the tool_call_* metrics: first where every reference calls, else beside the text's."""
    references = [strip_thinking(r) for r in references]
    if any(has_calls(r) for r in references):
        texts = [text_part(r) for r in references]
        text = _text_defaults(texts) if any(texts) else []
        return TOOL_METRICS + text if all(map(has_calls, references)) else text + TOOL_METRICS
    return _text_defaults(references, is_classification)


def _text_defaults(references: Sequence[str], is_classification: bool = False) -> list[str]:
    if is_classification:
        return ["accuracy", "macro_f1"]
    if references and all(isinstance(parse_json(r), dict) for r in references):
        return ["exact_match", "field_accuracy", "json_valid"]
    if references and all("####" in r or re.fullmatch(r"\s*-?[\d,]*\.?\d+\s*", r) for r in references):
        return ["numeric_match", "exact_match"]
    if references and sum(len(r.split()) for r in references) / len(references) > 8:
        return ["rouge_l", "bleu", "exact_match"]
    return ["exact_match"]


def confusion_matrix(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None
) -> dict:
    """Counts of (reference row, predicted column); predictions outside the labels go to '(other)'."""
    refs = [normalize(r) for r in references]
    preds = [normalize(p) for p in predictions]
    labels = sorted(set(labels or refs))
    cols = [*labels, "(other)"]
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(cols) for _ in labels]
    for p, r in zip(preds, refs, strict=True):
        if r in index:
            matrix[index[r]][index.get(p, len(labels))] += 1
    return {"labels": labels, "columns": cols, "matrix": matrix}


def score_metrics(
    specs: Sequence[str], predictions: Sequence[str], references: Sequence[str]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each metric's value with its 95% bootstrap CI (`{name}`, `{name}_ci_low`, `{name}_ci_high`),
    and the per-example scores of the metrics that have them (for paired tests)."""
    from tunekit.eval.stats import bootstrap_ci, mean_ci

    answers = [strip_thinking(p) for p in predictions]  # the final answer only
    full_refs = [strip_thinking(r) for r in references]
    calls = any(has_calls(r) for r in full_refs)
    values: dict[str, float] = {}
    per_example: dict[str, list[float]] = {}
    for spec in specs:
        m = resolve_metric(spec)
        preds, refs = (
            (answers, full_refs)
            if m.calls or not calls
            else ([text_part(p) for p in answers], [text_part(r) for r in full_refs])
        )
        result = m.fn(preds, refs)
        if isinstance(result, list | tuple) or hasattr(result, "tolist"):
            scores = [float(x) for x in result]
            if len(scores) != len(refs):
                raise ConfigError(
                    [f"eval.metrics: {spec} returned {len(scores)} scores for {len(refs)} examples"]
                )
            value, lo, hi = mean_ci(scores)
            per_example[m.name] = scores
        else:
            value = float(result)
            lo, hi = bootstrap_ci(
                lambda idx, m=m, preds=preds, refs=refs: float(
                    m.fn([preds[i] for i in idx], [refs[i] for i in idx])
                ),
                len(refs),
                n_boot=200 if m.name == "bleu" else 1000,
            )
        values |= {m.name: value, f"{m.name}_ci_low": lo, f"{m.name}_ci_high": hi}
    return values, per_example
