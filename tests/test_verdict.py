"""The verdict (eval/verdict.py): costs, break-even and the recommendation, against hand-computed cases."""

import pytest

from tunekit.config import config_from_dict
from tunekit.errors import ConfigError
from tunekit.eval.report_html import verdict_html
from tunekit.eval.verdict import (
    break_even_requests,
    cost_per_1k_requests,
    format_count,
    payback,
    recommend,
    training_cost,
    verdict,
    verdict_lines,
)


def _contender(quality: float, prompt: float, completion: float, latency: float) -> dict:
    return {
        "accuracy": quality,
        "accuracy_ci_low": quality - 0.1,
        "accuracy_ci_high": quality + 0.1,
        "prompt_tokens_per_example": prompt,
        "completion_tokens_per_example": completion,
        "latency_s_per_example": latency,
    }


def _diff(d: float, lo: float, hi: float, p: float, metric: str = "accuracy") -> dict:
    return {
        "metric": metric,
        "difference": d,
        "ci_low": lo,
        "ci_high": hi,
        "p_value": p,
        "test": "mcnemar_exact",
    }


def test_cost_per_token_and_per_hour_by_hand():
    c = _contender(0.5, prompt=100, completion=5, latency=0.36)
    # 1,000 requests x 105 tokens = 105,000 tokens at 0.002 per 1,000 tokens = 0.21
    assert cost_per_1k_requests(c, price_per_hour=2.0, price_per_1k_tokens=0.002) == pytest.approx(0.21)
    # 1,000 requests x 0.36 s = 360 s = 0.1 h at 2.0 per hour = 0.2
    assert cost_per_1k_requests(c, price_per_hour=2.0, price_per_1k_tokens=None) == pytest.approx(0.2)
    assert training_cost(1800, 2.0) == pytest.approx(1.0)


def test_break_even_by_hand():
    # training 1.0; prompting 0.21 and fine-tuned 0.04 per 1,000 requests: 0.00017 saved per request
    assert break_even_requests(1.0, 0.21, 0.04) == pytest.approx(1.0 / 0.00017)
    # no saving (or a loss) per request: it never pays back
    assert break_even_requests(1.0, 0.04, 0.04) is None
    assert break_even_requests(1.0, 0.04, 0.21) is None
    assert break_even_requests(0.0, 0.21, 0.04) == 0.0


def test_format_count_rounds_to_two_significant_figures():
    assert format_count(12345) == "12,000"
    assert format_count(5882.35) == "5,900"
    assert format_count(340) == "340"
    assert format_count(0.4) == "1"
    assert format_count(1_234_567) == "1.2 million"


@pytest.mark.parametrize(
    ("diff", "break_even", "expected", "choice", "line"),
    [
        # a large, significant gain: fine-tune, with the break-even volume
        (_diff(0.64, 0.5, 0.78, 1e-5), 12345, None, "fine-tune",
         "fine-tune: +0.64 accuracy over few-shot prompting (p < 0.001), cheaper after 12,000 requests"),
        (_diff(0.03, 0.01, 0.05, 0.012), None, None, "fine-tune",
         "fine-tune: +0.03 accuracy over few-shot prompting (p = 0.012), never cheaper per request than prompting"),
        # significant but below the margin, CI within it: prompting is as good
        (_diff(0.01, 0.005, 0.015, 0.001), 5882, None, "keep prompting",
         "few-shot prompting is within 2 points (+0.01 accuracy, 95% CI [+0.01, +0.01]): keep prompting "
         "(fine-tuning is cheaper after 5,900 requests)"),
        # as good, and the expected volume passes the break-even: fine-tune
        (_diff(0.0, -0.015, 0.018, 1.0), 5882, 100_000, "fine-tune",
         "fine-tune: few-shot prompting is within 2 points (+0.00 accuracy, 95% CI [-0.01, +0.02]) but the "
         "fine-tuned model is cheaper after 5,900 requests, fewer than the 100,000 expected"),
        # as good, and the volume stays below the break-even: keep prompting
        (_diff(0.0, -0.015, 0.018, 1.0), 5882, 1000, "keep prompting",
         "few-shot prompting is within 2 points (+0.00 accuracy, 95% CI [-0.01, +0.02]): keep prompting "
         "(fine-tuning is cheaper after 5,900 requests)"),
        # prompting is significantly better
        (_diff(-0.2, -0.3, -0.1, 0.004), 100, None, "keep prompting",
         "keep prompting: few-shot prompting is better by 0.20 accuracy (p = 0.004)"),
        # a gain the test set cannot confirm
        (_diff(0.05, -0.1, 0.2, 0.5), 100, None, "inconclusive",
         "inconclusive: +0.05 accuracy over few-shot prompting (95% CI [-0.10, +0.20], p = 0.5) on 40 test "
         "examples is neither a significant gain above 2 points nor shown within it; keep prompting until "
         "more test examples decide"),
    ],
)  # fmt: skip
def test_recommendation_rules(diff, break_even, expected, choice, line):
    got = recommend(diff, "accuracy", "base_few_shot", break_even, 0.02, 0.05, expected, n_test=40)
    assert got == (choice, line)


def test_alpha_and_margin_are_the_thresholds():
    d = _diff(0.1, 0.01, 0.19, 0.03)
    assert recommend(d, "accuracy", "base", None, 0.02, 0.05)[0] == "fine-tune"
    assert recommend(d, "accuracy", "base", None, 0.02, 0.01)[0] == "inconclusive"  # p 0.03 > alpha 0.01
    assert recommend(d, "accuracy", "base", None, 0.2, 0.05)[0] == "keep prompting"  # CI within +-0.2
    assert "zero-shot prompting" in recommend(d, "accuracy", "base", None, 0.02, 0.05)[1]
    # a metric in other units (BLEU, 0-100): the margin is said as a number, not in points
    assert "within 2 " in recommend(_diff(0.5, -1, 1.5, 0.6, "bleu"), "bleu", "base", None, 2.0, 0.05)[1]


