"""The run registry: every training run on this machine, in one local SQLite file.

`$TUNEKIT_HOME/registry.sqlite` (default `~/.cache/tunekit/`) holds, per run directory: its config,
its status (running, done, failed, interrupted), every metrics record, the summary, and its
artifacts (the adapter or model, exports). The evaluation report is read from the run directory. `tunekit runs` and the dashboard (`tunekit ui`) read it;
the run directory itself stays the source of truth for everything else.

Writing to the registry must never break training: each write catches its own errors, warns once,
and carries on (a read-only home or a locked database costs the listing, never the run).
"""

from __future__ import annotations

import json
import sqlite3
import time
import warnings
from contextlib import closing
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  run_dir TEXT UNIQUE NOT NULL,
  name TEXT NOT NULL,
  task TEXT, method TEXT, model TEXT,
  status TEXT NOT NULL,            -- running | done | failed | interrupted
  config TEXT,                     -- the resolved config, JSON
  summary TEXT,                    -- train_summary.json, JSON
  error TEXT,
  total_steps INTEGER, step INTEGER,
  created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
  run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  step INTEGER NOT NULL,
  record TEXT NOT NULL             -- one metrics.jsonl record, JSON
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, step);
CREATE TABLE IF NOT EXISTS artifacts (
  run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  kind TEXT NOT NULL,              -- adapter | model (training), export (tunekit export)
  path TEXT NOT NULL,
  created REAL NOT NULL,
  UNIQUE(run_id, path)
);
CREATE TABLE IF NOT EXISTS ratings (
  run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  comparison TEXT NOT NULL,        -- what is compared: "base_few_shot|finetuned", "finetuned|run:/dir/B"
  item TEXT NOT NULL,              -- the pair: a hash of its prompt and both replies
  rater TEXT NOT NULL,
  verdict TEXT NOT NULL,           -- first | second | tie | both_bad (first, second: the comparison's order)
  first_shown_as TEXT NOT NULL,    -- A | B: where the rater saw `first` (for position bias)
  comment TEXT NOT NULL,
  pair TEXT NOT NULL,              -- JSON: prompt, reference, both names and replies (export needs no file)
  created REAL NOT NULL, updated REAL NOT NULL,
  UNIQUE(run_id, comparison, item, rater)
);
"""

_warned = False


def registry_path() -> Path:
    from tunekit.models.load import tunekit_home

    return tunekit_home() / "registry.sqlite"


def connect() -> sqlite3.Connection:
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=10)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA foreign_keys = ON")
    con.execute("PRAGMA journal_mode = WAL")  # readers (the dashboard) never block the training writer
    con.executescript(SCHEMA)
    return con


def _safely(fn):
    """A registry write that warns once instead of raising: training matters more than the listing."""

    def wrapper(*args, **kwargs):
        global _warned
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not _warned:
                _warned = True
                warnings.warn(
                    f"tunekit registry ({registry_path()}): {type(e).__name__}: {e}; the run goes on, "
                    "but `tunekit runs` and `tunekit ui` will not show it complete",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _key(run_dir) -> str:
    return str(Path(run_dir).resolve())


def _run_id(con, run_dir) -> int | None:
    row = con.execute("SELECT id FROM runs WHERE run_dir = ?", (_key(run_dir),)).fetchone()
    return row["id"] if row else None


@_safely
def register_run(run_dir, cfg, resume: bool = False) -> None:
    """A run starts (or restarts in the same folder, dropping what the earlier one logged): status
    running. A resumed run keeps its metrics; the steps it replays overwrite theirs."""
    now = time.time()
    config = json.dumps(cfg.model_dump(mode="json"))
    with closing(connect()) as con, con:
        run_id = _run_id(con, run_dir)
        if run_id is not None and resume:
            con.execute("UPDATE runs SET status='running', error=NULL, updated=? WHERE id=?", (now, run_id))
        elif run_id is not None:
            con.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            con.execute("DELETE FROM artifacts WHERE run_id = ?", (run_id,))
            con.execute(
                "UPDATE runs SET status='running', task=?, method=?, model=?, config=?, summary=NULL, "
                "error=NULL, total_steps=NULL, step=0, created=?, updated=? WHERE id=?",
                (cfg.task, cfg.method, cfg.model, config, now, now, run_id),
            )
        else:
            con.execute(
                "INSERT INTO runs (run_dir, name, task, method, model, status, config, step, created, updated) "
                "VALUES (?, ?, ?, ?, ?, 'running', ?, 0, ?, ?)",
                (_key(run_dir), Path(run_dir).name, cfg.task, cfg.method, cfg.model, config, now, now),
            )


@_safely
def log_metrics(run_dir, record: dict, total_steps: int | None = None) -> None:
    """One metrics.jsonl record; also moves the run's progress (step of total_steps)."""
    with closing(connect()) as con, con:
        run_id = _run_id(con, run_dir)
        if run_id is None:
            return
        # A resumed run replays the steps after its checkpoint: the new record replaces the old.
        con.execute("DELETE FROM metrics WHERE run_id = ? AND step >= ?", (run_id, record.get("step", 0)))
        con.execute(
            "INSERT INTO metrics (run_id, step, record) VALUES (?, ?, ?)",
            (run_id, record.get("step", 0), json.dumps(record)),
        )
        con.execute(
            "UPDATE runs SET step=?, total_steps=COALESCE(?, total_steps), updated=? WHERE id=?",
            (record.get("step", 0), total_steps, time.time(), run_id),
        )


@_safely
def finish_run(run_dir, summary: dict, saved: Path | None = None) -> None:
    """The run ended well: status done, its summary, and where the model went."""
    with closing(connect()) as con, con:
        run_id = _run_id(con, run_dir)
        if run_id is None:
            return
        con.execute(
            "UPDATE runs SET status='done', summary=?, step=COALESCE(?, step), updated=? WHERE id=?",
            (json.dumps(summary), summary.get("steps"), time.time(), run_id),
        )
        if saved is not None:
            _add(con, run_id, saved.name, saved)


@_safely
def fail_run(run_dir, error: BaseException) -> None:
    """The run stopped: status interrupted (Ctrl-C, SIGTERM: resumable) or failed, with the message."""
    from tunekit.errors import Interrupted

    status = "interrupted" if isinstance(error, Interrupted | KeyboardInterrupt) else "failed"
    with closing(connect()) as con, con:
        con.execute(
            "UPDATE runs SET status=?, error=?, updated=? WHERE run_dir=? AND status='running'",
            (status, f"{type(error).__name__}: {error}", time.time(), _key(run_dir)),
        )


@_safely
def add_artifact(run_dir, kind: str, path) -> None:
    """Something a later command wrote for a run (a report, an export)."""
    with closing(connect()) as con, con:
        run_id = _run_id(con, run_dir)
        if run_id is not None:
            _add(con, run_id, kind, Path(path))


def _add(con, run_id: int, kind: str, path: Path) -> None:
    con.execute(
        "INSERT OR REPLACE INTO artifacts (run_id, kind, path, created) VALUES (?, ?, ?, ?)",
        (run_id, kind, str(Path(path).resolve()), time.time()),
    )


# --- reading -------------------------------------------------------------------------------------


def list_runs() -> list[dict]:
    """Every registered run, newest first, with its summary parsed."""
    if not registry_path().is_file():
        return []
    with closing(connect()) as con:
        rows = con.execute("SELECT * FROM runs ORDER BY created DESC, id DESC").fetchall()
    return [_run_dict(r) for r in rows]


def get_run(ref: str | int) -> dict | None:
    """One run by id, name or run directory (a name shared by several runs gives the newest)."""
    if not registry_path().is_file():
        return None
    with closing(connect()) as con:
        ref_s = str(ref)
        row = None
        if ref_s.isdigit():
            row = con.execute("SELECT * FROM runs WHERE id = ?", (int(ref_s),)).fetchone()
        if row is None and Path(ref_s).exists():
            row = con.execute("SELECT * FROM runs WHERE run_dir = ?", (_key(ref_s),)).fetchone()
        if row is None:
            row = con.execute(
                "SELECT * FROM runs WHERE name = ? ORDER BY created DESC LIMIT 1", (ref_s,)
            ).fetchone()
        if row is None:
            return None
        run = _run_dict(row)
        run["config"] = json.loads(row["config"]) if row["config"] else None
        run["artifacts"] = [
            dict(a)
            for a in con.execute(
                "SELECT kind, path, created FROM artifacts WHERE run_id = ? ORDER BY created", (row["id"],)
            )
        ]
    return run


def get_metrics(run_id: int, after_step: int = -1) -> list[dict]:
    """The metrics records of a run, in step order (only those past `after_step`: live polling)."""
    with closing(connect()) as con:
        rows = con.execute(
            "SELECT record FROM metrics WHERE run_id = ? AND step > ? ORDER BY step, rowid",
            (run_id, after_step),
        ).fetchall()
    return [json.loads(r["record"]) for r in rows]


def _run_dict(row) -> dict:
    d = {k: row[k] for k in row.keys() if k != "config"}  # noqa: SIM118 (iterating a Row gives values)
    d["summary"] = json.loads(row["summary"]) if row["summary"] else None
    return d


# --- human ratings (`tunekit ui`'s rating view, `tunekit data ratings`) --------------------------
# Not `_safely`: a rating that was not stored must be reported to the rater, never swallowed.


def save_rating(
    run_id: int,
    comparison: str,
    item: str,
    rater: str,
    verdict: str,
    first_shown_as: str,
    comment: str,
    pair: dict,
) -> None:
    """One rater's verdict on one pair; rating the same pair again replaces the verdict."""
    now = time.time()
    with closing(connect()) as con, con:
        con.execute(
            "INSERT INTO ratings (run_id, comparison, item, rater, verdict, first_shown_as, comment, pair, "
            "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(run_id, comparison, item, rater) DO UPDATE SET verdict=excluded.verdict, "
            "first_shown_as=excluded.first_shown_as, comment=excluded.comment, updated=excluded.updated",
            (run_id, comparison, item, rater, verdict, first_shown_as, comment, json.dumps(pair), now, now),
        )


def get_ratings(run_id: int, comparison: str | None = None) -> list[dict]:
    """A run's ratings (of one comparison, or all), oldest first, each with its pair parsed."""
    if not registry_path().is_file():
        return []
    query, args = "SELECT * FROM ratings WHERE run_id = ?", [run_id]
    if comparison is not None:
        query, args = query + " AND comparison = ?", [*args, comparison]
    with closing(connect()) as con:
        rows = con.execute(query + " ORDER BY created, rowid", args).fetchall()
    return [{k: row[k] for k in row.keys()} | {"pair": json.loads(row["pair"])} for row in rows]  # noqa: SIM118


# --- display (`tunekit runs`) --------------------------------------------------------------------


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def print_runs() -> None:
    """The runs table: newest first."""
    from rich.table import Table

    from tunekit.console import out

    runs = list_runs()
    if not runs:
        out.print(f"no runs registered yet in {registry_path()}; train one with `tunekit train CONFIG`")
        return
    table = Table(
        "id", "name", "status", "task", "method", "model", "steps", "train loss", "val loss", "started"
    )
    for r in runs:
        s = r["summary"] or {}
        steps = f"{r['step'] or 0}/{r['total_steps']}" if r["total_steps"] else _fmt(r["step"])
        table.add_row(
            str(r["id"]),
            r["name"],
            r["status"],
            r["task"] or "",
            r["method"] or "",
            r["model"] or "",
            steps,
            _fmt(s.get("final_train_loss")),
            _fmt(s.get("final_val_loss")),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])),
        )
    out.print(table)


def print_run(ref: str) -> None:
    """One run in full: where it is, status, summary, last metrics, artifacts."""
    from tunekit.console import out
    from tunekit.errors import TunekitError

    run = get_run(ref)
    if run is None:
        raise TunekitError(
            f"tunekit runs {ref}: no such run (give an id, a name or a run folder; list: tunekit runs)"
        )
    out.print(f"[bold]{run['name']}[/] (id {run['id']}): {run['status']}  {run['run_dir']}")
    if run["error"]:
        out.print(f"error: {run['error']}")
    cfg = run["config"] or {}
    out.print(f"task {cfg.get('task')}, method {cfg.get('method')}, model {cfg.get('model')}")
    for k, v in (run["summary"] or {}).items():
        if not isinstance(v, dict):
            out.print(f"  {k}: {_fmt(v)}")
    metrics = get_metrics(run["id"])
    if metrics:
        out.print(f"last metrics: {json.dumps(metrics[-1])}")
    for a in run["artifacts"]:
        out.print(f"artifact {a['kind']}: {a['path']}")
