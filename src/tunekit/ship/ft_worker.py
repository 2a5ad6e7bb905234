"""The fine-tuning worker: a thread beside the server that runs the queued jobs one at a time.

Each job trains in a process of its own (`python -m tunekit.ship.ft_worker CONFIG.json`), so its
memory goes back when it ends and it owns its signals: cancelling a job, and stopping the server,
send it SIGTERM, the path `tunekit train` already has (train/signals.py): it stops after the step
in flight with a checkpoint. A cancelled job is then marked cancelled; a job stopped because the
server stopped stays `running` in the registry, and the next server resumes it from that
checkpoint (`train --resume`) before it takes the next queued job.

While a job runs, the worker turns each new line of its run's metrics.jsonl into a `metrics` event
("Step 3/40: training loss=..."). The child runs in a session of its own, so a Ctrl-C meant for
the server reaches it only through the server (which checkpoints it as above); a server killed
with SIGKILL leaves it training on alone (see the README's limits).
"""

from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tunekit.console import err
from tunekit.ship import ft_store
from tunekit.train.checkpoint import list_checkpoints

POLL_S = 0.5


def _paths(job: dict) -> tuple[Path, Path, Path]:
    """(the job's config file, its error file, its log): beside its run directory."""
    folder = Path(job["run_dir"]).parent
    return (
        folder / f"{job['id']}.config.json",
        folder / f"{job['id']}.error.json",
        folder / f"{job['id']}.log",
    )


