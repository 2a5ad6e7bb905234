"""report.md: the comparison a person reads, from the same dict as report.json."""

from __future__ import annotations

from pathlib import Path

from tunekit.io import atomic_write_text


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def comparison_table(report: dict) -> str:
    """A markdown table: one row per metric, one column per contender."""
    names = list(report["contenders"])
    metrics = list(report["contenders"][names[0]])
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(_fmt(report["contenders"][n].get(m)) for n in names) + " |")
    return "\n".join(lines)


def _block(title: str, text: str) -> str:
    return f"**{title}**\n\n```\n{text}\n```\n"


def write_report(run_dir: Path, report: dict) -> None:
    tm = report["task_metric"]
    c = report["contenders"]
    parts = [
        "# Evaluation report\n",
        f"Held-out test: {report['n_test']} examples from `{report['test_data']}`, greedy decoding.\n",
        f"Task metric **{tm}**: base {c['base'][tm]:.3f} -> fine-tuned {c['finetuned'][tm]:.3f}.\n",
        comparison_table(report) + "\n",
        "## Side by side\n",
    ]
    for i, r in enumerate(report["examples"], 1):
        parts.append(f"### Example {i} ({r['source']})\n")
        parts += [_block("prompt", r["prompt"]), _block("reference", r["reference"])]
        parts += [_block(f"base ({'ok' if r['base_correct'] else 'wrong'})", r["base"])]
        parts += [_block(f"fine-tuned ({'ok' if r['finetuned_correct'] else 'wrong'})", r["finetuned"])]
    parts.append(f"## Fine-tuned failures ({len(report['failures'])})\n")
    for r in report["failures"][:20]:
        parts.append(f"- `{r['source']}`: expected `{r['reference']}`, got `{r['finetuned']}`")
    atomic_write_text(run_dir / "report.md", "\n".join(parts) + "\n")
