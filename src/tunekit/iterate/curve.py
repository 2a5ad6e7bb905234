"""`tunekit data curve CONFIG`: how much more data would help, and where.

Run as: `tunekit data curve examples/quickstart.yaml --fractions 0.25,0.5,1 --budget 30m --out runs/curve`.

The config's data is split once (as `tunekit train` splits it), then the same recipe trains on nested
subsets of the train split (each fraction's rows contain the smaller fractions' rows; label data is
drawn stratified, so every fraction keeps the label mix) and each run is evaluated on the same
held-out test split. From the per-example results:

- the overall learning curve: the task metric against the number of training examples, fitted as
  `a + b * log2(n)` (a straight line per doubling: over the one or two doublings a data set usually
  gets next, a log-linear fit is what curves of fine-tuning runs look like, and it needs no more
  than three points);
- the same curve per group (a label, or a `field=value` of a JSON reply, as the failure triage
  groups them) on that group's accuracy against its training examples: "about N more examples of
  `card_arrival` for +X accuracy" is one doubling of that group, ranked by the gain it predicts for
  the whole test set (the group's slope x its share of the test set);
- the uncertainty of each slope: a paired bootstrap over the test examples (the same resampled
  examples for every fraction), so a slope the test set cannot tell from zero says so. Training
  noise is not in it: `tunekit train --seeds K` measures that;
- a field the model answers mostly with one value (at least 70% of the test set, and 1.5 times as
  often as the most common right value) is reported as a guess at that size, and its groups are
  left out of the advice: their accuracies follow which value it guesses, not what it learned;
- the test set's power: the smallest difference in the task metric it can detect between two runs
  (two-sided 5%, power 80%), paired (from the disagreement measured between the two largest runs)
  and unpaired.

Writes OUT/curve.json and OUT/curve.md; the groups to grow go to `tunekit data augment` (the command
is printed). Each fraction is a run directory OUT/n-NNNNN; running the command again reuses the
runs that finished (their report.json), so an interrupted curve resumes.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tunekit.config import Config
from tunekit.console import err as console
from tunekit.data.example import Example
from tunekit.errors import TunekitError
from tunekit.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

DEFAULT_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
N_BOOT = 2000
Z_ALPHA, Z_POWER = 1.959964, 0.841621  # two-sided 5%, power 80%


# ---------------------------------------------------------------------------------------------
# Nested subsets


def nested_order(examples: Sequence[Example], seed: int) -> list[int]:
    """An order of `examples` whose every prefix is a subset to train on: shuffled with `seed`, and
    for label data interleaved by label, so a prefix of any length keeps the label mix (each label's
    k-th example sits at its fractional rank (k + 0.5) / size)."""
    rng = random.Random(seed)
    by_label: dict[object, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_label[ex.label].append(i)
    keyed = []
    for label in sorted(by_label, key=str):
        idx = by_label[label]
        rng.shuffle(idx)
        keyed += [((k + 0.5) / len(idx), rng.random(), i) for k, i in enumerate(idx)]
    return [i for *_, i in sorted(keyed)]


def subset_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """The training-set size of each fraction of `n` rows (at least one row; sizes strictly rising)."""
    sizes = sorted({max(1, round(n * f)) for f in fractions})
    return sizes


def parse_fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if len(values) < 2 or any(not 0 < v <= 1 for v in values):
        raise TunekitError(
            f"--fractions {text!r}: give two or more shares of the train split in (0, 1], e.g. 0.25,0.5,1"
        )
    return sorted(set(values))


# ---------------------------------------------------------------------------------------------
# Statistics (pure functions, tested on hand-computed cases)


def fit_log_linear(ns: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Least squares `y = a + b * log2(n)` over the points with n > 0: (a, b); None with fewer than
    two distinct n."""
    pts = [(math.log2(n), y) for n, y in zip(ns, ys, strict=True) if n > 0]
    xs = np.array([p[0] for p in pts])
    if len(set(xs.tolist())) < 2:
        return None
    y = np.array([p[1] for p in pts])
    b = float(((xs - xs.mean()) * (y - y.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
    return float(y.mean() - b * xs.mean()), b


def slope_ci(
    ns: Sequence[float], correct: Sequence[Sequence[float]], n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float, float] | None:
    """The log-linear slope (per doubling) of the mean of `correct[j]` (one 0/1 or score per test
    example, the same examples for every point j) against `ns[j]`, and its 95% paired-bootstrap CI
    over the test examples: (slope, low, high); None when no slope can be fitted."""
    scores = np.asarray(correct, dtype=float)  # (points, examples)
    fit = fit_log_linear(ns, scores.mean(axis=1))
    if fit is None or scores.shape[1] == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, scores.shape[1], size=(n_boot, scores.shape[1]))
    means = scores[:, idx].mean(axis=2)  # (points, n_boot)
    boots = [fit_log_linear(ns, means[:, k]) for k in range(n_boot)]
    slopes = np.array([b[1] for b in boots if b is not None])
    return fit[1], float(np.percentile(slopes, 2.5)), float(np.percentile(slopes, 97.5))


def mde_unpaired(p: float, n: int) -> float:
    """The smallest difference between two accuracies near `p`, each measured on `n` examples, that a
    two-sided 5% test detects with 80% power: (z_a + z_b) * sqrt(2 p (1 - p) / n)."""
    p = min(max(p, 1.0 / (2 * n)), 1 - 1.0 / (2 * n))  # a perfect score still has sampling noise
    return (Z_ALPHA + Z_POWER) * math.sqrt(2 * p * (1 - p) / n)


def mde_paired(discordant: float, n: int) -> float | None:
    """The same for two models scored on the same `n` examples (McNemar), where a share `discordant`
    of the examples is right under one and wrong under the other: the d solving
    n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2 (Connor 1987). None without any disagreement."""
    psi = discordant
    if psi <= 0:
        return None

    def needed(d: float) -> float:
        return (Z_ALPHA * math.sqrt(psi) + Z_POWER * math.sqrt(max(psi - d * d, 0.0))) ** 2 / (d * d)

    lo, hi = 1e-9, min(psi, 1.0)
    if needed(hi) > n:
        return None  # not even the largest difference the disagreement allows is detectable
    for _ in range(100):  # needed(d) falls as d rises: bisect for needed(d) = n
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if needed(mid) > n else (lo, mid)
    return hi


# ---------------------------------------------------------------------------------------------
# Reading an evaluated run


def example_results(run_dir: Path) -> tuple[str, list[dict]]:
    """(the task metric, one row per test example: reference, label, correct, score) of an evaluated
    run, from its predictions.json (sft and classify write it)."""
    report = json.loads((run_dir / "report.json").read_text())
    rows = json.loads((run_dir / "predictions.json").read_text())
    out = []
    for r in rows:
        correct = r["finetuned_correct"] if "finetuned_correct" in r else r["correct"]
        out.append(
            {
                "reference": r["reference"],
                "label": r.get("label", r["reference"] if "correct" in r else None),
                "correct": float(bool(correct)),
                "score": float(r.get("finetuned_score", correct)),
                "prediction": r.get("finetuned", r.get("predicted")),
            }
        )
    return report.get("task_metric", "accuracy"), out


def guessed_fields(rows: list[dict], reply: str) -> dict[str, tuple[str, float, float]]:
    from tunekit.eval.failures import guessed_fields

    return guessed_fields(rows, reply)


def group_keys_of(row: dict) -> list[str]:
    from tunekit.eval.failures import group_keys

    return group_keys(row["reference"], row["label"])


def train_groups(examples: Sequence[Example]) -> Counter:
    from tunekit.eval.failures import train_group_counts

    return train_group_counts(examples)


# ---------------------------------------------------------------------------------------------
# The curve


def analyse(sizes: list[int], results: list[list[dict]], group_counts: list[Counter], metric: str) -> dict:
    """The overall and per-group curves, the advice and the test set's power, from the per-example
    results of each size's run (`results[j]`: the rows of `example_results`, in the same order)."""
    n_test = len(results[0])
    overall = slope_ci(sizes, [[r["score"] for r in rows] for rows in results])
    means = [sum(r["score"] for r in rows) / n_test for rows in results]
    curve = {
        "metric": metric,
        "points": [{"train_examples": n, metric: m} for n, m in zip(sizes, means, strict=True)],
    }
    if overall is not None:
        slope, lo, hi = overall
        curve |= {"gain_per_doubling": slope, "gain_ci_low": lo, "gain_ci_high": hi}
        curve["advice"] = (
            f"about {sizes[-1]:,} more examples (twice the data) for {slope:+.3f} {metric} "
            f"[{lo:+.3f}, {hi:+.3f}]" + ("" if lo > 0 else ": the test set cannot tell this from no gain")
        )

    # Fields answered with one value at some size: their groups get no advice (see GUESS_SHARE).
    guesses: dict[str, list[dict]] = defaultdict(list)
    for n, rows in zip(sizes, results, strict=True):
        for field, (value, share, truth) in guessed_fields(rows, "prediction").items():
            guesses[field].append(
                {"train_examples": n, "value": value, "share": share, "reference_share": truth}
            )

    groups: dict[str, list[int]] = defaultdict(list)  # group -> test example indices
    for i, row in enumerate(results[0]):
        for g in group_keys_of(row):
            groups[g].append(i)
    per_group = []
    for g, idx in groups.items():
        counts = [c.get(g, 0) for c in group_counts]
        correct = [[rows[i]["correct"] for i in idx] for rows in results]
        fitted = slope_ci(counts, correct) if min(counts) > 0 else None
        entry = {
            "group": g,
            "test_examples": len(idx),
            "train_examples": counts[-1],
            "accuracy": [sum(c) / len(c) for c in correct],
        }
        field = "label" if results[0][idx[0]]["label"] is not None else g.split("=", 1)[0]
        if fitted is not None and field in guesses:
            entry |= {"gain_per_doubling": fitted[0], "gain_ci_low": fitted[1], "gain_ci_high": fitted[2]}
            entry["note"] = f"`{field}` is one guess at some sizes: its accuracy follows the guess"
        elif fitted is not None:
            slope, lo, hi = fitted
            room = 1.0 - entry["accuracy"][-1]
            gain = max(0.0, min(slope, room))  # one more doubling can neither lose nor pass 100%
            entry |= {
                "gain_per_doubling": slope,
                "gain_ci_low": lo,
                "gain_ci_high": hi,
                "predicted_gain": gain,
                # what the doubling is worth on the whole test set: the group's share of it
                "test_set_gain": gain * len(idx) / n_test,
                "advice": f"about {counts[-1]:,} more examples of `{g}` for {gain:+.2f} accuracy on it "
                f"(slope {slope:+.2f} [{lo:+.2f}, {hi:+.2f}] a doubling)"
                + ("" if lo > 0 else "; not significant on this test set"),
            }
        else:
            entry["note"] = "too few training examples at the smaller sizes to fit (a size with none)"
        per_group.append(entry)
    per_group.sort(key=lambda e: -e.get("test_set_gain", -1.0))
    targets = [e["group"] for e in per_group if "advice" in e and e["gain_ci_low"] > 0][:10]
    not_learned = [
        {
            "field": field,
            "sizes": seen,
            "advice": f"`{field}` is mostly one guess: the model answers "
            + ", ".join(f"{s['value']} for {s['share']:.0%}" for s in seen)
            + " of the test set at "
            + ", ".join(f"{s['train_examples']:,}" for s in seen)
            + f" training examples, where no value is right for more than "
            f"{max(s['reference_share'] for s in seen):.0%}; a recipe that learns it "
            "(more epochs, another learning rate) may matter more than data, and its groups' "
            "slopes are left out of the advice",
        }
        for field, seen in sorted(guesses.items())
    ]

    last, prev = results[-1], results[-2]
    discordant = sum(a["correct"] != b["correct"] for a, b in zip(last, prev, strict=True)) / n_test
    acc = sum(r["correct"] for r in last) / n_test
    paired = mde_paired(discordant, n_test)
    power = {
        "test_examples": n_test,
        "accuracy": acc,
        "discordant_share": discordant,
        "mde_paired": paired,
        "mde_unpaired": mde_unpaired(acc, n_test),
        "note": "the smallest accuracy difference between two runs the test set detects (two-sided 5%, "
        "power 80%): paired on the same examples, with the disagreement measured between the two "
        "largest runs; unpaired, two test sets of this size",
    }
    return {"curve": curve, "groups": per_group, "targets": targets, "power": power, "guessed": not_learned}


def run_curve(
    cfg: Config,
    out: Path,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    budget_seconds: float | None = None,
    quiet: bool = False,
) -> dict:
    """Train `cfg` on nested subsets of its train split, evaluate each on the same test split, and
    write OUT/curve.json and curve.md; returns the analysis."""
    from tunekit.eval.evaluate import evaluate
    from tunekit.runs.directory import prepare_splits
    from tunekit.tasks import get_task
    from tunekit.train.defaults import resolve_defaults
    from tunekit.train.session import train

    out = Path(out)
    # The task as `tunekit train` would choose it; the schedule is chosen again for each size (the
    # defaults follow the data's size: a curve measures the recipe a user of that size gets).
    cfg = cfg.model_copy(update={"task": resolve_defaults(cfg).task})
    task = get_task(cfg.task)
    if task.data not in ("conversations", "labels"):
        raise TunekitError(
            f"tunekit data curve: task: {task.name} has no per-example accuracy to fit; it takes sft or "
            "classify configs (conversations or label data)"
        )
    splits = prepare_splits(cfg, out)  # the split every size shares, in OUT/data/
    if not splits["test"]:
        raise TunekitError(f"data: {cfg.data.train} leaves no test examples; give data.test or a test share")
    if len(splits["train"]) < 4:
        raise TunekitError(f"data.train: {len(splits['train'])} training examples; a curve needs at least 4")
    order = nested_order(splits["train"], cfg.data.split_seed)
    sizes = subset_sizes(len(order), fractions)
    if len(sizes) < 2:
        raise TunekitError(f"--fractions give one size only on {len(order)} training examples")
    data_dir = out / "data"
    for s in ("validation", "test"):  # tunekit train reads these as they are: no second split
        if not (data_dir / f"{s}.jsonl").stat().st_size:
            raise TunekitError(f"data: no {s} examples for the curve's runs; give data.{s} or a {s} share")

    results, group_counts, runs = [], [], []
    total = sum(sizes)
    for n in sizes:
        subset = [splits["train"][i] for i in sorted(order[:n])]
        run_dir = out / f"n-{n:05d}"
        runs.append({"train_examples": n, "run_dir": str(run_dir)})
        if not (run_dir / "predictions.json").is_file():
            train_file = data_dir / f"train-{n:05d}.jsonl"
            atomic_write_jsonl(train_file, [e.to_dict() for e in subset])
            update = {
                "data": cfg.data.model_copy(
                    update={
                        "train": train_file,
                        "validation": data_dir / "validation.jsonl",
                        "test": data_dir / "test.jsonl",
                        "format": "chat",
                    }
                ),
                "output_dir": run_dir,
            }
            if budget_seconds is not None:  # each size its share of the budget, by its size
                update["train"] = cfg.train.model_copy(update={"time_budget": budget_seconds * n / total})
            sized = cfg.model_copy(update=update)
            if not quiet:
                console.print(f"[bold]curve: {n} training examples[/] -> {run_dir}")
            train(sized, quiet=quiet, overwrite=True)
            options = {} if task.data == "labels" else {"few_shot": 0, "probe": "none"}
            evaluate(run_dir, quiet=quiet, **options)
        metric, rows = example_results(run_dir)
        results.append(rows)
        group_counts.append(train_groups(subset))

    analysis = analyse(sizes, results, group_counts, metric)
    analysis["runs"] = runs
    if analysis["targets"]:
        analysis["augment"] = (
            f"tunekit data augment {runs[-1]['run_dir']} --labels {','.join(analysis['targets'])}"
        )
    atomic_write_json(out / "curve.json", analysis)
    atomic_write_text(out / "curve.md", curve_markdown(analysis))
    return analysis


def curve_markdown(a: dict) -> str:
    c, p = a["curve"], a["power"]
    metric = c["metric"]
    lines = ["# How much more data would help", "", f"| training examples | {metric} |", "|---|---|"]
    lines += [f"| {pt['train_examples']:,} | {pt[metric]:.3f} |" for pt in c["points"]]
    lines += ["", f"- overall: {c.get('advice', 'no slope could be fitted')}"]
    lines += [f"- {g['advice']}" for g in a.get("guessed", [])]
    pm = p["mde_paired"]
    lines += [
        f"- test set: {p['test_examples']} examples detect a difference of "
        + (f"{pm:.3f} (paired)" if pm is not None else "- (paired: the two largest runs never disagree)")
        + f" or {p['mde_unpaired']:.3f} (unpaired) at 5% with 80% power",
        "",
        "| group | test | train | accuracy by size | gain per doubling [95% CI] | on the test set |",
        "|---|---|---|---|---|---|",
    ]
    for g in a["groups"]:
        accs = " / ".join(f"{x:.2f}" for x in g["accuracy"])
        if "gain_per_doubling" in g:
            gain = f"{g['gain_per_doubling']:+.2f} [{g['gain_ci_low']:+.2f}, {g['gain_ci_high']:+.2f}]"
            share = f"{g['test_set_gain']:+.3f}" if "test_set_gain" in g else "(a guess)"
        else:
            gain, share = "-", "-"
        lines.append(
            f"| `{g['group']}` | {g['test_examples']} | {g['train_examples']} | {accs} | {gain} | {share} |"
        )
    if a.get("augment"):
        lines += ["", f"Grow the groups with a significant slope: `{a['augment']}`"]
    return "\n".join(lines) + "\n"


def print_curve(a: dict, out) -> None:
    """The summary a terminal shows: the points, the overall advice, the top groups, the power."""
    c, p = a["curve"], a["power"]
    metric = c["metric"]
    for pt in c["points"]:
        out.print(f"{pt['train_examples']:>7,} training examples: {metric} {pt[metric]:.3f}")
    out.print(f"overall: {c.get('advice', 'no slope could be fitted')}")
    for g in a.get("guessed", []):
        out.print(f"  {g['advice']}")
    for g in [g for g in a["groups"] if "advice" in g][:5]:
        out.print(f"  {g['advice']}")
    pm = p["mde_paired"]
    out.print(
        f"test set: {p['test_examples']} examples detect "
        + (f"{pm:.3f} paired / " if pm is not None else "")
        + f"{p['mde_unpaired']:.3f} unpaired ({metric} difference, 5%, power 80%)"
    )
    if a.get("augment"):
        out.print(f"next: {a['augment']}")
