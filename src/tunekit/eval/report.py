"""report.md: the comparison a person reads, from the same dict as report.json."""

from __future__ import annotations

import json
from pathlib import Path

from tunekit.io import atomic_write_text
from tunekit.runs.directory import read_metrics


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def metric_names(contender: dict) -> list[str]:
    """The metrics of a contender's dict, without their `_ci_low`/`_ci_high` companions."""
    return [m for m in contender if not m.endswith(("_ci_low", "_ci_high"))]


def contender_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The contenders side by side: (their names, one row per metric: [metric, cell per contender]),
    a cell `value [low, high]` where the metric has a CI, `-` where a contender lacks the metric.
    The one source of report.md's table and of the table `tunekit eval` prints."""
    contenders = report["contenders"]
    names = list(contenders)
    metrics = dict.fromkeys(m for c in contenders.values() for m in metric_names(c))
    rows = []
    for m in metrics:
        cells = [m]
        for c in contenders.values():
            v = c.get(m)
            if isinstance(v, dict | list):
                break  # a structured value (a confusion matrix): report.md shows it on its own
            ci = f" [{c[m + '_ci_low']:.3f}, {c[m + '_ci_high']:.3f}]" if m + "_ci_low" in c else ""
            cells.append(("-" if v is None else _fmt(v)) + ci)
        else:
            rows.append(cells)
    return names, rows


def comparison_table(report: dict) -> str:
    """A markdown table: one row per metric, one column per contender; `value [low, high]` with a CI."""
    names, rows = contender_rows(report)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    return "\n".join(lines + [f"| {r[0]} | " + " | ".join(r[1:]) + " |" for r in rows])


def print_contenders(report: dict) -> None:
    """The contenders' table on the terminal (`tunekit eval`, `tunekit quickstart`), and the verdict."""
    from rich.table import Table

    from tunekit.console import out

    names, rows = contender_rows(report)
    table = Table(title=f"held-out test: {report['n_test']} examples")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*r)
    out.print(table)
    if report.get("verdict"):
        out.print(f"verdict: {report['verdict']['recommendation']}", markup=False)


def training_curves(run_dir: Path) -> dict:
    """Train and validation loss by step from metrics.jsonl, and an overfitting warning when the
    validation loss rose while the training loss fell."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    summary_path = Path(run_dir) / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {
        "train_loss": train,
        "val_loss": val,
        "overfitting_warning": overfitting_warning(train, val),
        "stopped_early": summary.get("stopped_early", False),
        "best_step": summary.get("best_step"),
    }


def overfitting_warning(train: list[tuple[int, float]], val: list[tuple[int, float]]) -> str | None:
    """A sentence when validation loss ends above its minimum while training loss kept falling."""
    if len(val) < 2:
        return None
    best_step, best = min(val, key=lambda sv: sv[1])
    last_step, last = val[-1]
    if last <= best * 1.01 or last_step == best_step:
        return None

    def train_mean_near(step: int) -> float:
        window = [loss for s, loss in train if step - 5 < s <= step]
        return sum(window) / len(window) if window else float("nan")

    if not train_mean_near(last_step) < train_mean_near(best_step):
        return None
    return (
        f"validation loss rose from {best:.4f} (step {best_step}) to {last:.4f} (step {last_step}) while "
        "training loss fell: the model is overfitting. Set train.early_stopping_patience (keeps the best "
        "weights), train fewer epochs, or add data."
    )


def prediction_line(prediction: dict | None) -> str:
    """How the predictions were made: `labels scored: 77 candidates` (the most likely label as the
    reply, eval/label_scoring.py) or greedy decoding, with the reason label scoring did not apply."""
    if prediction and prediction.get("mode") == "label_scoring":
        return f"labels scored: {prediction['candidates']} candidates (the most likely label as the reply)"
    reason = (prediction or {}).get("reason")
    return "greedy decoding" + (f" ({reason})" if reason else "")


def _block(title: str, text: str) -> str:
    return f"**{title}**\n\n```\n{text}\n```\n"


def write_report(run_dir: Path, report: dict) -> None:
    tm = report["task_metric"]
    c = report["contenders"]
    line = " -> ".join(f"{n} {c[n][tm]:.3f}" for n in c)
    parts = [
        "# Evaluation report\n",
        f"Held-out test: {report['n_test']} examples from `{report['test_data']}`, "
        f"{prediction_line(report.get('prediction'))}. Brackets: 95% bootstrap confidence intervals.\n",
        f"Task metric **{tm}**: {line}.\n",
        comparison_table(report) + "\n",
    ]
    if report.get("comparisons"):
        parts.append("## Paired differences\n")
        parts.append("| comparison | difference | 95% CI | p-value | test |\n|---|---|---|---|---|")
        for k, d in report["comparisons"].items():
            sig = " (significant)" if d["significant"] else ""
            parts.append(
                f"| {k} ({d['metric']}) | {d['difference']:+.3f} | [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
                f"| {d['p_value']:.3g}{sig} | {d['test']} |"
            )
        parts.append("")
    if report.get("verdict"):
        from tunekit.eval.verdict import verdict_lines

        parts += verdict_lines(report["verdict"])
    warning = report.get("training", {}).get("overfitting_warning")
    if warning:
        parts.append(f"> **Warning:** {warning}\n")
    if report.get("forgetting"):
        f = report["forgetting"]
        parts.append(f"## Forgetting probe ({f['source']})\n")
        parts.append(
            "| part | questions | base | fine-tuned | drop [95% CI] | p-value |\n|---|---|---|---|---|---|"
        )
        for name, p in f["parts"].items():
            parts.append(
                f"| {name} | {p['n']} | {p['base']:.3f} | {p['finetuned']:.3f} | {p['drop']:+.3f} "
                f"[{p['drop_ci_low']:+.3f}, {p['drop_ci_high']:+.3f}] | {p['p_value']:.3g} |"
            )
        parts.append("")
    fa = report.get("failure_analysis")
    if fa:
        parts.append(f"## Failure triage ({fa['n_failures']} failures)\n")
        parts += [f"- {t['error_type']}: {t['count']}" for t in fa["by_error_type"]]
        if fa["top_confusions"]:
            parts.append("\nMost frequent confusions (expected -> got):\n")
            parts += [f"- `{x['confusion']}`: {x['count']}" for x in fa["top_confusions"]]
        if fa.get("guessed_fields"):
            parts.append("\nNot learned yet:\n")
            parts += [f"- {g['advice']}" for g in fa["guessed_fields"]]
        if fa["weak_groups"]:
            parts.append("\nWhere more training examples are needed:\n")
            parts += [f"- {g['advice']}" for g in fa["weak_groups"]]
        parts.append("")
    parts.append("## Side by side\n")
    names = list(c)
    for i, r in enumerate(report["examples"], 1):
        parts.append(f"### Example {i} ({r['source']})\n")
        parts += [_block("prompt", r["prompt"]), _block("reference", r["reference"])]
        for n in names:
            parts.append(_block(f"{n} ({'ok' if r[n + '_correct'] else 'wrong'})", r[n]))
    parts.append(f"## Fine-tuned failures ({len(report['failures'])})\n")
    for r in report["failures"][:20]:
        parts.append(f"- `{r['source']}`: expected `{r['reference']}`, got `{r['finetuned']}`")
    atomic_write_text(run_dir / "report.md", "\n".join(parts) + "\n")
