"""`tunekit tune`: search learning rate, epochs, LoRA rank and method on the validation split.

Run as: `tunekit tune examples/quickstart.yaml --budget 2h --trials 12 --out runs/tune`.

Each trial is a real `tunekit train` run (the same session, in this process) into DIR/trial-NNN, under
a time budget of (budget left) / (trials left), less the setup the trials before it took (loading
the model and data, saving it). Optuna's TPE sampler (seeded with train.seed) picks each trial's
values; its median pruner ends a trial whose validation metric, reported at each validation pass,
is worse than the median of the earlier trials at the same step (the budget's validation cadence
is the config's, or a multiple of it, so trials of one config validate on one grid of steps).

The objective is the validation loss (lower is better), or the validation accuracy for a task
that classifies (higher is better). The study lives in DIR/study.db (SQLite), so running the same
command again resumes it: finished trials are kept, a trial that was interrupted runs again, and
`--trials N` is the total the study reaches. A trial that fails (out of memory, a non-finite loss,
a config the task refuses) is recorded as failed with its reason; the study goes on.

Writes DIR/trials.csv and DIR/trials.md (every trial: number, state, objective, values, steps,
seconds, note) and DIR/best.yaml: the config with the best trial's values, ready for `tunekit train`.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunekit.config import Config, config_from_dict, identity_differences
from tunekit.console import err as console
from tunekit.console import out
from tunekit.errors import ConfigError, Interrupted, TunekitError
from tunekit.tasks import get_task
from tunekit.train.budget import format_duration, watch_validation

STUDY = "tunekit"
LORA_METHODS = ("lora", "qlora")
LR_SPREAD = 5.0  # the learning rate is searched from centre / 5 to centre x 5, log-uniform
FULL_LR_RATIO = 0.1  # a full fine-tune's learning rate centre: a tenth of a LoRA one (and LoRA's 10x full's)
MAX_EPOCHS = 10


@dataclass
class TuneResult:
    out: Path
    trials: list[dict]  # the rows of trials.csv
    best: dict | None  # the best row, None when no trial completed
    best_config: Path | None


def objective_metric(cfg: Config) -> tuple[str, str]:
    """(the validation metric, the direction): accuracy for a task that classifies, else the loss."""
    if get_task(cfg.task).data == "labels":
        return "val_accuracy", "maximize"
    return "val_loss", "minimize"


def suggest(trial, cfg: Config) -> dict[str, Any]:
    """The trial's values, as dotted config keys. The space follows the config: the method (full vs
    LoRA) only when the task takes both and the config is one of them (qlora stays qlora: it is
    chosen for its memory); the LoRA rank only for a LoRA method (alpha keeps the config's alpha/r);
    the epochs unless train.max_steps fixes the length; the learning rate always, log-uniform
    around the config's (a tenth of it for a full fine-tune of a LoRA config, ten times for LoRA of
    a full one), under a name of its own per method."""
    task = get_task(cfg.task)
    method = cfg.method
    if cfg.method in ("lora", "full") and {"lora", "full"} <= set(task.methods):
        method = trial.suggest_categorical("method", [cfg.method, "full" if cfg.method == "lora" else "lora"])
    values: dict[str, Any] = {"method": method}
    centre = cfg.train.learning_rate
    if method != cfg.method:
        centre = centre * FULL_LR_RATIO if method == "full" else centre / FULL_LR_RATIO
    name = "learning_rate" if method == cfg.method else f"learning_rate_{method}"
    values["train.learning_rate"] = trial.suggest_float(
        name, centre / LR_SPREAD, centre * LR_SPREAD, log=True
    )
    if cfg.train.max_steps is None:
        values["train.epochs"] = _suggest_epochs(trial, cfg.train.epochs)
    if method in LORA_METHODS:
        r = cfg.lora.r
        ranks = sorted({max(2, r // 4), max(2, r // 2), r, 2 * r})
        rank = trial.suggest_categorical("lora_r", ranks)
        values["lora.r"], values["lora.alpha"] = rank, cfg.lora.alpha * rank / r
    return values


def _suggest_epochs(trial, epochs: float) -> float:
    """Whole epochs from 1 to twice the config's (at most MAX_EPOCHS); a fraction of an epoch
    around the config's when it asks for less than one (a large data set)."""
    if epochs < 1:
        return trial.suggest_float("epochs", epochs / 2, min(1.0, epochs * 2))
    return trial.suggest_int("epochs", 1, min(MAX_EPOCHS, max(2, math.ceil(2 * epochs))))


