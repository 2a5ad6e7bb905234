"""The verdict: keep prompting the base model, or fine-tune it? One section of report.json/.md/.html.

From what `tunekit eval` measured on the held-out test set (each contender's task metric with its
95% CI, its prompt and completion tokens and its seconds per request) and what the run cost to
train (train_summary.json's wall time), priced as the run's config says:

- serving cost per 1,000 requests: per token (`eval.price_per_1k_tokens` x the measured prompt and
  completion tokens: few-shot prompts are longer, which is the point) or, when that is null, per
  hardware hour (`eval.price_per_hour` x the measured seconds per request at `eval.batch_size`);
- training cost: the run's measured wall time x `eval.price_per_hour`;
- break-even volume: training cost / the per-request saving of the fine-tuned model over prompting
  (none when it saves nothing);
- a one-line recommendation. The prompting contender is `base_few_shot` (else the zero-shot `base`);
  d is the fine-tuned model's task metric minus the prompting one's, with the paired test's CI and
  p-value, in the metric's own units (higher is better), margin = `eval.verdict_margin`,
  alpha = `eval.verdict_alpha`:
    1. d > margin and p < alpha: fine-tune (the gain is real and large enough);
    2. d < 0 and p < alpha: keep prompting (prompting is better);
    3. the 95% CI of d lies within [-margin, +margin]: prompting is as good: keep prompting, unless
       `eval.expected_requests` exceeds the break-even volume (then fine-tune: as good and cheaper);
    4. otherwise inconclusive: the test set cannot tell; keep prompting (it needs no training) until
       more test examples decide.

Everything below the reader (`training_seconds`) is a pure function of numbers and dicts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PROMPTING = ("base_few_shot", "base")  # the prompting contender: few-shot when it was run


def cost_per_1k_requests(contender: dict, price_per_hour: float, price_per_1k_tokens: float | None) -> float:
    """What 1,000 requests like the test set's cost this contender: per token when a token price is
    given (prompt + completion tokens), else per hardware hour from the measured seconds per request."""
    if price_per_1k_tokens is not None:
        tokens = contender["prompt_tokens_per_example"] + contender["completion_tokens_per_example"]
        return tokens * price_per_1k_tokens  # 1,000 requests x tokens / 1,000 x price
    return 1000 * contender["latency_s_per_example"] / 3600 * price_per_hour


def training_cost(seconds: float, price_per_hour: float) -> float:
    """The price of `seconds` of the training hardware."""
    return seconds / 3600 * price_per_hour


def break_even_requests(train_cost: float, prompting_per_1k: float, finetuned_per_1k: float) -> float | None:
    """Requests after which training plus serving the fine-tuned model costs less than prompting:
    training cost / the saving per request; None when the fine-tuned model saves nothing per request."""
    saving = (prompting_per_1k - finetuned_per_1k) / 1000
    if saving <= 0:
        return None
    return train_cost / saving


def format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def format_count(n: float) -> str:
    """A request count for a sentence, to 2 significant figures: 12,000, 340, 1.2 million."""
    if n >= 1e6:
        return f"{float(f'{n / 1e6:.2g}'):g} million"
    return f"{int(float(f'{max(n, 1):.2g}')):,}"


def payback(break_even: float | None, train_cost_known: bool = True) -> str:
    """When the fine-tuned model pays back its training, as the recommendation says it."""
    if break_even is None:
        return "never cheaper per request than prompting"
    if not train_cost_known:
        return "cheaper per request (its training cost is unknown: no train_summary.json)"
    n = format_count(break_even)
    return f"cheaper after {n} request{'' if n == '1' else 's'}"


def recommend(
    difference: dict | None,
    metric: str,
    prompting: str,
    break_even: float | None,
    margin: float,
    alpha: float,
    expected_requests: int | None = None,
    n_test: int | None = None,
    train_cost_known: bool = True,
) -> tuple[str, str]:
    """(choice, one line) from the paired difference fine-tuned - prompting (`difference`:
    difference, ci_low, ci_high, p_value), by the rules in this module's docstring. The choice is
    "fine-tune", "keep prompting" or "inconclusive"."""
    who = "few-shot prompting" if prompting == "base_few_shot" else "zero-shot prompting"
    pays = payback(break_even, train_cost_known)
    if difference is None:
        return "inconclusive", (
            f"inconclusive: {metric} has no per-example scores, so no paired test against {who}; "
            f"fine-tuning is {pays}"
        )
    d, lo, hi, p = (difference[k] for k in ("difference", "ci_low", "ci_high", "p_value"))
    points = f"{margin * 100:g} points" if margin < 1 else f"{margin:g}"
    if d > margin and p < alpha:
        return "fine-tune", f"fine-tune: {d:+.2f} {metric} over {who} ({format_p(p)}), {pays}"
    if d < 0 and p < alpha:
        return "keep prompting", f"keep prompting: {who} is better by {-d:.2f} {metric} ({format_p(p)})"
    if -margin <= lo and hi <= margin:
        known = expected_requests is not None and break_even is not None and train_cost_known
        if known and break_even < expected_requests:
            return "fine-tune", (
                f"fine-tune: {who} is within {points} ({d:+.2f} {metric}, 95% CI [{lo:+.2f}, {hi:+.2f}]) "
                f"but the fine-tuned model is {pays}, fewer than the {expected_requests:,} expected"
            )
        return "keep prompting", (
            f"{who} is within {points} ({d:+.2f} {metric}, 95% CI [{lo:+.2f}, {hi:+.2f}]): keep prompting"
            + (f" (fine-tuning is {pays})" if break_even is not None else "")
        )
    on = f" on {n_test} test examples" if n_test else ""
    return "inconclusive", (
        f"inconclusive: {d:+.2f} {metric} over {who} (95% CI [{lo:+.2f}, {hi:+.2f}], {format_p(p)}){on} is "
        f"neither a significant gain above {points} nor shown within it; keep prompting until more test "
        "examples decide"
    )


def verdict(
    report: dict,
    train_seconds: float | None,
    price_per_hour: float,
    price_per_1k_tokens: float | None = None,
    margin: float = 0.02,
    alpha: float = 0.05,
    expected_requests: int | None = None,
) -> dict:
    """The decision section of report.json, from its `task_metric`, `contenders` and `comparisons`
    and the run's training wall time (None: unknown, priced as 0 and said so)."""
    tm, c = report["task_metric"], report["contenders"]
    prompting = next(n for n in PROMPTING if n in c)
    costs = {n: cost_per_1k_requests(m, price_per_hour, price_per_1k_tokens) for n, m in c.items()}
    rows = {
        n: {
            "quality": m.get(tm),
            "ci_low": m.get(f"{tm}_ci_low"),
            "ci_high": m.get(f"{tm}_ci_high"),
            "prompt_tokens": m["prompt_tokens_per_example"],
            "completion_tokens": m["completion_tokens_per_example"],
            "latency_s": m["latency_s_per_example"],
            "cost_per_1k_requests": costs[n],
        }
        for n, m in c.items()
    }
    train_cost = training_cost(train_seconds or 0.0, price_per_hour)
    even = break_even_requests(train_cost, costs[prompting], costs["finetuned"])
    diff = report.get("comparisons", {}).get(f"finetuned_vs_{prompting}")
    diff = diff if diff and diff.get("metric") == tm else None
    choice, line = recommend(
        diff,
        tm,
        prompting,
        even,
        margin,
        alpha,
        expected_requests,
        report.get("n_test"),
        train_seconds is not None,
    )
    return {
        "metric": tm,
        "prompting": prompting,
        "pricing": {
            "per": "1k_tokens" if price_per_1k_tokens is not None else "hour",
            "price_per_hour": price_per_hour,
            "price_per_1k_tokens": price_per_1k_tokens,
        },
        "contenders": rows,
        "training": {"seconds": train_seconds, "cost": train_cost},
        "difference": {k: diff[k] for k in ("difference", "ci_low", "ci_high", "p_value", "test")}
        if diff
        else None,
        "saving_per_1k_requests": costs[prompting] - costs["finetuned"],
        "break_even_requests": even,
        "thresholds": {"margin": margin, "alpha": alpha, "expected_requests": expected_requests},
        "choice": choice,
        "recommendation": line,
    }


