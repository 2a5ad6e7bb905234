"""report.html: one self-contained page, rendered in headless Chromium (Debian's, through Playwright)."""

import shutil

import pytest

from tunekit.eval.failures import guess_advice
from tunekit.eval.report import write_report
from tunekit.eval.report_html import render_html

SECTIONS = ("loss-curves", "contenders", "confusion-matrix", "forgetting", "failures")


def _report() -> dict:
    """A report as evaluate_generation writes it, small: three contenders, labels, a probe, failures."""

    def contender(v: float) -> dict:
        return {
            "accuracy": v,
            "accuracy_ci_low": v - 0.1,
            "accuracy_ci_high": min(1.0, v + 0.1),
            "test_loss": 1 - v,
            "test_loss_ci_low": 0.9 - v,
            "test_loss_ci_high": 1.1 - v,
        }

    part = {
        "n": 40,
        "base": 0.6,
        "base_ci_low": 0.45,
        "base_ci_high": 0.75,
        "finetuned": 0.5,
        "finetuned_ci_low": 0.35,
        "finetuned_ci_high": 0.65,
        "drop": 0.1,
        "drop_ci_low": -0.05,
        "drop_ci_high": 0.25,
        "p_value": 0.2,
        "significant": False,
    }
    failure = {"source": "t:3", "prompt": "the <script> tag", "reference": "spam", "finetuned": "ham"}
    return {
        "task_metric": "accuracy",
        "n_test": 20,
        "test_data": "runs/x/data/test.jsonl",
        "contenders": {"base": contender(0.3), "base_few_shot": contender(0.5), "finetuned": contender(0.9)},
        "comparisons": {
            "finetuned_vs_base": {
                "metric": "accuracy",
                "difference": 0.6,
                "ci_low": 0.4,
                "ci_high": 0.8,
                "p_value": 0.001,
                "test": "mcnemar_exact",
                "significant": True,
            }
        },
        "training": {
            "train_loss": [[s, 2.0 / s] for s in range(1, 21)],
            "val_loss": [[5, 0.6], [10, 0.4], [15, 0.45], [20, 0.5]],
            "overfitting_warning": "validation loss rose from 0.4 (step 10) to 0.5 (step 20)",
            "stopped_early": True,
            "best_step": 10,
        },
        "confusion_matrix": {
            "finetuned": {
                "labels": ["ham", "spam"],
                "columns": ["ham", "spam", "(other)"],
                "matrix": [[9, 1, 0], [1, 8, 1]],
            }
        },
        "forgetting": {"source": "builtin", "parts": {"multiple_choice": part}, "open_examples": []},
        "failure_analysis": {
            "n_failures": 1,
            "by_error_type": [{"error_type": "wrong label", "count": 1, "examples": [failure]}],
            "top_confusions": [{"confusion": "spam -> ham", "count": 1}],
            "weak_groups": [{"group": "spam", "advice": "spam: 80% right on 10 test examples"}],
            "guessed_fields": [
                {
                    "field": "label",
                    "value": "ham",
                    "share": 0.8,
                    "reference_share": 0.5,
                    "advice": guess_advice("label", "<ham>", 0.8, 0.5),
                }
            ],  # fmt: skip
        },
        "failures": [failure],
    }


def test_page_is_self_contained_and_escapes_text():
    page = render_html(_report())
    for s in SECTIONS:
        assert f"id='{s}'" in page
    assert page.count("data:image/png;base64,") == 4  # loss, contenders, confusion, forgetting
    assert "http://" not in page and "https://" not in page  # nothing fetched
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert "Not learned yet" in page and "answers &lt;ham&gt; for 80% of the test set" in page


def test_report_md_names_a_field_the_model_guesses(tmp_path):
    write_report(tmp_path, _report() | {"examples": []})
    md = (tmp_path / "report.md").read_text()
    assert "Not learned yet:" in md and "`label` is one guess: the model answers <ham> for 80%" in md


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no system Chromium (apt-get install chromium): browser rendering test skipped")
    pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    return path


def test_report_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    path = tmp_path / "report.html"
    path.write_text(render_html(_report()), encoding="utf-8")
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        for s in SECTIONS:
            assert page.locator(f"section#{s} h2").count() == 1, s
        # every plot decoded into a real image
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        assert len(sizes) == 4 and all(done and w > 100 for done, w in sizes)
        assert "rose from 0.4" in page.inner_text("#loss-curves")
        assert "spam -> ham" in page.inner_text("#failures")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert all(u.startswith(("file://", "data:")) for u in requests)  # no network
