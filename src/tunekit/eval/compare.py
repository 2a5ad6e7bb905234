"""`tunekit eval --compare RUN_A RUN_B`: what changed between two iterations, example by example.

Both runs must have been evaluated (`tunekit eval`, which writes predictions.json). Test examples
are matched by prompt and reference, so the comparison holds even when the two runs split their
data differently; only the examples both were tested on count.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunekit.errors import TunekitError
from tunekit.eval.stats import paired_difference


def _load(run_dir: Path) -> tuple[dict, list[dict]]:
    report, preds = run_dir / "report.json", run_dir / "predictions.json"
    if not (report.is_file() and preds.is_file()):
        raise TunekitError(f"{run_dir}: no report.json/predictions.json; run `tunekit eval {run_dir}` first")
    return json.loads(report.read_text()), json.loads(preds.read_text())


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict:
    """Fixed (wrong in A, right in B), broken (right in A, wrong in B), changed-but-still-wrong,
    the fine-tuned metrics of both with their differences, and a paired test on the shared examples."""
    run_a, run_b = Path(run_a), Path(run_b)
    rep_a, rows_a = _load(run_a)
    rep_b, rows_b = _load(run_b)
    by_key = {(r["prompt"], r["reference"]): r for r in rows_a}
    shared = [
        (by_key[(r["prompt"], r["reference"])], r) for r in rows_b if (r["prompt"], r["reference"]) in by_key
    ]
    if not shared:
        raise TunekitError(f"{run_a} and {run_b} share no test example (matched by prompt and reference)")

    def item(a: dict, b: dict) -> dict:
        return {"prompt": a["prompt"], "reference": a["reference"], "a": a["finetuned"], "b": b["finetuned"]}

    fixed = [item(a, b) for a, b in shared if not a["finetuned_correct"] and b["finetuned_correct"]]
    broken = [item(a, b) for a, b in shared if a["finetuned_correct"] and not b["finetuned_correct"]]
    changed = [
        item(a, b)
        for a, b in shared
        if not a["finetuned_correct"] and not b["finetuned_correct"] and a["finetuned"] != b["finetuned"]
    ]
    score = (
        "finetuned_score"
        if all("finetuned_score" in a and "finetuned_score" in b for a, b in shared)
        else None
    )
    sa = [a[score] if score else float(a["finetuned_correct"]) for a, _ in shared]
    sb = [b[score] if score else float(b["finetuned_correct"]) for _, b in shared]
    fa, fb = rep_a["contenders"]["finetuned"], rep_b["contenders"]["finetuned"]
    metrics = {
        m: {"a": fa[m], "b": fb[m], "difference": fb[m] - fa[m]}
        for m in fa
        if m in fb and not m.endswith(("_ci_low", "_ci_high")) and isinstance(fa[m], int | float)
    }
    return {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "shared_examples": len(shared),
        "task_metric": rep_b["task_metric"],
        "paired": {"metric": rep_b["task_metric"] if score else "exact_match"} | paired_difference(sa, sb),
        "metrics": metrics,
        "fixed": fixed,
        "broken": broken,
        "changed_still_wrong": changed,
    }


def print_changes(result: dict, console, limit: int = 10) -> None:
    """What changed between two evaluated runs (`tunekit eval --compare A B`), example by example."""
    from rich.table import Table

    table = Table(
        title=f"{result['run_a']} -> {result['run_b']}: {result['shared_examples']} shared test examples"
    )
    for col in ("metric", "A", "B", "B - A"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for m, d in result["metrics"].items():
        table.add_row(m, f"{d['a']:.4f}", f"{d['b']:.4f}", f"{d['difference']:+.4f}")
    console.print(table)
    p = result["paired"]
    console.print(
        f"paired {p['metric']}: {p['difference']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}], "
        f"p={p['p_value']:.3g} ({p['test']}); fixed {len(result['fixed'])}, broken {len(result['broken'])}, "
        f"changed but still wrong {len(result['changed_still_wrong'])}"
    )
    for title in ("fixed", "broken"):
        for r in result[title][:limit]:
            console.print(
                f"[{title}] {r['prompt'][:70]!r}: expected {r['reference']!r}; A {r['a']!r}; B {r['b']!r}"
            )
