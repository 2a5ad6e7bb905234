"""Task metrics. Each is a plain function of (predictions, references) -> float."""

from __future__ import annotations

import re
from collections import Counter


def normalize(text: str) -> str:
    """Strip and collapse whitespace: formatting noise is not a wrong answer."""
    return re.sub(r"\s+", " ", text).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / len(
        references
    )


def macro_f1(predictions: list[str], references: list[str]) -> float:
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


def task_metrics(predictions: list[str], references: list[str], is_classification: bool) -> dict[str, float]:
    """Exact match for generation; accuracy and macro-F1 when every example has a label."""
    if is_classification:
        return {
            "accuracy": exact_match(predictions, references),
            "macro_f1": macro_f1(predictions, references),
        }
    return {"exact_match": exact_match(predictions, references)}
