"""Where the fine-tuning API keeps its state: tables of its own in the run registry's SQLite file.

`$TUNEKIT_HOME/registry.sqlite` (runs/registry.py) also holds the uploaded files, the jobs (the
queue is the jobs in creation order) and each job's events, so a restarted server finds its queue,
its running job and its fine-tuned models again. The uploaded files themselves and the jobs' run
directories live under `$TUNEKIT_HOME/fine_tuning/`.

Unlike the registry's run writes, these are not best-effort: a job or file that was not stored must
fail its request, never be reported as created.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from contextlib import closing
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS ft_files (
  id TEXT PRIMARY KEY,
  filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
  path TEXT NOT NULL,              -- the stored copy, under $TUNEKIT_HOME/fine_tuning/files/
  created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ft_jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL,
  request TEXT NOT NULL,           -- the job's fields as OpenAI returns them, JSON
  config TEXT NOT NULL,            -- the tunekit config it trains with, JSON
  run_dir TEXT NOT NULL,
  status TEXT NOT NULL,            -- validating_files | queued | running | succeeded | failed | cancelled
  fine_tuned_model TEXT, trained_tokens INTEGER,
  error TEXT,                      -- {code, message, param}, JSON
  cancel_requested INTEGER NOT NULL DEFAULT 0,
  created INTEGER NOT NULL, finished INTEGER
);
CREATE TABLE IF NOT EXISTS ft_events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id TEXT NOT NULL,
  created INTEGER NOT NULL,
  level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL,
  data TEXT                        -- JSON
);
CREATE INDEX IF NOT EXISTS ft_events_job ON ft_events(job_id, seq);
"""

FINAL = ("succeeded", "failed", "cancelled")


def home() -> Path:
    from tunekit.models.load import tunekit_home

    return tunekit_home() / "fine_tuning"


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def connect() -> sqlite3.Connection:
    from tunekit.runs.registry import connect as registry_connect

    con = registry_connect()
    con.executescript(SCHEMA)
    return con


# --- files ----------------------------------------------------------------------------------------


def add_file(file_id: str, filename: str, purpose: str, size: int, path: Path) -> dict:
    row = {"id": file_id, "filename": filename, "purpose": purpose, "bytes": size, "path": str(path)}
    row["created"] = int(time.time())
    with closing(connect()) as con, con:
        con.execute(
            "INSERT INTO ft_files (id, filename, purpose, bytes, path, created) VALUES (?, ?, ?, ?, ?, ?)",
            (file_id, filename, purpose, size, str(path), row["created"]),
        )
    return row


def get_file(file_id: str) -> dict | None:
    with closing(connect()) as con:
        row = con.execute("SELECT * FROM ft_files WHERE id = ?", (file_id,)).fetchone()
    return dict(row) if row else None


def list_files(purpose: str | None = None) -> list[dict]:
    query, args = "SELECT * FROM ft_files", ()
    if purpose is not None:
        query, args = query + " WHERE purpose = ?", (purpose,)
    with closing(connect()) as con:
        return [dict(r) for r in con.execute(query + " ORDER BY created DESC, rowid DESC", args)]


def delete_file(file_id: str) -> bool:
    with closing(connect()) as con, con:
        return con.execute("DELETE FROM ft_files WHERE id = ?", (file_id,)).rowcount > 0


# --- jobs -----------------------------------------------------------------------------------------


def _job(row) -> dict:
    job = dict(row)
    job["request"] = json.loads(job["request"])
    job["config"] = json.loads(job["config"])
    job["error"] = json.loads(job["error"]) if job["error"] else None
    return job


def add_job(job_id: str, request: dict, config: dict, run_dir: Path, status: str) -> None:
    with closing(connect()) as con, con:
        con.execute(
            "INSERT INTO ft_jobs (id, request, config, run_dir, status, created) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, json.dumps(request), json.dumps(config), str(run_dir), status, int(time.time())),
        )


def get_job(job_id: str) -> dict | None:
    with closing(connect()) as con:
        row = con.execute("SELECT * FROM ft_jobs WHERE id = ?", (job_id,)).fetchone()
    return _job(row) if row else None


