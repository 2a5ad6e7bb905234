"""The dashboard in a real headless Chromium (Playwright + Debian's chromium): the runs table, the loss
chart drawn on its canvas (checked on a screenshot), the base-vs-fine-tuned report and its failures,
and live progress of a running job. Then its guards over plain HTTP: the Host check against DNS
rebinding, `--api-key`, and the warning for a non-loopback bind."""

import http.client
import io
import json
import time
import urllib.parse
import urllib.request

import pytest

from conftest import chromium_path, running
from tunekit.config import config_from_dict
from tunekit.runs import registry
from tunekit.ui.app import create_ui_app

uvicorn = pytest.importorskip("uvicorn")
TRAIN_COLOR = (0x1F, 0x77, 0xB4)


@pytest.fixture(scope="module")
def dashboard(tiny_model_dir, tmp_path_factory):
    """A registry with one trained and evaluated run, served by the real dashboard app."""
    from tunekit.eval.evaluate import evaluate
    from tunekit.train.session import train

    folder = tmp_path_factory.mktemp("ui")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"item {i}?"},
                {"role": "assistant", "content": f"C-{i % 3}"},
            ]
        }
        for i in range(20)
    ]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": str(tiny_model_dir),
        "data": {"train": str(folder / "data.jsonl")},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 8, "learning_rate": 2e-2, "batch_size": 4, "max_length": 64, "log_every": 1},
        "eval": {"max_new_tokens": 4},
        "output_dir": str(folder / "trained"),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEKIT_HOME", str(folder / "home"))
        run_dir = train(config_from_dict(cfg), quiet=True)
        evaluate(run_dir, quiet=True)
        with running(create_ui_app()) as url:
            yield url, config_from_dict(cfg | {"output_dir": str(folder / "live")})


@pytest.fixture(scope="module")
def page(dashboard):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        yield page
        browser.close()


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _blue_pixels(png: bytes) -> int:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(
        1 for px in img.getdata() if all(abs(a - b) <= 40 for a, b in zip(px, TRAIN_COLOR, strict=True))
    )


def test_runs_table_chart_and_report(dashboard, page):
    url, _ = dashboard
    (run,) = _get(f"{url}/api/runs")
    page.goto(f"{url}/#run={run['id']}")
    page.wait_for_selector("#comparison")
    row = page.locator("#runs tbody tr").first
    assert "trained" in row.inner_text() and "done" in row.inner_text()
    assert page.locator("#title").inner_text() == "trained"
    # The comparison table shows base and fine-tuned columns with the report's numbers.
    header = page.locator("#comparison tr").first.inner_text()
    assert "base" in header and "finetuned" in header
    assert "task metric" in page.locator("#comparison").inner_text()
    n_fail = _get(f"{url}/api/runs/{run['id']}")["report"]["n_failures"]
    assert page.locator("#failures li").count() == n_fail
    # The loss chart is drawn: the train-loss colour covers real area of the canvas screenshot.
    page.wait_for_function("() => parseFloat(document.querySelector('#progress-bar').style.width) === 100")
    assert _blue_pixels(page.locator("#loss-chart").screenshot()) > 200


def test_live_progress_of_a_running_job(dashboard, page):
    url, cfg = dashboard
    registry.register_run(cfg.output_dir, cfg)  # what a starting training run does
    run_id = registry.get_run("live")["id"]
    page.goto(f"{url}/#run={run_id}")
    page.wait_for_selector("#title >> text=live")
    assert "running" in page.locator("#status-line").inner_text()
    # No metrics yet: nothing drawn in the train colour (the screenshot check can fail).
    page.wait_for_selector("#detail:not([hidden])")
    assert _blue_pixels(page.locator("#loss-chart").screenshot()) < 20
    for step in range(1, 6):  # the training loop logs steps; the open page picks them up by itself
        registry.log_metrics(cfg.output_dir, {"step": step, "loss": 3.0 / step}, total_steps=10)
        time.sleep(0.1)
    page.wait_for_function(
        "() => parseFloat(document.querySelector('#progress-bar').style.width) === 50", timeout=15000
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('#runs tbody tr')].some(r => r.innerText.includes('5/10'))",
        timeout=15000,
    )
    assert _blue_pixels(page.locator("#loss-chart").screenshot()) > 200


def test_the_page_works_with_the_key_in_a_cookie(dashboard, page):
    """`tunekit ui --api-key K`: the page opened once as /?key=K keeps the key in a cookie (its own
    fetches of /api/... pass) and drops it from the address bar."""
    with running(create_ui_app(api_key="s3cret")) as url:
        page.goto(f"{url}/?key=s3cret")
        page.wait_for_selector("#runs tbody tr")
        assert "key=" not in page.url
        assert page.locator("#runs tbody tr").count() == len(registry.list_runs()) > 0


