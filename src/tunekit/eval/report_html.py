"""report.html: one self-contained page (no network) a person opens in a browser.

Sections: loss curves, the contender comparison (with 95% CIs), the verdict, the confusion matrix, the
forgetting probe and the failure list. Plots are drawn by matplotlib (Agg, no display) and
embedded as base64 PNG data URIs; the styles are inline; nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from tunekit.eval.report import prediction_line
from tunekit.io import atomic_write_text

COLORS = {"base": "#9e9e9e", "base_few_shot": "#ffb74d", "finetuned": "#1e88e5"}


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    return plt


def loss_plot(training: dict) -> str | None:
    if not training.get("train_loss"):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    steps, losses = zip(*training["train_loss"], strict=True)
    ax.plot(steps, losses, label="train loss", color="#1e88e5", lw=1.2)
    if training.get("val_loss"):
        vs, vl = zip(*training["val_loss"], strict=True)
        ax.plot(vs, vl, "o-", label="validation loss", color="#e53935", lw=1.5)
    if training.get("best_step"):
        ax.axvline(training["best_step"], ls="--", color="#43a047", label="best (kept)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def contenders_plot(report: dict) -> str:
    plt = _pyplot()
    tm = report["task_metric"]
    c = report["contenders"]
    names = list(c)
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    vals = [c[n][tm] for n in names]
    err = [
        [max(0.0, v - c[n].get(tm + "_ci_low", v)) for n, v in zip(names, vals, strict=True)],
        [max(0.0, c[n].get(tm + "_ci_high", v) - v) for n, v in zip(names, vals, strict=True)],
    ]
    ax.bar(names, vals, yerr=err, capsize=6, color=[COLORS.get(n, "#777") for n in names])
    ax.set_ylabel(f"{tm} (95% CI)")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def confusion_plot(cm: dict) -> str:
    plt = _pyplot()
    labels, cols, matrix = cm["labels"], cm["columns"], cm["matrix"]
    size = max(3.5, 0.35 * len(cols) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    if len(cols) <= 25:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, v, ha="center", va="center", fontsize=7)
    return _png(fig)


def forgetting_plot(forgetting: dict) -> str:
    plt = _pyplot()
    parts = forgetting["parts"]
    names = list(parts)
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    x = range(len(names))
    for off, who in ((-0.2, "base"), (0.2, "finetuned")):
        vals = [parts[n][who] for n in names]
        err = [
            [v - parts[n][who + "_ci_low"] for n, v in zip(names, vals, strict=True)],
            [parts[n][who + "_ci_high"] - v for n, v in zip(names, vals, strict=True)],
        ]
        ax.bar([i + off for i in x], vals, 0.4, yerr=err, capsize=4, label=who, color=COLORS[who])
    ax.set_xticks(list(x), names)
    ax.set_ylabel("accuracy (95% CI)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _f(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} .warn{background:#fff3cd;padding:0.6em;border-left:4px solid #f0ad4e}
pre{white-space:pre-wrap;margin:0} img{max-width:100%}
"""


def verdict_html(v: dict) -> list[str]:
    """The verdict section (eval/verdict.py): the recommendation, the pricing, each contender's
    quality, tokens, latency and cost per 1,000 requests."""
    from tunekit.eval.verdict import format_count

    pricing, t, even = v["pricing"], v["training"], v["break_even_requests"]
    priced = (
        f"{pricing['price_per_1k_tokens']:g} per 1,000 tokens"
        if pricing["per"] == "1k_tokens"
        else f"{pricing['price_per_hour']:g} per hardware hour x measured seconds per request"
    )
    trained = (
        f"{t['cost']:.4g} ({t['seconds']:.0f} s)" if t["seconds"] is not None else "unknown (priced as 0)"
    )
    th = v["thresholds"]
    rows = [
        [
            n,
            ("-" if r["quality"] is None else f"{r['quality']:.3f}")
            + (f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r["ci_low"] is not None else ""),
            f"{r['prompt_tokens']:.1f}",
            f"{r['completion_tokens']:.1f}",
            f"{r['latency_s']:.4f}",
            f"{r['cost_per_1k_requests']:.4g}",
        ]
        for n, r in v["contenders"].items()
    ]
    return [
        "<section id='verdict'><h2>Verdict</h2>",
        f"<p class='verdict'><b>{html.escape(v['recommendation'])}</b></p>",
        f"<p>Serving priced at {html.escape(priced)}; training cost {html.escape(trained)}; break-even "
        f"against {html.escape(v['prompting'])}: "
        + (f"{format_count(even)} requests" if even is not None else "never (no saving per request)")
        + f". Margin {th['margin']:g}, alpha {th['alpha']:g} (eval.verdict_margin, eval.verdict_alpha).</p>",
        _table(
            [
                "contender",
                f"{v['metric']} [95% CI]",
                "prompt tokens",
                "completion tokens",
                "s per request",
                "cost per 1,000 requests",
            ],
            rows,
        ),  # fmt: skip
        "</section>",
    ]


