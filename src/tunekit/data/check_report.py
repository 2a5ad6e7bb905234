"""The terminal view of a `CheckReport`: a summary, the problems, duplicates, leakage and statistics."""

from __future__ import annotations

from collections import Counter

from rich.table import Table

from tunekit.console import out
from tunekit.data.check import CheckReport

SHOW = 20  # rows of each list shown in the terminal; --json has them all


def print_report(report: CheckReport) -> None:
    d = report.to_dict()
    out.print(
        f"[bold]data check[/]: {d['total']} rows, {d['kept']} kept, {d['rejected']} rejected; "
        f"{len(d['errors'])} errors, {len(d['warnings'])} warnings, {len(d['duplicates'])} duplicate groups, "
        f"{len(d['leakage'])} leaked pairs"
    )
    for f in report.files:
        if f.unreadable:
            out.print(f"[bold red]cannot read[/] {f.unreadable}")
    for title, probs in (("errors", report.errors), ("warnings", report.warnings)):
        if probs:
            _problems(title, probs)
    if report.duplicates:
        t = Table(title="duplicates within a file")
        for c in ("file", "kind", "lines", "similarity"):
            t.add_column(c)
        for x in report.duplicates[:SHOW]:
            t.add_row(
                x["file"], x["kind"], ", ".join(map(str, x["lines"][:10])), str(x.get("similarity", 1.0))
            )
        out.print(t)
    if report.leakage:
        t = Table(title="leakage between files")
        for c in ("kind", "a", "b", "similarity"):
            t.add_column(c)
        for x in report.leakage[:SHOW]:
            a, b = x["a"], x["b"]
            t.add_row(
                x["kind"],
                f"{a['file']}:{a['line']}",
                f"{b['file']}:{b['line']}",
                str(x.get("similarity", 1.0)),
            )
        out.print(t)
    _stats(report)


def _problems(title: str, probs) -> None:
    kinds = Counter(p.kind for p in probs)
    out.print(f"[bold]{title}[/] by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    t = Table(title=f"{title} (first {min(SHOW, len(probs))} of {len(probs)})")
    for c in ("where", "field", "kind", "message"):
        t.add_column(c, overflow="fold")
    for p in probs[:SHOW]:
        t.add_row(f"{p.file}:{p.line}", p.field, p.kind, p.message)
    out.print(t)


def _stats(report: CheckReport) -> None:
    s = report.stats
    if not s.get("examples"):
        return
    t = Table(title="statistics")
    t.add_column("figure")
    t.add_column("value", overflow="fold")
    t.add_row("examples", str(s.get("examples")))
    t.add_row("formats", ", ".join(f"{k} {v}" for k, v in s.get("formats", {}).items()))
    for key in ("turns_per_example", "tokens_per_example"):
        if s.get(key):
            t.add_row(key.replace("_", " "), ", ".join(f"{k} {v}" for k, v in s[key].items()))
    if "total_tokens" in s:
        t.add_row("total tokens", f"{s['total_tokens']:,}")
        t.add_row(f"over max_length {s['max_length']}", str(s.get("over_max_length", 0)))
    if "labels" in s:
        labels = s["labels"]
        t.add_row(
            "labels", f"{len(labels)} labels; imbalance (largest / smallest) {s['label_imbalance_ratio']}"
        )
    if "tool_calls" in s:  # tool use (data/tools.py)
        tc = s["tool_calls"]
        t.add_row(
            "tool calls",
            f"{tc['calls']} calls of {tc['functions_called']} functions in {tc['examples_with_calls']} examples; "
            f"{tc['examples_with_tools']} examples declare tools"
            + (f"; rendered by {tc['rendering']}" if "rendering" in tc else ""),
        )
    if "reasoning_turns" in s:
        t.add_row("reasoning", f"{s['reasoning_turns']} assistant turns think first (data.reasoning)")
    if "feedback" in s:  # KTO: answers rated each way
        t.add_row(
            "ratings", f"{s['feedback']['desirable']} desirable, {s['feedback']['undesirable']} undesirable"
        )
    e = report.estimate
    if e:
        t.add_row(
            "training estimate",
            f"{e['training_tokens']:,} tokens at {e['measured_tokens_per_s']:.0f} tokens/s (measured here) "
            f"= {e['estimated_seconds'] / 60:.1f} min; peak memory {e['peak_memory_mb']:.0f} MB"
            + (
                f"; cost {e['estimated_cost']:.2f} at {e['price_per_hour']}/hour"
                if "estimated_cost" in e
                else ""
            ),
        )
    out.print(t)
