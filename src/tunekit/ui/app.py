"""`tunekit ui`: a local web dashboard over the run registry.

One HTML page (static/index.html: plain JS, charts drawn on a <canvas>, nothing fetched from
outside) and the JSON it reads:

    GET /api/runs                      every registered run, newest first
    GET /api/runs/{id}                 one run: config, summary, artifacts, and its evaluation
                                       report (base vs fine-tuned metrics, failures) when it has one
    GET /api/runs/{id}/metrics?after=N its metrics records past step N (the page polls this while
                                       a run is training: live progress)

and the rating view (static/rate.html, `/rate#run=ID`): people compare two replies to a held-out
prompt, blind, and their verdicts go to the registry (`tunekit data ratings` makes them data):

    GET  /api/runs/{id}/rating?rater=NAME&comparison=C   the pairs of comparison C (eval/pairs.py)
                                       in NAME's order, as A and B in NAME's order, with NAME's verdicts
    POST /api/runs/{id}/ratings        {rater, comparison, item, verdict: A|B|tie|both_bad, comment}

and training started from the page (ui/launch.py): the run's progress then shows as any run's.

    POST /api/train                    {source: {run: ID} | {config: PATH}, set: ["KEY=VALUE", ...]}
    GET  /api/jobs                     the runs this dashboard started: pid, status, log tail
    POST /api/jobs/{id}/stop           SIGTERM: the run stops after its step, with a checkpoint

A write (POST) must be JSON, and a browser's Origin, when sent, must be the page's own: a page on
another site can neither send JSON here without a CORS preflight (refused) nor pass the Origin check.

Safe by default. Bound to a loopback address (the default 127.0.0.1), it answers only requests whose
Host header names a loopback address or the bound name: a web page on another site cannot read your
runs by pointing its own domain name at 127.0.0.1 (DNS rebinding). Bound to any other address it
warns at start, since every machine that can reach it can read it. With `--api-key KEY` every request
needs the key: `Authorization: Bearer KEY`, or once in the page's URL (`/?key=KEY`), which the page
then keeps in a cookie. (The key check mirrors `tunekit serve`'s: ship/serve.py, check_key.)
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from importlib import resources
from pathlib import Path

REPORT_FAILURES_SHOWN = 50
KEY_COOKIE = "tunekit_ui_key"


def create_ui_app(host: str = "127.0.0.1", api_key: str | None = None):
    """The dashboard app; `host` is the address it is bound to (its Host check follows it)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse

    from tunekit.runs import registry

    app = FastAPI(title="tunekit", docs_url=None, redoc_url=None)
    _guard(app, host, api_key)
    page = resources.files("tunekit.ui").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/api/runs")
    def runs():
        return registry.list_runs()

    @app.get("/api/runs/{run_id}")
    def run(run_id: int):
        found = registry.get_run(run_id)
        if found is None:
            raise HTTPException(404, f"no run {run_id}")
        return found | {"report": read_report(Path(found["run_dir"]))}

    @app.get("/api/runs/{run_id}/metrics")
    def metrics(run_id: int, after: int = -1):
        return registry.get_metrics(run_id, after)

    rate_page = resources.files("tunekit.ui").joinpath("static/rate.html").read_text(encoding="utf-8")

    @app.get("/rate", response_class=HTMLResponse)
    def rate():
        return rate_page

    @app.get("/api/runs/{run_id}/rating")
    def rating(run_id: int, rater: str = "", comparison: str = ""):
        from tunekit.ui.rating import rating_view

        return _user_errors(rating_view, _run_or_404(run_id), rater, comparison)

    @app.post("/api/runs/{run_id}/ratings")
    def rate_pair(run_id: int, body: dict):
        from tunekit.ui.rating import store_rating

        return _user_errors(store_rating, _run_or_404(run_id), body)

    from tunekit.ui.launch import Jobs

    jobs = Jobs(registry.registry_path().parent / "ui-jobs")
    # Starting processes from a page: only where the Host check or a key guards it.
    may_launch = is_loopback(host) or api_key is not None

    @app.get("/api/jobs")
    def list_jobs():
        return jobs.list()

    @app.post("/api/train")
    def start_training(body: dict):
        if not may_launch:
            raise HTTPException(403, "tunekit ui on a network address starts training only with --api-key")
        overrides = body.get("set") or []
        if not isinstance(overrides, list):
            raise HTTPException(400, "`set` is a list of KEY=VALUE strings")
        return _user_errors(jobs.start, body.get("source") or {}, [str(o) for o in overrides])

    @app.post("/api/jobs/{job_id}/stop")
    def stop_job(job_id: int):
        try:
            return jobs.stop(job_id)
        except KeyError:
            raise HTTPException(404, f"no job {job_id} started by this dashboard") from None

    def _run_or_404(run_id: int) -> dict:
        found = registry.get_run(run_id)
        if found is None:
            raise HTTPException(404, f"no run {run_id}")
        return found

    return app


