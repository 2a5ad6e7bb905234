"""`tunekit eval --compare RUN_A RUN_B`: what changed between two iterations, example by example.

Both runs must have been evaluated (`tunekit eval`, which writes predictions.json). Test examples
are matched by prompt and reference, so the comparison holds even when the two runs split their
data differently; only the examples both were tested on count. Either side may be a seed group
(`tunekit train CONFIG --seeds K`): the difference is then weighed against the training noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tunekit.errors import TunekitError
from tunekit.eval.stats import between_seeds, paired_difference
from tunekit.train.seeds import group_runs, is_group


def _load(run_dir: Path) -> tuple[dict, list[dict]]:
    report, preds = run_dir / "report.json", run_dir / "predictions.json"
    if not (report.is_file() and preds.is_file()):
        raise TunekitError(f"{run_dir}: no report.json/predictions.json; run `tunekit eval {run_dir}` first")
    return json.loads(report.read_text()), json.loads(preds.read_text())


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict:
    """Fixed (wrong in A, right in B), broken (right in A, wrong in B), changed-but-still-wrong,
    the fine-tuned metrics of both with their differences, a paired test on the shared examples,
    and the difference weighed against training noise.

    A or B may be a seed group (`tunekit train --seeds K`; each run evaluated): then its metrics are
    the means over its seeds, the paired test pairs each example's seed-averaged scores, the
    examples listed as fixed or broken are those of each side's first seed, and `training_noise`
    tests the difference of the per-seed scores against the pooled between-seed variance
    (`stats.between_seeds`), so a claimed win must exceed it; `conclusion` says whether it does."""
    run_a, run_b = Path(run_a), Path(run_b)
    side_a, side_b = _side(run_a), _side(run_b)
    keyed = [
        [{(r["prompt"], r["reference"]): r for r in rows} for _, _, rows in side] for side in (side_a, side_b)
    ]
    first_b = side_b[0][2]
    keys = [(r["prompt"], r["reference"]) for r in first_b]
    keys = [k for k in dict.fromkeys(keys) if all(k in by_key for side in keyed for by_key in side)]
    if not keys:
        raise TunekitError(f"{run_a} and {run_b} share no test example (matched by prompt and reference)")
    shared = [(keyed[0][0][k], keyed[1][0][k]) for k in keys]

    def item(a: dict, b: dict) -> dict:
        return {"prompt": a["prompt"], "reference": a["reference"], "a": a["finetuned"], "b": b["finetuned"]}

    fixed = [item(a, b) for a, b in shared if not a["finetuned_correct"] and b["finetuned_correct"]]
    broken = [item(a, b) for a, b in shared if a["finetuned_correct"] and not b["finetuned_correct"]]
    changed = [
        item(a, b)
        for a, b in shared
        if not a["finetuned_correct"] and not b["finetuned_correct"] and a["finetuned"] != b["finetuned"]
    ]
    rows = [by_key[k] for side in keyed for by_key in side for k in keys]
    score = "finetuned_score" if all("finetuned_score" in r for r in rows) else None

    def scores(by_key: dict) -> np.ndarray:
        return np.array([by_key[k][score] if score else float(by_key[k]["finetuned_correct"]) for k in keys])

    per_seed_a = [scores(by_key) for by_key in keyed[0]]  # (seeds, examples) on each side
    per_seed_b = [scores(by_key) for by_key in keyed[1]]
    sa, sb = np.mean(per_seed_a, axis=0), np.mean(per_seed_b, axis=0)
    fa = [rep["contenders"]["finetuned"] for _, rep, _ in side_a]
    fb = [rep["contenders"]["finetuned"] for _, rep, _ in side_b]
    metrics = {}
    for m in fa[0]:
        va, vb = [f.get(m) for f in fa], [f.get(m) for f in fb]
        if m.endswith(("_ci_low", "_ci_high")) or not all(isinstance(v, int | float) for v in va + vb):
            continue
        metrics[m] = {
            "a": float(np.mean(va)),
            "b": float(np.mean(vb)),
            "difference": float(np.mean(vb) - np.mean(va)),
        }
    paired = {"metric": _task_metric(side_b) if score else "exact_match"} | paired_difference(sa, sb)
    noise = between_seeds([s.mean() for s in per_seed_a], [s.mean() for s in per_seed_b])
    return {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "seeds_a": [seed for seed, _, _ in side_a if seed is not None],
        "seeds_b": [seed for seed, _, _ in side_b if seed is not None],
        "shared_examples": len(shared),
        "task_metric": _task_metric(side_b),
        "paired": paired,
        "training_noise": noise,
        "conclusion": noise_conclusion(paired, noise),
        "metrics": metrics,
        "fixed": fixed,
        "broken": broken,
        "changed_still_wrong": changed,
    }


def _task_metric(side: list) -> str:
    return side[0][1]["task_metric"]


def _side(path: Path) -> list[tuple[int | None, dict, list[dict]]]:
    """(seed, report, predictions) of each run of a seed group, or of the one run at `path`."""
    runs = group_runs(path) if is_group(path) else [(None, path)]
    return [(seed, *_load(run)) for seed, run in runs]


def noise_conclusion(paired: dict, noise: dict | None) -> str:
    """One sentence: is B - A real, on the test examples and against the training noise?"""
    d, p = paired["difference"], paired["p_value"]
    on_test = f"{d:+.3f} {paired['metric']} on the test examples (p = {p:.3g})"
    if noise is None:
        return (
            f"{on_test}; one run per side, so training noise is not measured: train each config with "
            "--seeds K (tunekit train CONFIG --seeds 3) to know whether the difference exceeds it"
        )
    across = (
        f"between-seed std {noise['pooled_std']:.3f}, pooled t test across seeds p = {noise['p_value']:.3g}, "
        f"95% CI [{noise['ci_low']:+.3f}, {noise['ci_high']:+.3f}]"
    )
    if paired["significant"] and noise["significant"]:
        better = "B is better" if d > 0 else "B is worse"
        return f"{better}: {on_test}, beyond training noise ({across})"
    if paired["significant"]:
        return f"not a real difference: {on_test}, but within training noise ({across})"
    if noise["significant"]:
        return f"not confirmed: significant across seeds ({across}) but not {on_test}; test on more examples"
    return f"no significant difference: {on_test}; within training noise ({across})"


def print_changes(result: dict, console, limit: int = 10) -> None:
    """What changed between two evaluated runs (`tunekit eval --compare A B`), example by example."""
    from rich.table import Table

    seeds = "".join(
        f"; {side} {len(result[f'seeds_{side.lower()}'])} seeds"
        for side in "AB"
        if result[f"seeds_{side.lower()}"]
    )
    table = Table(
        title=f"{result['run_a']} -> {result['run_b']}: {result['shared_examples']} shared test examples{seeds}"
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
    console.print(result["conclusion"])
    for title in ("fixed", "broken"):
        for r in result[title][:limit]:
            console.print(
                f"[{title}] {r['prompt'][:70]!r}: expected {r['reference']!r}; A {r['a']!r}; B {r['b']!r}"
            )
