"""Failure triage: which test examples the fine-tuned model gets wrong, grouped so a person can act.

Fine-tuning is iterative: train, evaluate, find the failure modes, add examples, repeat. This module
turns the per-example rows of an evaluation into that to-do list:

- each failure gets an error type (empty reply, invalid JSON, wrong field: priority, not a label,
  wrong label, wrong number, wrong answer);
- failures are grouped by error type and by reference label; for JSON records, by field=value
  ("priority=P1"), since a record's fields act as labels;
- the most frequent confusions (expected -> got);
- `weak_groups`: the labels or field values with the lowest accuracy on the test set, with how many
  training examples they had: where more training examples are needed (`tunekit data augment`).
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
    return {
        "n_failures": len(failures),
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
