"""Failure triage: which test examples the fine-tuned model gets wrong, grouped so a person can act.

Fine-tuning is iterative: train, evaluate, find the failure modes, add examples, repeat. This module
turns the per-example rows of an evaluation into that to-do list:

- each failure gets an error type (empty reply, invalid JSON, wrong field: priority, not a label,
  wrong label, wrong number, wrong answer);
- failures are grouped by error type and by reference label; for JSON records, by field=value
  ("priority=P1"), since a record's fields act as labels;
- the most frequent confusions (expected -> got);
- `weak_groups`: the labels or field values with the lowest accuracy on the test set, with how many
  training examples they had: where more training examples are needed (`tunekit data augment`);
- `guessed_fields`: a field (or the label) the model answers with one value for most of the test set
  whatever the input: a plateau of training, not a lack of data.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from tunekit.eval.metrics import final_number, normalize, parse_json


def _fields(text: str) -> dict | None:
    v = parse_json(text)
    return v if isinstance(v, dict) and v else None


def error_type(prediction: str, reference: str, labels: set[str] | None = None) -> str:
    """The kind of mistake, from the cheapest explanation up."""
    if not prediction.strip():
        return "empty reply"
    ref = _fields(reference)
    if ref is not None:
        pred = _fields(prediction)
        if pred is None:
            return "invalid JSON"
        wrong = [k for k, v in ref.items() if pred.get(k) != v]
        return "wrong field: " + ", ".join(wrong) if wrong else "extra fields"
    if labels:
        return "wrong label" if normalize(prediction) in labels else "not a label"
    if "####" in reference:
        return "wrong number" if final_number(prediction) is not None else "no number"
    return "wrong answer"


def group_keys(reference: str, label: str | None) -> list[str]:
    """The groups an example belongs to: its label, or each field=value of a JSON reference."""
    if label is not None:
        return [label]
    ref = _fields(reference)
    if ref is not None:
        return [f"{k}={v}" for k, v in ref.items() if isinstance(v, str | int | float | bool)]
    return []


# A field is a guess at a size when one value is at least GUESS_SHARE of its predictions and at least
# GUESS_OVER_REFERENCE times the most common value's share of the references: the model writes mostly
# the same value whatever the input (a small model's plateau, e.g. the most common priority before it
# learns the cue). Its per-value accuracies then follow which value it guesses, not what it learned:
# more examples of the failing values are not the fix (the data curve leaves them out of its advice).
GUESS_SHARE = 0.7
GUESS_OVER_REFERENCE = 1.5
GUESS_MIN_EXAMPLES = 10


def _field_values(row: dict, text) -> dict | None:
    """{field: value} of a reply: the label for label data, the scalar fields of a JSON record."""
    if text is None:
        return None
    if row.get("label") is not None:
        return {"label": str(text)}
    fields = _fields(str(text))
    if fields is None:
        return None
    return {k: v for k, v in fields.items() if isinstance(v, str | int | float | bool)}


def guessed_fields(rows: list[dict], reply: str) -> dict[str, tuple[str, float, float]]:
    """{field: (value, share, top reference share)} for each field that a model answers with one value
    (see GUESS_SHARE): the share of the test examples (those whose reference has the field) whose
    reply (`row[reply]`) gives it that value, and the most common reference value's share."""
    refs = [_field_values(r, r["reference"] if r.get("label") is None else r["label"]) for r in rows]
    preds = [_field_values(r, r.get(reply)) for r in rows]
    out = {}
    for field in {k for ref in refs if ref for k in ref}:
        said = Counter(str(p[field]) for p in preds if p and field in p)
        truth = Counter(str(r[field]) for r in refs if r and field in r)
        n = sum(truth.values())
        if n < GUESS_MIN_EXAMPLES or not said:
            continue
        value, count = said.most_common(1)[0]
        top_truth = max(truth.values()) / n
        if count / n >= max(GUESS_SHARE, GUESS_OVER_REFERENCE * top_truth):
            out[field] = (value, count / n, top_truth)
    return out


def guess_advice(field: str, value: str, share: float, reference_share: float) -> str:
    return (
        f"`{field}` is one guess: the model answers {value} for {share:.0%} of the test set, where no "
        f"value is right for more than {reference_share:.0%}; it has not learned to read this field "
        "from the input yet (more epochs or another learning rate, before more data)"
    )


def analyze_failures(
    rows: list[dict], labels: set[str] | None, train_groups: Counter, contender: str = "finetuned"
) -> dict:
    """Group `rows` (one per test example, with reference, the contender's reply and `{contender}_correct`)."""
    failures = [r for r in rows if not r[f"{contender}_correct"]]
    by_type = Counter(error_type(r[contender], r["reference"], labels) for r in failures)

    confusions: Counter = Counter()
    for r in failures:
        ref, pred = _fields(r["reference"]), _fields(r[contender])
        if ref is not None and pred is not None:
            confusions.update(f"{k}: {v} -> {pred.get(k)}" for k, v in ref.items() if pred.get(k) != v)
        else:
            confusions[f"{normalize(r['reference'])[:60]} -> {normalize(r[contender])[:60]}"] += 1

    # Accuracy per group, over every test example in it: where the model is weak.
    seen, right = Counter(), Counter()
    for r in rows:
        for g in group_keys(r["reference"], r.get("label")):
            seen[g] += 1
            right[g] += bool(r[f"{contender}_correct"])
    per_group = {
        g: {
            "test_examples": n,
            "correct": right[g],
            "accuracy": right[g] / n,
            "failures": n - right[g],
            "train_examples": train_groups.get(g, 0),
        }
        for g, n in seen.items()
    }
    weak = sorted(
        (g for g, s in per_group.items() if s["failures"]), key=lambda g: (per_group[g]["accuracy"], -seen[g])
    )[:10]
    examples_by_type = defaultdict(list)
    for r in failures:
        t = error_type(r[contender], r["reference"], labels)
        if len(examples_by_type[t]) < 3:
            examples_by_type[t].append(
                {
                    "source": r["source"],
                    "prompt": r["prompt"],
                    "reference": r["reference"],
                    "got": r[contender],
                }
            )
    guessed = [
        {"field": k, "value": v, "share": share, "reference_share": truth,
         "advice": guess_advice(k, v, share, truth)}
        for k, (v, share, truth) in sorted(guessed_fields(rows, contender).items())
    ]  # fmt: skip
    return {
        "n_failures": len(failures),
        "guessed_fields": guessed,
        "by_error_type": [
            {"error_type": t, "count": n, "examples": examples_by_type[t]} for t, n in by_type.most_common()
        ],
        "top_confusions": [{"confusion": c, "count": n} for c, n in confusions.most_common(10)],
        "groups": per_group,
        "weak_groups": [
            {
                "group": g,
                **per_group[g],
                "advice": f"{g}: {per_group[g]['accuracy']:.0%} right on {per_group[g]['test_examples']} "
                f"test examples, {per_group[g]['train_examples']} training examples: add examples like the "
                "failures (`tunekit data augment`)",
            }
            for g in weak
        ],
    }


def train_group_counts(train_examples) -> Counter:
    """How many training examples each group (label or field=value) has."""
    counts: Counter = Counter()
    for ex in train_examples:
        counts.update(group_keys(ex.target, ex.label))
    return counts