def test_no_paired_scores_is_inconclusive():
    choice, line = recommend(None, "bleu", "base_few_shot", None, 0.02, 0.05)
    assert choice == "inconclusive" and "no per-example scores" in line


def _report() -> dict:
    return {
        "task_metric": "accuracy",
        "n_test": 40,
        "contenders": {
            "base": _contender(0.10, prompt=50, completion=4, latency=0.05),
            "base_few_shot": _contender(0.20, prompt=200, completion=5, latency=0.20),
            "finetuned": _contender(0.84, prompt=50, completion=5, latency=0.05),
        },
        "comparisons": {
            "finetuned_vs_base_few_shot": _diff(0.64, 0.5, 0.78, 1e-6),
            "finetuned_vs_base": _diff(0.74, 0.6, 0.88, 1e-7),
        },
    }


def test_verdict_of_a_report_by_hand():
    v = verdict(_report(), train_seconds=1800, price_per_hour=2.0, price_per_1k_tokens=0.002)
    assert v["prompting"] == "base_few_shot" and v["pricing"]["per"] == "1k_tokens"
    # few-shot: 205 tokens x 0.002 = 0.41 per 1,000 requests; fine-tuned: 55 x 0.002 = 0.11
    assert v["contenders"]["base_few_shot"]["cost_per_1k_requests"] == pytest.approx(0.41)
    assert v["contenders"]["finetuned"]["cost_per_1k_requests"] == pytest.approx(0.11)
    assert v["saving_per_1k_requests"] == pytest.approx(0.30)
    # training: 1800 s at 2.0 per hour = 1.0; saving 0.0003 per request -> 3,333 requests
    assert v["training"] == {"seconds": 1800, "cost": pytest.approx(1.0)}
    assert v["break_even_requests"] == pytest.approx(1.0 / 0.0003)
    assert v["choice"] == "fine-tune"
    assert v["recommendation"].endswith("(p < 0.001), cheaper after 3,300 requests")
    assert v["contenders"]["finetuned"]["quality"] == 0.84 and v["contenders"]["finetuned"]["ci_low"] == 0.74
    # per hour: few-shot 1000 x 0.2 s = 200 s = 0.1111 at 2.0/h; fine-tuned 0.02778; saving 0.0000833/request
    h = verdict(_report(), train_seconds=1800, price_per_hour=2.0)
    assert h["pricing"]["per"] == "hour"
    assert h["break_even_requests"] == pytest.approx(1.0 / ((0.2 - 0.05) / 3600 * 2.0))
    # no training summary: the training cost is unknown (priced as 0), and the line says so
    unknown = verdict(_report(), None, 2.0, 0.002)
    assert unknown["break_even_requests"] == 0.0 and unknown["training"]["seconds"] is None
    assert unknown["recommendation"].endswith(
        "cheaper per request (its training cost is unknown: no train_summary.json)"
    )


def test_payback_phrase():
    assert payback(None) == "never cheaper per request than prompting"
    assert payback(0.2) == "cheaper after 1 request"
    assert payback(12345) == "cheaper after 12,000 requests"
    assert "unknown" in payback(0.0, train_cost_known=False)


def test_verdict_without_few_shot_judges_against_zero_shot():
    r = _report()
    del r["contenders"]["base_few_shot"], r["comparisons"]["finetuned_vs_base_few_shot"]
    v = verdict(r, 1800, 2.0, 0.002)
    assert v["prompting"] == "base" and v["difference"]["difference"] == 0.74
    # equal tokens per request (50 + 4 vs 50 + 5): the fine-tuned model saves nothing per request
    assert v["break_even_requests"] is None and "never cheaper" in v["recommendation"]


def test_verdict_renders_in_markdown_and_html():
    v = verdict(_report(), 1800, 2.0, 0.002)
    md = "\n".join(verdict_lines(v))
    assert "## Verdict" in md and v["recommendation"] in md and "3,300 requests" in md
    assert "| finetuned | 0.840 [0.740, 0.940] | 50.0 | 5.0 | 0.0500 | 0.11 |" in md
    page = "\n".join(verdict_html(v))
    assert "id='verdict'" in page and "fine-tune: +0.64 accuracy" in page


def test_verdict_config_keys_are_checked():
    base = {"data": {"train": "x.jsonl"}}
    cfg = config_from_dict(base)
    assert (cfg.eval.price_per_hour, cfg.eval.price_per_1k_tokens) == (2.0, None)
    assert (cfg.eval.verdict_margin, cfg.eval.verdict_alpha, cfg.eval.expected_requests) == (0.02, 0.05, None)
    with pytest.raises(ConfigError, match="eval.verdict_alpha"):
        config_from_dict(base | {"eval": {"verdict_alpha": 1.5}})
    with pytest.raises(ConfigError, match="eval.price_per_hour"):
        config_from_dict(base | {"eval": {"price_per_hour": -1}})


def test_the_terminal_table_ends_with_the_verdict():
    from tunekit.console import out
    from tunekit.eval.report import print_contenders

    report = _report() | {"n_test": 40}
    report["verdict"] = verdict(report, 1800, 2.0, 0.002)
    with out.capture() as captured:
        print_contenders(report)
    assert "verdict: fine-tune: +0.64 accuracy over few-shot prompting (p < 0.001)" in captured.get()