def list_jobs(after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
    """Jobs newest first (those created before job `after`, when given), and whether more follow."""
    query, args = "SELECT * FROM ft_jobs", []
    if after is not None:
        query += " WHERE seq < (SELECT seq FROM ft_jobs WHERE id = ?)"
        args.append(after)
    with closing(connect()) as con:
        rows = con.execute(query + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1]).fetchall()
    return [_job(r) for r in rows[:limit]], len(rows) > limit


def next_job() -> dict | None:
    """The job the worker runs next: one left running by a stopped server first, else the oldest queued."""
    with closing(connect()) as con:
        row = con.execute(
            "SELECT * FROM ft_jobs WHERE status IN ('running', 'queued') "
            "ORDER BY status = 'running' DESC, seq LIMIT 1"
        ).fetchone()
    return _job(row) if row else None


def succeeded_jobs() -> list[dict]:
    with closing(connect()) as con:
        rows = con.execute("SELECT * FROM ft_jobs WHERE status = 'succeeded' ORDER BY seq").fetchall()
    return [_job(r) for r in rows]


def update_job(job_id: str, **fields) -> None:
    """Set a job's columns; `error` is given as a dict. A job in a final state stays as it is."""
    if "error" in fields and fields["error"] is not None:
        fields["error"] = json.dumps(fields["error"])
    if fields.get("status") in FINAL:
        fields.setdefault("finished", int(time.time()))
    sets = ", ".join(f"{k} = ?" for k in fields)
    with closing(connect()) as con, con:
        con.execute(
            f"UPDATE ft_jobs SET {sets} WHERE id = ? AND status NOT IN {FINAL}", (*fields.values(), job_id)
        )


def request_cancel(job_id: str) -> None:
    """A queued job is cancelled at once; a running one is flagged for the worker to stop."""
    now = int(time.time())
    with closing(connect()) as con, con:
        con.execute(
            "UPDATE ft_jobs SET status = 'cancelled', finished = ? WHERE id = ? AND status IN "
            "('validating_files', 'queued')",
            (now, job_id),
        )
        con.execute("UPDATE ft_jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,))


# --- events ---------------------------------------------------------------------------------------


def add_event(job_id: str, message: str, level: str = "info", type: str = "message", data=None) -> None:
    with closing(connect()) as con, con:
        con.execute(
            "INSERT INTO ft_events (job_id, created, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, int(time.time()), level, type, message, json.dumps(data) if data is not None else None),
        )


def list_events(job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
    """A job's events newest first (those older than event `after`, when given), and whether more follow."""
    query, args = "SELECT * FROM ft_events WHERE job_id = ?", [job_id]
    if after is not None and after.removeprefix("ftevent-").isdigit():
        query += " AND seq < ?"
        args.append(int(after.removeprefix("ftevent-")))
    with closing(connect()) as con:
        rows = con.execute(query + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1]).fetchall()
    events = [
        {
            "object": "fine_tuning.job.event",
            "id": f"ftevent-{r['seq']}",
            "created_at": r["created"],
            "level": r["level"],
            "message": r["message"],
            "data": json.loads(r["data"]) if r["data"] else {},
            "type": r["type"],
        }
        for r in rows[:limit]
    ]
    return events, len(rows) > limit


def cancel_requested(job_id: str) -> bool:
    with closing(connect()) as con:
        row = con.execute("SELECT cancel_requested FROM ft_jobs WHERE id = ?", (job_id,)).fetchone()
    return bool(row and row["cancel_requested"])


def last_metric_step(job_id: str) -> int:
    """The step of a job's newest metrics event (-1: none): a resumed job does not repeat them."""
    with closing(connect()) as con:
        rows = con.execute(
            "SELECT data FROM ft_events WHERE job_id = ? AND type = 'metrics' ORDER BY seq DESC LIMIT 1",
            (job_id,),
        ).fetchall()
    return json.loads(rows[0]["data"])["step"] if rows else -1


def base_name(spec: str) -> str:
    """The BASE of `ft:BASE:SUFFIX:ID`: an alias as it is, a folder by its name (no ':' either way)."""
    return Path(spec).name.replace(":", "-") if "/" in spec else spec.replace(":", "-")


def model_name(job: dict) -> str:
    req = job["request"]
    return f"ft:{base_name(req['model'])}:{req['suffix'] or ''}:{job['id'].removeprefix('ftjob-')[:8]}"
