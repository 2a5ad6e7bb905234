"""The rating view in a real headless Chromium (Playwright + Debian's chromium), end to end: a tiny
run trained and evaluated, ten pairs rated by keyboard, the page reloaded with every verdict kept,
the ratings exported as preference pairs, and a tiny reward model trained on them."""

import json

import pytest
from typer.testing import CliRunner

from conftest import chromium_path, running
from tunekit.config import config_from_dict
from tunekit.runs import registry
from tunekit.ui.app import create_ui_app

pytest.importorskip("uvicorn")
KEYS = ["1", "2", "1", "2", "3", "4", "1", "2", "a", "b"]  # 8 decisive, a tie, a both-bad


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    """A registry with one trained and evaluated run (16 held-out prompts), served by the dashboard."""
    from tunekit.eval.evaluate import evaluate
    from tunekit.train.session import train

    folder = tmp_path_factory.mktemp("rate")

    def chat(i: int) -> dict:
        return {
            "messages": [
                {"role": "user", "content": f"item {i}?"},
                {"role": "assistant", "content": f"C-{i % 3}"},
            ]
        }

    (folder / "train.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(20)))
    (folder / "test.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(100, 116)))
    cfg = {
        "model": str(tiny_model_dir),
        "data": {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 8, "learning_rate": 2e-2, "batch_size": 4, "max_length": 64},
        "eval": {"max_new_tokens": 6, "probe": "none", "label_scoring": False},
        "output_dir": str(folder / "tickets"),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEKIT_HOME", str(folder / "home"))
        run_dir = train(config_from_dict(cfg), quiet=True)
        evaluate(run_dir, quiet=True)
        with running(create_ui_app()) as url:
            yield url, registry.get_run("tickets"), folder


@pytest.fixture(scope="module")
def page(evaluated):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        yield page
        browser.close()


def _progress(page) -> str:
    return page.locator("#progress-text").inner_text()


def test_rate_ten_pairs_by_keyboard_reload_and_find_them_kept(evaluated, page, tmp_path):
    url, run, _ = evaluated
    page.goto(f"{url}/#run={run['id']}")
    page.click("#rate-link")  # the dashboard links each evaluated run to its rating view
    page.wait_for_url(f"**/rate#run={run['id']}")
    page.fill("#rater", "ana")
    page.press("#rater", "Enter")  # leaving the name field loads that rater's pairs
    page.wait_for_selector("#rating:not([hidden])")
    total = int(_progress(page).split("/")[1].split()[0])
    assert total >= 10, _progress(page)
    seen = []
    for k, key in enumerate(KEYS, 1):
        seen.append((page.locator("#prompt").inner_text(), page.locator("#reply-a").inner_text()))
        if k == 3:  # a comment typed in the box: its keys do not rate anything
            page.click("#comment")
            page.keyboard.type("a b 1 2")
            page.keyboard.press("Escape")
            assert _progress(page).startswith("2 /")
        page.keyboard.press(key)
        page.wait_for_function(
            f"() => document.querySelector('#progress-text').innerText.startsWith('{k} /')"
        )
    assert len({p for p, _ in seen}) == 10  # each key rated the next pair, none twice
    shot = tmp_path / "rating-view.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    page.reload()  # the name comes back from the browser, the verdicts from the registry
    page.wait_for_selector("#rating:not([hidden])")
    assert page.locator("#rater").input_value() == "ana"
    assert _progress(page).startswith(f"10 / {total}")
    assert page.locator("#position").inner_text() == f"11 of {total}"  # resumes at the first unrated
    page.keyboard.press("k")  # back to the tenth: its verdict (b: B is better) is shown
    assert page.locator("#pick-B").get_attribute("class") == "on"
    for _ in range(7):
        page.keyboard.press("k")
    assert page.locator("#comment").input_value() == "a b 1 2"
    stored = registry.get_ratings(run["id"])
    assert len(stored) == 10 and {r["rater"] for r in stored} == {"ana"}
    verdicts = [r["verdict"] for r in stored]
    assert verdicts.count("tie") == 1 and verdicts.count("both_bad") == 1
    assert [r["comment"] for r in stored].count("a b 1 2") == 1


def test_export_the_ratings_and_train_a_reward_model_on_them(evaluated, page, tmp_path):
    from tunekit.cli import app
    from tunekit.data import load_examples
    from tunekit.train.session import train

    url, run, _ = evaluated
    if len(registry.get_ratings(run["id"])) < 10:
        pytest.skip("needs the ratings of the test above")
    out = tmp_path / "pairs.jsonl"
    r = CliRunner().invoke(app, ["data", "ratings", str(run["id"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "preference pairs: 8" in r.output and "1 ties, 1 both bad" in r.output
    assert "one rater only" in r.output
    pairs = load_examples(out)
    assert len(pairs) == 8 and all(ex.rejected for ex in pairs)
    replies = {(ex.target, ex.rejected[0].content) for ex in pairs}
    stored = {
        (
            r["pair"][r["verdict"]]["reply"],
            r["pair"]["second" if r["verdict"] == "first" else "first"]["reply"],
        )
        for r in registry.get_ratings(run["id"])
        if r["verdict"] in ("first", "second")
    }
    assert replies == stored  # chosen is what the rater picked, whichever side it was shown on

    cfg = {
        "model": str(registry.get_run(run["id"])["config"]["model"]),
        "task": "reward",
        "data": {"train": str(out), "validation": str(out), "test": str(out)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "learning_rate": 5e-3, "batch_size": 4, "max_length": 64},
        "output_dir": str(tmp_path / "reward"),
    }
    run_dir = train(config_from_dict(cfg), quiet=True)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["task"] == "reward" and summary["steps"] == 4
    assert json.loads((run_dir / "data" / "manifest.json").read_text())["counts"]["train"] == 8


# ---------------------------------------------------------------------------------------------
# Training started and stopped from the page


def test_start_a_training_run_from_the_page_follow_it_and_stop_it(evaluated, page):
    """The run's own config with edited keys, started from the dashboard; its live progress; Stop
    sends SIGTERM: the run finishes its step, saves a checkpoint and is marked interrupted."""
    import os
    import signal
    import time

    url, run, folder = evaluated
    page.goto(f"{url}/#run={run['id']}")
    page.wait_for_selector("#title >> text=tickets")
    assert page.locator("#launch-set").input_value().startswith("output_dir=")
    page.fill("#launch-set", "train.max_stepz=3")  # a typo: refused before anything starts
    page.click("#launch")
    page.wait_for_selector("#launch-msg >> text=not started")
    assert "max_steps" in page.locator("#launch-msg").inner_text()  # the nearest valid key
    assert _get_jobs(url) == []
    out = folder / "launched"
    page.fill("#launch-set", f"output_dir={out}\ntrain.max_steps=2000\ntrain.save_steps=1000")
    page.click("#launch")
    page.wait_for_selector("#launch-msg >> text=started")
    try:
        # the page follows the new run once it registers, with its live step count
        page.wait_for_selector("#title >> text=launched", timeout=180_000)
        deadline = time.time() + 180
        while (registry.get_run(str(out)) or {}).get("step", 0) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert registry.get_run(str(out))["status"] == "running"
        page.wait_for_function(
            "() => parseFloat(document.querySelector('#progress-bar').style.width) > 0", timeout=30_000
        )
        page.click("#jobs button.stop")
        page.wait_for_selector("#jobs li >> text=exited", timeout=120_000)
        stopped = registry.get_run(str(out))
        assert stopped["status"] == "interrupted" and stopped["step"] < 2000
        assert "SIGTERM" in _get_jobs(url)[0]["log"]
        assert list((out / "checkpoints").glob("step-*")), "SIGTERM saves a checkpoint to resume from"
    finally:  # a failed check must not leave a 2000-step training behind
        for job in _get_jobs(url):
            if job["running"]:
                os.kill(job["pid"], signal.SIGKILL)
    page.fill("#launch-set", f"output_dir={out}")  # the folder now holds a run: refused
    page.click("#launch")
    page.wait_for_selector("#launch-msg >> text=holds an earlier run")


def _get_jobs(url: str) -> list:
    import urllib.request

    with urllib.request.urlopen(f"{url}/api/jobs", timeout=30) as r:
        return json.loads(r.read())


def test_a_network_bind_without_a_key_starts_no_training(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path))
    body = json.dumps({"source": {"config": "x.yaml"}, "set": []}).encode()
    with running(create_ui_app("0.0.0.0")) as url:
        req = urllib.request.Request(f"{url}/api/train", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 403 and b"--api-key" in e.value.read()
    with running(create_ui_app()) as url:
        req = urllib.request.Request(f"{url}/api/train", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400 and b"no such file" in e.value.read()