def render_html(report: dict) -> str:
    """The page as a string (see write_report_html)."""
    from tunekit.eval.report import metric_names

    tm = report["task_metric"]
    c = report["contenders"]
    names = list(c)
    s = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>tunekit evaluation report</title>"
        f"<style>{CSS}</style></head><body>",
        "<h1>Evaluation report</h1>",
        f"<p>Held-out test: {report['n_test']} examples from <code>{html.escape(report['test_data'])}</code>, "
        f"{html.escape(prediction_line(report.get('prediction')))}; task metric <b>{html.escape(tm)}</b>. "
        "Brackets are 95% bootstrap confidence "
        "intervals.</p>",
    ]
    training = report.get("training", {})
    s.append("<section id='loss-curves'><h2>Loss curves</h2>")
    if training.get("overfitting_warning"):
        s.append(f"<p class='warn'>{html.escape(training['overfitting_warning'])}</p>")
    if training.get("stopped_early"):
        s.append(
            f"<p>Stopped early; the weights of step {training.get('best_step')} (best validation loss) were kept.</p>"
        )
    img = loss_plot(training)
    s.append(
        f"<img alt='loss curves' src='{img}'>" if img else "<p>No metrics.jsonl in the run directory.</p>"
    )
    s.append("</section>")

    s.append("<section id='contenders'><h2>Contenders</h2>")
    s.append(f"<img alt='contender comparison' src='{contenders_plot(report)}'>")
    rows = []
    for m in metric_names(c[names[0]]):
        cells = []
        for n in names:
            ci = f" [{c[n][m + '_ci_low']:.3f}, {c[n][m + '_ci_high']:.3f}]" if m + "_ci_low" in c[n] else ""
            cells.append(_f(c[n].get(m)) + ci)
        rows.append([m, *cells])
    s.append(_table(["metric", *names], rows))
    if report.get("comparisons"):
        s.append("<h3>Paired differences</h3>")
        s.append(
            _table(
                ["comparison", "metric", "difference", "95% CI", "p-value", "test"],
                [
                    [
                        k,
                        d["metric"],
                        f"{d['difference']:+.3f}",
                        f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
                        f"{d['p_value']:.3g}" + (" (significant)" if d["significant"] else ""),
                        d["test"],
                    ]
                    for k, d in report["comparisons"].items()
                ],
            )
        )
    s.append("</section>")
    if report.get("verdict"):
        s += verdict_html(report["verdict"])

    s.append("<section id='confusion-matrix'><h2>Confusion matrix</h2>")
    cms = report.get("confusion_matrix")
    if cms:
        for who, cm in cms.items():
            s.append(
                f"<h3>{html.escape(who)}</h3><img alt='confusion matrix {who}' src='{confusion_plot(cm)}'>"
            )
    else:
        s.append("<p>Not a labelled task: no confusion matrix (see the failure list for the confusions).</p>")
    s.append("</section>")

    s.append("<section id='forgetting'><h2>Forgetting probe</h2>")
    f = report.get("forgetting")
    if f:
        s.append(f"<p>Probe: <code>{html.escape(f['source'])}</code>. Drop = base minus fine-tuned.</p>")
        s.append(f"<img alt='forgetting probe' src='{forgetting_plot(f)}'>")
        s.append(
            _table(
                ["part", "questions", "base", "fine-tuned", "drop [95% CI]", "p-value"],
                [
                    [
                        n,
                        p["n"],
                        f"{p['base']:.3f}",
                        f"{p['finetuned']:.3f}",
                        f"{p['drop']:+.3f} [{p['drop_ci_low']:+.3f}, {p['drop_ci_high']:+.3f}]",
                        f"{p['p_value']:.3g}",
                    ]
                    for n, p in f["parts"].items()
                ],
            )
        )
    else:
        s.append("<p>No probe was run (eval.probe is null).</p>")
    s.append("</section>")

    s.append("<section id='failures'><h2>Failures</h2>")
    fa = report.get("failure_analysis") or {}
    if fa.get("by_error_type"):
        s.append(
            _table(["error type", "count"], [[t["error_type"], t["count"]] for t in fa["by_error_type"]])
        )
    if fa.get("top_confusions"):
        s.append("<h3>Most frequent confusions</h3>")
        s.append(
            _table(["expected -> got", "count"], [[x["confusion"], x["count"]] for x in fa["top_confusions"]])
        )
    if fa.get("guessed_fields"):
        s.append("<h3>Not learned yet</h3><ul>")
        s += [f"<li>{html.escape(g['advice'])}</li>" for g in fa["guessed_fields"]]
        s.append("</ul>")
    if fa.get("weak_groups"):
        s.append("<h3>Where more training examples are needed</h3><ul>")
        s += [f"<li>{html.escape(g['advice'])}</li>" for g in fa["weak_groups"]]
        s.append("</ul>")
    s.append(
        _table(
            ["source", "prompt", "reference", "fine-tuned"],
            [
                [r["source"], r["prompt"][:300], r["reference"], r["finetuned"]]
                for r in report["failures"][:50]
            ],
        )
    )
    s.append("</section></body></html>")
    return "\n".join(s)


def write_report_html(run_dir: Path, report: dict) -> Path:
    path = Path(run_dir) / "report.html"
    atomic_write_text(path, render_html(report))
    return path