def run_verdict(run_dir: Path, report: dict, eval_cfg) -> dict:
    """`verdict` for a run: its measured training wall time, priced and judged as its `eval.*` keys
    (price_per_hour, price_per_1k_tokens, verdict_margin, verdict_alpha, expected_requests) say."""
    return verdict(
        report,
        training_seconds(run_dir),
        eval_cfg.price_per_hour,
        eval_cfg.price_per_1k_tokens,
        eval_cfg.verdict_margin,
        eval_cfg.verdict_alpha,
        eval_cfg.expected_requests,
    )


def training_seconds(run_dir: Path) -> float | None:
    """The run's measured wall time (train_summary.json: setup, training and saving), or None."""
    path = Path(run_dir) / "train_summary.json"
    if not path.is_file():
        return None
    seconds = json.loads(path.read_text()).get("wall_seconds")
    return float(seconds) if isinstance(seconds, int | float) and math.isfinite(seconds) else None


def verdict_lines(v: dict) -> list[str]:
    """The verdict as markdown lines (report.md); report.html renders the same dict."""
    pricing = v["pricing"]
    priced = (
        f"{pricing['price_per_1k_tokens']:g} per 1,000 tokens (eval.price_per_1k_tokens)"
        if pricing["per"] == "1k_tokens"
        else f"{pricing['price_per_hour']:g} per hardware hour x measured seconds per request (eval.price_per_hour)"
    )
    t = v["training"]
    trained = (
        f"{t['seconds']:.0f} s x {pricing['price_per_hour']:g} per hour = {t['cost']:.4g}"
        if t["seconds"] is not None
        else "unknown (no train_summary.json): priced as 0"
    )
    even = v["break_even_requests"]
    th = v["thresholds"]
    lines = [
        "## Verdict\n",
        f"**{v['recommendation']}**\n",
        f"Serving priced at {priced}; training: {trained}. Break-even against `{v['prompting']}`: "
        + (f"{format_count(even)} requests." if even is not None else "never (no saving per request).")
        + f" Rules: margin {th['margin']:g} (eval.verdict_margin), alpha {th['alpha']:g} (eval.verdict_alpha)"
        + (f", expected requests {th['expected_requests']:,}" if th["expected_requests"] else "")
        + ".\n",
        f"| contender | {v['metric']} [95% CI] | prompt tokens | completion tokens | s per request "
        "| cost per 1,000 requests |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in v["contenders"].items():
        q = "-" if r["quality"] is None else f"{r['quality']:.3f}"
        ci = f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r["ci_low"] is not None else ""
        lines.append(
            f"| {n} | {q}{ci} | {r['prompt_tokens']:.1f} | {r['completion_tokens']:.1f} | {r['latency_s']:.4f} "
            f"| {r['cost_per_1k_requests']:.4g} |"
        )
    return lines + [""]