def tune(
    config: Path,
    trials: int,
    out_dir: Path,
    budget_s: float | None = None,
    quiet: bool = False,
) -> TuneResult:
    """Run (or resume) the study in `out_dir` until it holds `trials` finished trials, or the budget
    is spent; write the trials table and best.yaml."""
    import optuna

    raw, cfg = _read_config(config)
    _check(cfg, trials)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric, direction = objective_metric(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=STUDY,
        storage=f"sqlite:///{(out_dir / 'study.db').resolve()}",
        load_if_exists=True,
        direction=direction,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    # Seeded by train.seed and the trials so far: a resumed study draws new values, not the first
    # trials' again. A third of the trials (2 to 10) are drawn at random before TPE models the rest.
    study.sampler = optuna.samplers.TPESampler(
        seed=cfg.train.seed + len(study.trials), n_startup_trials=max(2, min(10, trials // 3))
    )
    _claim(study, cfg, out_dir, metric)
    _requeue_interrupted(study, quiet)
    deadline = None if budget_s is None else time.monotonic() + budget_s
    overhead = 0.0  # setup + final save of the last trial: taken off the next trial's budget
    while (done := _finished(study)) < trials:
        trial_budget = cfg.train.time_budget
        if deadline is not None:
            trial_budget = (deadline - time.monotonic()) / (trials - done) - overhead
            if trial_budget <= 1:
                console.print(f"[yellow]tune: the budget is spent after {done} of {trials} trials")
                break
        overhead = _run_trial(study, raw, cfg, out_dir, metric, trial_budget, quiet)
    rows = trial_rows(study, metric)
    write_tables(rows, out_dir, metric)
    best = _best(study, rows)
    best_config = write_best(raw, best, out_dir, metric, len(rows)) if best else None
    if not quiet and rows:
        print_trials(rows)
    if best is None:
        console.print(f"[yellow]tune: no trial completed; see {out_dir / 'trials.md'}")
    elif not quiet:
        console.print(
            f"best: trial {best['trial']} ({metric} {best[metric]:.4f}); config -> {best_config} "
            f"(`tunekit train {best_config}`)"
        )
    return TuneResult(out_dir, rows, best, best_config)


def _read_config(config: Path) -> tuple[dict, Config]:
    """The config file as written (best.yaml starts from it) and as a run resolves it: validated, with
    the keys it leaves open chosen from the data (train/defaults.py: e.g. task: classify and its
    learning rate for label data), so the search centres on what a plain `tunekit train` would run."""
    from tunekit.config import load_config
    from tunekit.train.defaults import resolve_defaults

    cfg = resolve_defaults(load_config(config))  # load_config names every problem of a bad config
    return yaml.safe_load(Path(config).read_text(encoding="utf-8")), cfg


def _check(cfg: Config, trials: int) -> None:
    problems = [f"--trials {trials}: give 1 or more"] * (trials < 1)
    if cfg.data.validation is None and cfg.data.split[1] == 0:
        problems.append(
            "data.split: tune compares trials on the validation split, and this config has none; give "
            "data.validation, or a validation share in data.split (e.g. [0.8, 0.1, 0.1])"
        )
    if get_task(cfg.task).no_time_budget:
        problems.append(f"task: {cfg.task} cannot be tuned: {get_task(cfg.task).no_time_budget}")
    if problems:
        raise ConfigError(problems, source="tunekit tune")


def _claim(study, cfg: Config, out_dir: Path, metric: str) -> None:
    """Record the config a new study tunes; refuse to resume a study of another config."""
    now = cfg.model_dump(mode="json")
    then = study.user_attrs.get("config")
    if then is None:
        study.set_user_attr("config", now)
        study.set_user_attr("metric", metric)
        return
    differ = identity_differences(then, now)
    if differ:
        raise ConfigError(
            differ
            + [
                f"{out_dir} holds a study of another config; resume it with that config, or tune "
                "into another --out folder"
            ],
            source=f"tunekit tune: {out_dir / 'study.db'} (then -> now)",
        )


def _requeue_interrupted(study, quiet: bool) -> None:
    """A trial left running by a process that was killed: mark it failed (interrupted) and queue its
    values again, so the resumed study runs it once more."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        _mark_interrupted(study, t.number, t.params)
        if not quiet:
            console.print(f"tune: trial {t.number} was interrupted; it runs again")


def _mark_interrupted(study, number: int, params: dict) -> None:
    study.set_user_attr("interrupted", [*study.user_attrs.get("interrupted", []), number])
    study.enqueue_trial(params, skip_if_exists=False)


def _finished(study) -> int:
    """Trials that reached an outcome (complete, pruned or failed); interrupted ones do not count."""
    from optuna.trial import TrialState

    interrupted = set(study.user_attrs.get("interrupted", []))
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(t.state in ended and t.number not in interrupted for t in study.get_trials(deepcopy=False))


def _run_trial(study, raw: dict, cfg: Config, out_dir: Path, metric: str, budget, quiet: bool) -> float:
    """Ask for a trial, train it, tell its outcome; returns the seconds it spent outside the
    training loop (for the next trial's budget)."""
    import optuna
    from optuna.trial import TrialState

    from tunekit.train.session import train

    trial = study.ask()
    t0 = time.monotonic()
    values = suggest(trial, cfg)
    run_dir = out_dir / f"trial-{trial.number:03d}"
    updates = values | {"output_dir": str(run_dir)}
    if budget is not None:
        updates["train.time_budget"] = round(budget, 3)
    trial.set_user_attr("values", values)
    trial.set_user_attr("run_dir", str(run_dir))

    def report(step: int, metrics: dict) -> None:
        if metric in metrics:
            trial.report(metrics[metric], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: {metric} {metrics[metric]:.4f}")

    if not quiet:
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items() if k != "lora.alpha")
        limit = f", budget {format_duration(budget)}" if budget is not None else ""
        console.print(f"tune: trial {trial.number}: {shown}{limit}")
    loop_s = 0.0
    try:
        trial_cfg = config_from_dict(with_values(raw, updates), source=f"trial {trial.number}")
        with watch_validation(report):
            train(trial_cfg, quiet=True, overwrite=True)
        summary = json.loads((run_dir / "train_summary.json").read_text())
        loop_s = (summary.get("time_budget") or {}).get("spent_s", summary["train_seconds"])
        value = _objective(summary, metric)
        _attrs(trial, summary, time.monotonic() - t0)
        study.tell(trial, value)
        outcome = f"{metric} {value:.4f}"
    except optuna.TrialPruned as e:
        trial.set_user_attr("note", str(e))
        trial.set_user_attr("seconds", round(time.monotonic() - t0, 1))
        study.tell(trial, state=TrialState.PRUNED)
        outcome = str(e)
    except (Interrupted, KeyboardInterrupt):
        study.tell(trial, state=TrialState.FAIL)
        _mark_interrupted(study, trial.number, trial.params)
        write_tables(trial_rows(study, metric), out_dir, metric)
        raise
    except Exception as e:  # out of memory, a non-finite loss, a refused config: the study goes on
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        trial.set_user_attr("note", f"failed: {reason}")
        trial.set_user_attr("seconds", round(time.monotonic() - t0, 1))
        study.tell(trial, state=TrialState.FAIL)
        outcome = f"failed ({reason})"
    if not quiet:
        console.print(f"tune: trial {trial.number}: {outcome} in {time.monotonic() - t0:.0f}s")
    return max(0.0, time.monotonic() - t0 - loop_s) if loop_s else 0.0


def _objective(summary: dict, metric: str) -> float:
    """The trial's score: its final validation metric, or the best one when early stopping kept the
    best weights (`best_metric`, or `best_val_loss` in summaries that predate it)."""
    value = (summary.get("final_validation") or {}).get(metric)
    if summary.get("stopped_early"):
        best = (summary.get("best_metric") or {}).get(metric)
        best = best if best is not None else (summary.get("best_val_loss") if metric == "val_loss" else None)
        value = best if best is not None else value
    if value is None or not math.isfinite(value):
        raise TunekitError(f"the run ended without a finite {metric} (no validation pass finished)")
    return float(value)


def _attrs(trial, summary: dict, seconds: float) -> None:
    budget = summary.get("time_budget") or {}
    trial.set_user_attr("steps", summary["steps"])
    trial.set_user_attr("seconds", round(seconds, 1))
    note = "the deadline ended it" if budget.get("ended_training") else ""
    if budget.get("cut_by_budget"):
        note = note or f"budget cut it to {budget['total_steps']} of {budget['config_steps']} steps"
    trial.set_user_attr("note", note)


def with_values(raw: dict, updates: dict[str, Any]) -> dict:
    """A copy of the config dict `raw` with dotted keys set (`train.learning_rate` -> raw[train][...])."""
    new = json.loads(json.dumps(raw))
    for key, value in updates.items():
        node, parts = new, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return new


# -- the results ------------------------------------------------------------------------------------


def trial_rows(study, metric: str) -> list[dict]:
    """One row per trial: number, state, objective, the values tried, steps, seconds, note."""
    interrupted = set(study.user_attrs.get("interrupted", []))
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":  # queued (an interrupted trial's values), not run yet
            continue
        values = t.user_attrs.get("values", {})
        state = "interrupted" if t.number in interrupted else t.state.name.lower()
        rows.append(
            {
                "trial": t.number,
                "state": state,
                metric: t.value,
                "method": values.get("method"),
                "learning_rate": values.get("train.learning_rate"),
                "epochs": values.get("train.epochs"),
                "lora_r": values.get("lora.r"),
                "steps": t.user_attrs.get("steps"),
                "seconds": t.user_attrs.get("seconds"),
                "note": t.user_attrs.get("note", "run again" if state == "interrupted" else ""),
            }
        )
    return rows


def _best(study, rows: list[dict]) -> dict | None:
    """The best completed trial's row, with its config values (`values`) added."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    return next(r for r in rows if r["trial"] == best.number) | {"values": best.user_attrs["values"]}


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict]) -> list[str]:
    """The trials as a Markdown table's lines, values rounded for reading."""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(_fmt(r[k]).replace("|", "/") for k in head) + " |" for r in rows]


def write_tables(rows: list[dict], out_dir: Path, metric: str) -> None:
    """DIR/trials.csv (every value in full) and DIR/trials.md (rounded, for reading)."""
    if not rows:
        return
    with open(out_dir / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "trials.md").write_text(
        f"# tunekit tune: {metric}\n\n" + "\n".join(markdown_table(rows)) + "\n"
    )


def write_best(raw: dict, best: dict, out_dir: Path, metric: str, n_trials: int) -> Path:
    """DIR/best.yaml: the config as written, with the best trial's values. When the budget cut that
    trial short, its step count is written as train.max_steps, so the best run trains what that
    trial trained (with the learning-rate schedule ending at the same step)."""
    values = dict(best["values"])
    summary = json.loads((out_dir / f"trial-{best['trial']:03d}" / "train_summary.json").read_text())
    budget = summary.get("time_budget") or {}
    if budget.get("cut_by_budget") or budget.get("ended_training"):
        values["train.max_steps"] = summary["steps"]
    path = out_dir / "best.yaml"
    header = (
        f"# tunekit tune: the best of {n_trials} trials, trial {best['trial']} ({metric} {best[metric]:.4f}).\n"
        f"# Run as: tunekit train {path}  (paths are relative to where tune ran)\n"
    )
    path.write_text(header + yaml.safe_dump(with_values(raw, values), sort_keys=False))
    return path


def print_trials(rows: list[dict]) -> None:
    """The table on stdout, as Markdown: whole lines in a log, however narrow the terminal."""
    for line in markdown_table(rows):
        out.print(line, markup=False, highlight=False)