# ---------------------------------------------------------------------------------------------
# Guards, over plain HTTP (no browser)


@pytest.fixture
def empty_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path))


def _request(url: str, path: str, **headers) -> tuple[int, http.client.HTTPMessage, bytes]:
    """GET `path` with exactly these headers (Host too, when given); redirects are not followed."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def test_a_foreign_host_name_is_refused(empty_registry):
    """DNS rebinding: a page on evil.example resolves its name to 127.0.0.1 and reads the dashboard;
    its requests carry Host: evil.example."""
    with running(create_ui_app()) as url:
        port = urllib.parse.urlsplit(url).port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
            status, _, body = _request(url, "/api/runs", Host=host)
            assert (status, json.loads(body)) == (200, []), host
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", ""):
            status, _, body = _request(url, "/api/runs", Host=host)
            assert status == 403 and b"loopback" in body, host
        assert _request(url, "/", Host=f"evil.example:{port}")[0] == 403


def test_a_network_bind_leaves_host_names_to_the_key(empty_registry):
    """Bound to 0.0.0.0 the machine's clients use any name for it: no Host check (the key guards it)."""
    with running(create_ui_app("0.0.0.0")) as url:
        assert _request(url, "/api/runs", Host="my-box.lan:8765")[0] == 200
    with running(create_ui_app("0.0.0.0", api_key="k")) as url:
        assert _request(url, "/api/runs", Host="my-box.lan:8765")[0] == 401


def test_api_key_by_header_cookie_or_url(empty_registry):
    with running(create_ui_app(api_key="s3cret")) as url:
        for path, headers in [
            ("/", {}),
            ("/api/runs", {}),
            ("/api/runs", {"Authorization": "Bearer wrong"}),
            ("/api/runs", {"Cookie": "tunekit_ui_key=wrong"}),
            ("/?key=wrong", {}),
            ("/api/runs?key=s3cre", {}),
        ]:
            status, _, body = _request(url, path, **headers)
            assert status == 401 and b"--api-key" in body, (path, headers)
        assert _request(url, "/api/runs", Authorization="Bearer s3cret")[0] == 200
        status, headers, _ = _request(url, "/?key=s3cret")
        assert status == 303 and headers["location"] == "/"
        assert "tunekit_ui_key=s3cret" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
        status, _, body = _request(url, "/", Cookie="tunekit_ui_key=s3cret")
        assert status == 200 and b"<canvas" in body
        # the Host check still comes first
        assert _request(url, "/api/runs", Host="evil.example", Authorization="Bearer s3cret")[0] == 403


@pytest.mark.parametrize(
    ("args", "warning"),
    [
        ([], None),
        (["--host", "localhost"], None),
        (["--host", "0.0.0.0"], "add --api-key KEY"),
        (["--host", "192.168.1.5", "--api-key", "k"], "unencrypted"),
    ],
)
def test_cli_ui_warns_on_a_network_bind_and_passes_the_key(empty_registry, monkeypatch, args, warning):
    from typer.testing import CliRunner

    from tunekit.cli import app

    served = {}
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, **kw: served.update(app=app, host=host))
    r = CliRunner().invoke(app, ["ui", *args])
    assert r.exit_code == 0, r.output
    assert served["host"] == (args[1] if args else "127.0.0.1")
    if warning is None:
        assert "warning" not in r.output
    else:
        assert "warning" in r.output and "not a loopback address" in r.output and warning in r.output
    with running(served["app"]) as url:  # the key given on the command line guards the app it serves
        assert _request(url, "/api/runs")[0] == (401 if "--api-key" in args else 200)


def test_cli_ui_takes_the_key_from_the_environment_and_refuses_an_empty_one(empty_registry, monkeypatch):
    """As for serve: TUNEKIT_API_KEY keeps the key out of `ps`; set but empty is a mistake, not "no key"."""
    from typer.testing import CliRunner

    from tunekit.cli import app

    served = {}
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, **kw: served.update(app=app))
    monkeypatch.setenv("TUNEKIT_API_KEY", "from-env")
    assert CliRunner().invoke(app, ["ui"]).exit_code == 0
    with running(served.pop("app")) as url:
        assert _request(url, "/api/runs")[0] == 401
        assert _request(url, "/api/runs", Authorization="Bearer from-env")[0] == 200
    monkeypatch.setenv("TUNEKIT_API_KEY", "")
    r = CliRunner().invoke(app, ["ui"])
    assert r.exit_code != 0 and "app" not in served
