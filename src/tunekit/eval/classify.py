"""`tunekit eval RUN_DIR` for a `task: classify` run: accuracy, macro-F1 and a confusion matrix.

No generation: one forward pass per batch of test texts, the prediction is the highest-scoring
label. There is no base-model contender: the base model with a fresh, untrained head predicts at
random, so only the fine-tuned classifier is reported (and the report says why). Writes
report.json, report.md and predictions.json into the run directory.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import torch

from tunekit.console import err as console
from tunekit.data.needs import require
from tunekit.errors import TunekitError
from tunekit.eval.metrics import macro_f1
from tunekit.eval.report import comparison_table
from tunekit.io import atomic_write_json, atomic_write_text
from tunekit.runs.directory import load_run_config, load_test_examples
from tunekit.train.recipes.classify import class_logits, collate_labelled, encode, input_text
from tunekit.train.setup import load_trained, read_labels

NO_BASE = (
    "no base contender: the base model has no trained classification head (a fresh head predicts "
    "at random), so the fine-tuned classifier is compared with chance and the majority label instead"
)


def evaluate_classifier(run_dir: str | Path, data: str | Path | None = None, quiet: bool = False) -> dict:
    """Classify the run's test split (or `data`) with the trained head; returns report.json's dict."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    examples = load_test_examples(run_dir, cfg, data)
    require("labels", examples, "test", cfg.task)
    labels = read_labels(run_dir)
    if not labels:
        raise TunekitError(f"{run_dir}: no labels.json; was this run trained with task: classify?")

    model, tokenizer, _ = load_trained(run_dir, head="score")
    t0 = time.perf_counter()
    preds, confidence, loss = predict(model, tokenizer, examples, labels, cfg)
    seconds = time.perf_counter() - t0

    refs = [ex.label for ex in examples]
    majority, n_major = Counter(refs).most_common(1)[0]
    finetuned = {
        "accuracy": sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs),
        "macro_f1": macro_f1(preds, refs),
        "test_loss": loss,
        "seconds_per_example": seconds / len(examples),
    }
    rows = [
        {
            "source": ex.where,
            "text": input_text(ex),
            "reference": ex.label,
            "predicted": p,
            "confidence": c,
            "correct": p == ex.label,
        }
        for ex, p, c in zip(examples, preds, confidence, strict=True)
    ]
    unknown = sorted({r for r in refs if r not in set(labels)})
    report = {
        "task": "classify",
        "task_metric": "accuracy",
        "n_test": len(examples),
        "test_data": str(data) if data is not None else str(run_dir / "data" / "test.jsonl"),
        "labels": labels,
        "contenders": {"finetuned": finetuned},
        "baselines": {"chance": 1 / len(labels), "majority_label": majority, "majority": n_major / len(refs)},
        "note": NO_BASE,
        "unknown_labels": unknown,
        "confusion": confusion(preds, refs, labels + unknown),
        "failures": sorted((r for r in rows if not r["correct"]), key=lambda r: -r["confidence"]),
    }
    atomic_write_json(run_dir / "report.json", report)
    write_classify_report(run_dir, report)
    atomic_write_json(run_dir / "predictions.json", rows)
    if not quiet:
        console.print(f"eval finetuned: {finetuned} ({seconds:.0f}s); report -> {run_dir / 'report.md'}")
    return report


@torch.no_grad()
def predict(model, tokenizer, examples, labels: list[str], cfg) -> tuple[list[str], list[float], float]:
    """(predicted label, its probability) per example, and the mean cross-entropy over the examples
    whose label the head knows."""
    index = {lab: i for i, lab in enumerate(labels)}
    preds, conf, total, n_known = [], [], 0.0, 0
    bs = cfg.eval.batch_size
    for i in range(0, len(examples), bs):
        chunk = examples[i : i + bs]
        items = [(encode(tokenizer, ex, cfg.train.max_length), index.get(ex.label, -1)) for ex in chunk]
        logits = class_logits(model, collate_labelled(items, tokenizer.pad_token_id))
        probs = logits.softmax(-1).cpu()  # (B, L)
        p, k = probs.max(-1)
        preds += [labels[j] for j in k.tolist()]
        conf += p.tolist()
        for row, (_, y) in zip(probs, items, strict=True):
            if y >= 0:
                total, n_known = total - math.log(max(float(row[y]), 1e-45)), n_known + 1
    return preds, conf, total / max(n_known, 1)


def confusion(preds: list[str], refs: list[str], labels: list[str]) -> dict:
    """matrix[i][j]: test examples of labels[i] predicted as labels[j]; plus the most confused pairs."""
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for p, r in zip(preds, refs, strict=True):
        matrix[index[r]][index[p]] += 1
    pairs = Counter((r, p) for p, r in zip(preds, refs, strict=True) if p != r)
    return {
        "labels": labels,
        "matrix": matrix,
        "most_confused": [
            {"reference": r, "predicted": p, "count": n} for (r, p), n in pairs.most_common(10)
        ],
    }


def write_classify_report(run_dir: Path, report: dict) -> None:
    f, b = report["contenders"]["finetuned"], report["baselines"]
    parts = [
        "# Evaluation report (classifier)\n",
        f"Held-out test: {report['n_test']} examples from `{report['test_data']}`, "
        f"{len(report['labels'])} labels.\n",
        f"Accuracy **{f['accuracy']:.3f}** (chance {b['chance']:.3f}, always `{b['majority_label']}` "
        f"{b['majority']:.3f}); macro-F1 {f['macro_f1']:.3f}.\n",
        f"_{report['note']}._\n",
        comparison_table(report) + "\n",
        "## Most confused (reference -> predicted)\n",
    ]
    parts += [
        f"- `{c['reference']}` -> `{c['predicted']}`: {c['count']}"
        for c in report["confusion"]["most_confused"]
    ]
    if report["unknown_labels"]:
        parts.append(f"\nTest labels the head has no output for (always wrong): {report['unknown_labels']}\n")
    parts.append(f"\n## Failures ({len(report['failures'])}, most confident first)\n")
    for r in report["failures"][:20]:
        parts.append(
            f"- `{r['source']}`: {r['text'][:100]!r}: expected `{r['reference']}`, "
            f"got `{r['predicted']}` ({r['confidence']:.2f})"
        )
    atomic_write_text(run_dir / "report.md", "\n".join(parts) + "\n")
