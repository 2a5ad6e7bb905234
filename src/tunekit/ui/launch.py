"""Training runs started from the dashboard: `tunekit train CONFIG --set KEY=VALUE ...` in a process
of its own, its log, and its stop (SIGTERM: the run finishes its step, saves a checkpoint, and is
marked interrupted, resumable with `tunekit resume`).

The config is a YAML file on this machine or the config.yaml of an earlier run, with edited keys.
It is checked here, every error at once, before anything starts; the run then registers itself,
so the dashboard shows its live progress as it shows any run's. The processes outlive the
dashboard (their own session: stopping the page's server does not stop training); the list of
jobs lives in the dashboard's memory, so after a restart a run is stopped with `kill -TERM PID`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunekit.errors import TunekitError

LOG_LINES = 30


@dataclass
class Job:
    id: int
    config: str
    overrides: list[str]
    output_dir: str
    log: Path
    process: subprocess.Popen = field(repr=False)
    started: float = field(default_factory=time.time)
    stop_requested: bool = False

    def as_dict(self) -> dict:
        from tunekit.runs import registry

        run = registry.get_run(self.output_dir) if Path(self.output_dir).exists() else None
        return {
            "id": self.id,
            "pid": self.process.pid,
            "config": self.config,
            "overrides": self.overrides,
            "output_dir": self.output_dir,
            "running": self.process.poll() is None,
            "returncode": self.process.poll(),
            "stop_requested": self.stop_requested,
            "run_id": run["id"] if run else None,
            "status": run["status"] if run else None,
            "log": _tail(self.log, LOG_LINES),
        }


class Jobs:
    """The training processes this dashboard started."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()

    def start(self, source: dict, overrides: list[str]) -> dict:
        """Check the config with its edited keys, then start `tunekit train` on it."""
        from tunekit.config import load_config
        from tunekit.runs.directory import is_run_dir

        config = _config_path(source)
        overrides = [o.strip() for o in overrides if o.strip()]
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise TunekitError(f"edited key {bad[0]!r}: write KEY=VALUE, e.g. train.max_steps=50")
        cfg = load_config(config, overrides)  # every config error at once, before anything starts
        out = Path(cfg.output_dir)
        if is_run_dir(out) or any(
            j.output_dir == str(out.resolve()) and j.process.poll() is None for j in self.jobs.values()
        ):
            raise TunekitError(
                f"output_dir {out} holds an earlier run: set output_dir=NEW_FOLDER among the edited keys"
            )
        with self.lock:
            job_id = max(self.jobs, default=0) + 1
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = self.log_dir / f"job-{job_id}-{int(time.time())}.log"
            argv = [sys.executable, "-m", "tunekit", "train", str(config)]
            argv += [a for o in overrides for a in ("--set", o)]
            with open(log, "wb") as f:  # the child keeps its own handle
                process = subprocess.Popen(
                    argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
                )
            job = Job(job_id, str(config), overrides, str(out.resolve()), log, process)
            self.jobs[job_id] = job
        return job.as_dict()

    def stop(self, job_id: int) -> dict:
        """SIGTERM to a running job: it stops after its current step, with a checkpoint."""
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.process.poll() is None:
            job.process.send_signal(signal.SIGTERM)
            job.stop_requested = True
        return job.as_dict()

    def list(self) -> list[dict]:
        return [j.as_dict() for j in sorted(self.jobs.values(), key=lambda j: -j.id)]


def _config_path(source: dict) -> Path:
    """The YAML to start from: {"run": ID} (that run's config.yaml) or {"config": PATH}."""
    from tunekit.runs import registry

    if "run" in source:
        run = registry.get_run(int(source["run"]))
        if run is None:
            raise TunekitError(f"no run {source['run']}")
        path = Path(run["run_dir"]) / "config.yaml"
        if not path.is_file():
            raise TunekitError(f"run {run['name']} has no config.yaml in {run['run_dir']}")
        return path
    path = Path(str(source.get("config", ""))).expanduser()
    if not str(source.get("config", "")).strip() or not path.is_file():
        raise TunekitError(f"config {str(path)!r}: no such file; give the path of a YAML training config")
    return path


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