class Worker:
    """Takes `$TUNEKIT_HOME/fine_tuning/worker.lock` when made, so that two servers over one home
    never run the same queue (a TunekitError for the second); `stop` lets it go."""

    def __init__(self, publish, stop_timeout_s: float = 120.0):
        from tunekit.errors import TunekitError

        self.publish = publish  # publish(job): serve the job's model (FineTuning._publish)
        self.stop_timeout_s = stop_timeout_s
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        lock = ft_store.home() / "worker.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        self._lock = lock.open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise TunekitError(
                f"another `tunekit serve --enable-fine-tuning` runs the fine-tuning jobs of {lock.parent.parent} "
                "($TUNEKIT_HOME); stop it, or give this server another TUNEKIT_HOME"
            ) from None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tunekit-fine-tuning", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop: the running job checkpoints and stays running, for the next server to resume."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.stop_timeout_s + 10)
        self._lock.close()  # closing the file lets the lock go

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = ft_store.next_job()
            except Exception as e:  # e.g. the registry locked past its timeout: try again soon
                err.print(
                    f"[yellow]fine-tuning worker: cannot read the queue ({type(e).__name__}: {e}); retrying"
                )
                self._stopping.wait(5.0)
                continue
            if job is None:
                self._wake.wait(2.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as e:  # a bug here must fail the job, not stop the queue behind it
                ft_store.update_job(
                    job["id"],
                    status="failed",
                    error={"code": "server_error", "message": f"{type(e).__name__}: {e}"},
                )
                ft_store.add_event(job["id"], f"The job failed: {type(e).__name__}: {e}", level="error")

    def _run(self, job: dict) -> None:

        job_id, run_dir = job["id"], Path(job["run_dir"])
        config, error_file, log = _paths(job)
        if job["cancel_requested"]:  # asked before a server stop; nothing left to stop
            ft_store.update_job(job_id, status="cancelled")
            ft_store.add_event(job_id, "Job was cancelled")
            return
        from tunekit.tasks import get_task

        # A task that cannot resume (rl: TRL's own loop) starts over after a restart.
        resume = (run_dir / "data" / "manifest.json").is_file() and not get_task(
            job["config"]["task"]
        ).not_resumable
        if job["status"] == "running":
            ckpts = list_checkpoints(run_dir) if resume else []
            where = "the start (no checkpoint yet)"
            if ckpts:
                where = f"its checkpoint at step {int(ckpts[-1].name.split('-')[-1])}"
            ft_store.add_event(job_id, f"The server restarted: the job resumes from {where}")
        else:
            ft_store.update_job(job_id, status="running")
            ft_store.add_event(job_id, "Fine-tuning job started")
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(job["config"]), encoding="utf-8")
        error_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "tunekit.ship.ft_worker",
            str(config),
            "--resume" if resume else "--overwrite",
        ]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        last = ft_store.last_metric_step(job_id)
        seen = {c.name for c in list_checkpoints(run_dir)}  # a resumed run's were reported already
        signalled, cancelled, deadline = False, False, 0.0
        while proc.poll() is None:
            self._stopping.wait(POLL_S)
            last = self._metrics(job_id, run_dir, last)
            seen = _checkpoints(job_id, run_dir, seen)
            if not signalled and (self._stopping.is_set() or ft_store.cancel_requested(job_id)):
                cancelled = not self._stopping.is_set()
                proc.send_signal(signal.SIGTERM)  # stops after this step, with a checkpoint
                signalled, deadline = True, time.monotonic() + self.stop_timeout_s
            elif signalled and time.monotonic() > deadline:
                proc.kill()
        self._metrics(job_id, run_dir, last)
        _checkpoints(job_id, run_dir, seen)
        cancelled = cancelled or ft_store.cancel_requested(job_id)
        if proc.returncode != 0 and cancelled:
            ft_store.update_job(job_id, status="cancelled")
            ft_store.add_event(job_id, "Job was cancelled")
        elif proc.returncode != 0 and self._stopping.is_set():
            ft_store.add_event(
                job_id, "The server is stopping: the job resumes from its checkpoint when it restarts"
            )
        elif proc.returncode != 0:
            error = _error(error_file, log, proc.returncode)
            ft_store.update_job(job_id, status="failed", error=error)
            ft_store.add_event(job_id, f"The job failed: {error['message']}", level="error")
        else:
            summary = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))
            name = ft_store.model_name(job)
            ft_store.update_job(job_id, fine_tuned_model=name, trained_tokens=summary.get("tokens"))
            self.publish(ft_store.get_job(job_id))  # served before the status says succeeded
            ft_store.add_event(job_id, f"New fine-tuned model created: {name}")
            ft_store.update_job(job_id, status="succeeded")
            ft_store.add_event(job_id, "The job has successfully completed")

    def _metrics(self, job_id: str, run_dir: Path, last: int) -> int:
        """A `metrics` event per metrics.jsonl record past step `last`; the newest step."""
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            return last
        total = _total_steps(run_dir)
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                step = int(r["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line still being written
            if step <= last:
                continue
            data = {
                "step": step,
                "total_steps": total,
                "train_loss": r.get("loss"),
                "valid_loss": r.get("val_loss"),
            }
            text = f"Step {step}/{total or '?'}: " + ", ".join(
                f"{k.replace('_', ' ')}={v:.4f}"
                for k, v in (("training_loss", r.get("loss")), ("validation_loss", r.get("val_loss")))
                if v is not None
            )
            ft_store.add_event(job_id, text, type="metrics", data=data)
            last = step
        return last


def _checkpoints(job_id: str, run_dir: Path, seen: set[str]) -> set[str]:
    """A "Checkpoint created" event for each checkpoint not seen before (checkpoints written and
    rotated away between two polls are not reported)."""
    now = list_checkpoints(run_dir)
    for c in now:
        if c.name not in seen:
            ft_store.add_event(job_id, f"Checkpoint created at step {int(c.name.split('-')[-1])}")
    return seen | {c.name for c in now}


def _total_steps(run_dir: Path) -> int | None:
    from tunekit.runs.registry import get_run

    run = get_run(str(run_dir))
    return run["total_steps"] if run else None


def _error(error_file: Path, log: Path, returncode: int) -> dict:
    """The failed job's error: what the training process wrote, else the end of its log."""
    if error_file.is_file():
        return json.loads(error_file.read_text(encoding="utf-8"))
    tail = (
        log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] if log.is_file() else []
    )
    return {
        "code": "server_error",
        "message": f"training stopped with exit status {returncode}" + (f": {tail[0]}" if tail else ""),
        "param": None,
    }


def main(argv: list[str] | None = None) -> int:
    """The job's training process: train the config; a user-facing failure goes to the error file."""
    from tunekit.config import config_from_dict
    from tunekit.errors import DataError, Interrupted, TunekitError
    from tunekit.train.session import train

    args = sys.argv[1:] if argv is None else argv
    config = Path(args[0])
    error_file = config.with_name(config.name.replace(".config.json", ".error.json"))
    try:
        cfg = config_from_dict(json.loads(config.read_text(encoding="utf-8")), source=str(config))
        train(cfg, quiet=True, resume="--resume" in args, overwrite="--overwrite" in args)
    except Interrupted as e:
        return e.exit_code
    except TunekitError as e:
        code = "invalid_training_file" if isinstance(e, DataError) else "training_failed"
        error_file.write_text(json.dumps({"code": code, "message": str(e), "param": None}), encoding="utf-8")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