def _user_errors(fn, *args):
    """fn(*args), a user's mistake (TunekitError) answered 400 with its message."""
    from fastapi import HTTPException

    from tunekit.errors import TunekitError

    try:
        return fn(*args)
    except TunekitError as e:
        raise HTTPException(400, str(e)) from None


def read_report(run_dir: Path) -> dict | None:
    """The parts of report.json the dashboard shows: the comparison table and the failures."""
    path = run_dir / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    failures = report.get("failures") or []
    return {
        "task_metric": report.get("task_metric"),
        "n_test": report.get("n_test"),
        "contenders": report.get("contenders") or {},
        "failures": failures[:REPORT_FAILURES_SHOWN],
        "n_failures": len(failures),
    }


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1): reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without its port: `localhost:8765` -> `localhost`, `[::1]:80` -> `::1`."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def host_allowed(header: str, bound: str) -> bool:
    """Whether a request's Host header may reach a dashboard bound to loopback address `bound`: a
    loopback name or the bound one. Any other name is a page elsewhere that resolved its own domain
    to this machine (DNS rebinding). The port is not checked: ssh -L forwards under another one."""
    name = host_name(header.strip()).lower()
    return bool(name) and (is_loopback(name) or name == bound.lower())


def key_given(request) -> str:
    """The key a request carries: `Authorization: Bearer KEY`, the page's cookie, or `?key=KEY`."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:]
    return request.cookies.get(KEY_COOKIE) or request.query_params.get("key", "")


def _guard(app, host: str, api_key: str | None) -> None:
    """Every request passes the Host check (loopback binds) and, with `api_key`, the key check."""
    from fastapi.responses import PlainTextResponse, RedirectResponse

    check_host = is_loopback(host)

    @app.middleware("http")
    async def guard(request, call_next):
        if check_host and not host_allowed(request.headers.get("host", ""), host):
            return PlainTextResponse(
                f"tunekit ui answers only requests to a loopback address, not to Host "
                f"{request.headers.get('host', '(none)')!r}: open http://{host}:PORT/ on this machine.",
                status_code=403,
            )
        if request.method not in ("GET", "HEAD") and (refused := _write_refused(request)):
            return PlainTextResponse(refused, status_code=403)
        if api_key is None:
            return await call_next(request)
        if not hmac.compare_digest(key_given(request).encode(), api_key.encode()):
            return PlainTextResponse(
                "Incorrect or missing key: tunekit ui was started with --api-key. Open /?key=KEY once "
                "(the page keeps it in a cookie) or send `Authorization: Bearer KEY`.",
                status_code=401,
            )
        if request.url.path == "/" and "key" in request.query_params:
            # The page: keep the key in a cookie and take it out of the address bar and history.
            response = RedirectResponse("/", status_code=303)
        else:
            response = await call_next(request)
        response.set_cookie(KEY_COOKIE, api_key, httponly=True, samesite="lax")
        return response


def _write_refused(request) -> str | None:
    """Why a write is refused (None: allowed). Cross-site request forgery: a page on another site may
    POST to this address, but only a form or text body, never JSON (that needs a CORS preflight,
    which this app never grants), and its browser names its own site in Origin."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return "tunekit ui takes writes as JSON only (Content-Type: application/json)"
    origin = request.headers.get("origin")
    if origin is not None and origin.partition("://")[2] != request.headers.get("host", ""):
        return f"tunekit ui refuses a write from another site (Origin {origin!r})"
    return None


def serve_ui(host: str = "127.0.0.1", port: int = 8765, api_key: str | None = None) -> None:
    """Serve the dashboard until interrupted; warns when `host` lets other machines reach it."""
    import uvicorn

    from tunekit.console import err
    from tunekit.runs.registry import registry_path

    if not is_loopback(host):
        fix = (
            "the key travels unencrypted (plain HTTP)"
            if api_key
            else "anyone who can reach it can read your runs: add --api-key KEY"
        )
        err.print(f"[yellow]warning:[/] tunekit ui on {host}, not a loopback address: {fix}")
    url = f"http://{host}:{port}/"
    err.print(
        f"tunekit dashboard over {registry_path()}: {url}"
        + (" (open it once as ?key=KEY)" if api_key else "")
    )
    uvicorn.run(create_ui_app(host, api_key), host=host, port=port, log_level="warning")
