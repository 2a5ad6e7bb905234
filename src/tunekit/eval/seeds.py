"""`tunekit eval GROUP`: every run of a seed group (`tunekit train CONFIG --seeds K`) evaluated, and
each metric's spread across the seeds: GROUP/seeds_report.json and seeds_report.md.

The runs share their test examples (train/seeds.py keeps data.split_seed), so the spread of a
contender's metric across seeds is training noise alone; the report sets it beside the test set's
own 95% interval, the other source of noise in a single run's figure.
"""

from __future__ import annotations

from pathlib import Path

from tunekit.console import err as console
from tunekit.eval.report import metric_names
from tunekit.eval.stats import spread
from tunekit.io import atomic_write_json, atomic_write_text
from tunekit.train.seeds import group_runs


def evaluate_group(group: str | Path, data=None, quiet: bool = False, **options) -> dict:
    """Evaluate each run of the group as `tunekit eval RUN` does (each gets its own report), then
    summarise them (`seed_summary`) into GROUP/seeds_report.json and .md."""
    from tunekit.eval.evaluate import evaluate

    group = Path(group)
    reports = {}
    for seed, run in group_runs(group):
        if not quiet:
            console.print(f"seed {seed}: {run}")
        reports[seed] = evaluate(run, data, quiet, **options)
    summary = seed_summary(reports) | {"runs": [str(r) for _, r in group_runs(group)]}
    atomic_write_json(group / "seeds_report.json", summary)
    atomic_write_text(group / "seeds_report.md", "\n".join(seed_lines(summary)) + "\n")
    return summary


def seed_summary(reports: dict[int, dict]) -> dict:
    """Per contender, per numeric metric: its spread across seeds (`stats.spread`) and each seed's
    value; the choice each seed's verdict made; and a sentence weighing the fine-tuned model's seed
    spread against the test set's interval."""
    first = next(iter(reports.values()))
    tm = first["task_metric"]
    contenders = {}
    for name, c in first["contenders"].items():
        rows = {}
        for m in metric_names(c):
            values = [r["contenders"].get(name, {}).get(m) for r in reports.values()]
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                rows[m] = spread(values) | {"per_seed": values}
        contenders[name] = rows
    return {
        "task_metric": tm,
        "seeds": list(reports),
        "n_test": first.get("n_test"),
        "contenders": contenders,
        "verdicts": {s: r["verdict"]["choice"] for s, r in reports.items() if r.get("verdict")},
        "noise": noise_sentence(tm, reports),
    }


def noise_sentence(tm: str, reports: dict[int, dict]) -> str | None:
    """The fine-tuned task metric's spread across seeds beside the mean half-width of one run's
    95% test interval: which noise dominates a single run's figure."""
    fts = [r["contenders"].get("finetuned") for r in reports.values()]
    if not all(ft and isinstance(ft.get(tm), int | float) for ft in fts):
        return None
    s = spread([ft[tm] for ft in fts])
    text = (
        f"finetuned {tm} across {s['n']} seeds: mean {s['mean']:.3f}, std {s['std']:.3f}, "
        f"range {s['min']:.3f} to {s['max']:.3f}"
    )
    if all(f"{tm}_ci_low" in ft for ft in fts):
        half = sum((ft[f"{tm}_ci_high"] - ft[f"{tm}_ci_low"]) / 2 for ft in fts) / len(fts)
        text += f"; one run's 95% test interval is +-{half:.3f}"
    return text


def seed_lines(summary: dict) -> list[str]:
    """seeds_report.md (and the table `tunekit eval GROUP` prints)."""
    seeds = summary["seeds"]
    lines = [
        "# Seed variance\n",
        f"{len(seeds)} runs differing only in train.seed ({', '.join(map(str, seeds))}), each tested on the same "
        f"{summary['n_test']} examples. Task metric **{summary['task_metric']}**.\n",
    ]
    if summary.get("noise"):
        lines.append(f"{summary['noise']}.\n")
    if summary.get("verdicts"):
        lines.append(
            "Verdict per seed: " + ", ".join(f"{s}: {c}" for s, c in summary["verdicts"].items()) + ".\n"
        )
    lines += ["| contender | metric | mean | std | min | max | per seed |", "|---|---|---|---|---|---|---|"]
    for name, rows in summary["contenders"].items():
        for m, s in rows.items():
            each = ", ".join(f"{v:.4g}" for v in s["per_seed"])
            lines.append(
                f"| {name} | {m} | {s['mean']:.4g} | {s['std']:.2g} | {s['min']:.4g} | {s['max']:.4g} | {each} |"
            )
    return lines + [""]


def print_seed_summary(summary: dict) -> None:
    """The task metric's spread per contender on the terminal."""
    from rich.table import Table

    from tunekit.console import out

    tm = summary["task_metric"]
    table = Table(title=f"{tm} across seeds {', '.join(map(str, summary['seeds']))}")
    for col in ("contender", "mean", "std", "min", "max"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for name, rows in summary["contenders"].items():
        if tm in rows:
            s = rows[tm]
            table.add_row(name, f"{s['mean']:.4f}", f"{s['std']:.4f}", f"{s['min']:.4f}", f"{s['max']:.4f}")
    out.print(table)
    if summary.get("noise"):
        out.print(summary["noise"])
