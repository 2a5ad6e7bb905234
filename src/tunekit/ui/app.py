"""`tunekit ui`: a local web dashboard over the run registry.

One HTML page (static/index.html: plain JS, charts drawn on a <canvas>, nothing fetched from
outside) and the JSON it reads:

    GET /api/runs                      every registered run, newest first
    GET /api/runs/{id}                 one run: config, summary, artifacts, and its evaluation
                                       report (base vs fine-tuned metrics, failures) when it has one
    GET /api/runs/{id}/metrics?after=N its metrics records past step N (the page polls this while
                                       a run is training: live progress)
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

REPORT_FAILURES_SHOWN = 50


def create_ui_app():
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse

    from tunekit.runs import registry

    app = FastAPI(title="tunekit", docs_url=None, redoc_url=None)
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

    return app


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


def serve_ui(host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    from tunekit.console import err
    from tunekit.runs.registry import registry_path

    err.print(f"tunekit dashboard over {registry_path()}: http://{host}:{port}/")
    uvicorn.run(create_ui_app(), host=host, port=port, log_level="warning")
