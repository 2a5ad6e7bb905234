"""Where a run's progress goes besides its own folder: the run registry, TensorBoard, and MLflow.

- registry (tunekit/runs/registry.py): status, config, every metrics record, summary, artifacts;
  `tunekit runs` and `tunekit ui` read it.
- TensorBoard: event files in RUN_DIR/tensorboard/ (`tensorboard --logdir runs/`).
- MLflow: only when it is installed; it logs to $MLFLOW_TRACKING_URI, or to
  $TUNEKIT_HOME/mlruns when that is not set.

None of them may break training: every call catches its own errors and warns once per tracker.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

from tunekit.runs import registry

_writers: dict[str, object] = {}  # run_dir -> TensorBoard SummaryWriter
_mlflow_runs: set[str] = set()  # run_dirs with an active MLflow run
_warned: set[str] = set()


def _warn_once(tracker: str, e: Exception) -> None:
    if tracker not in _warned:
        _warned.add(tracker)
        warnings.warn(
            f"tunekit {tracker} logging is off for now: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=3
        )


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def start_run(run_dir: Path, cfg, resume: bool = False) -> None:
    """A run begins (or resumes): register it as running, open its TensorBoard log, start an MLflow run."""
    registry.register_run(run_dir, cfg, resume)
    key = str(run_dir)
    try:
        from torch.utils.tensorboard import SummaryWriter

        _close_writer(key)
        _writers[key] = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        _writers[key].add_text("config", "```\n" + cfg.model_dump_json(indent=2) + "\n```")
    except Exception as e:
        _warn_once("TensorBoard", e)
    if importlib.util.find_spec("mlflow") is not None:
        try:
            import mlflow

            from tunekit.models.load import tunekit_home

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri((tunekit_home() / "mlruns").resolve().as_uri())
            mlflow.start_run(run_name=Path(run_dir).name)
            mlflow.log_params(_flat(cfg.model_dump(mode="json")))
            _mlflow_runs.add(key)
        except Exception as e:
            _warn_once("MLflow", e)


def log_metrics(run_dir: Path, record: dict, total_steps: int | None = None) -> None:
    """One metrics.jsonl record, to every tracker."""
    registry.log_metrics(run_dir, record, total_steps)
    key, step = str(run_dir), int(record.get("step", 0))
    scalars = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and k not in ("step",)}
    writer = _writers.get(key)
    if writer is not None:
        try:
            for k, v in scalars.items():
                writer.add_scalar(
                    f"train/{k}" if not k.startswith("val_") else f"validation/{k[4:]}", v, step
                )
            writer.flush()  # the dashboard and `tensorboard` show live progress
        except Exception as e:
            _warn_once("TensorBoard", e)
    if key in _mlflow_runs:
        try:
            import mlflow

            mlflow.log_metrics(scalars, step=step)
        except Exception as e:
            _warn_once("MLflow", e)


def finish_run(run_dir: Path, summary: dict, saved: Path | None = None) -> None:
    """The run ended well."""
    registry.finish_run(run_dir, summary, saved)
    _end(run_dir, "FINISHED")


def fail_run(run_dir: Path, error: BaseException) -> None:
    """The run stopped with an error (the caller re-raises it)."""
    registry.fail_run(run_dir, error)
    _end(run_dir, "FAILED")


def _end(run_dir: Path, status: str) -> None:
    key = str(run_dir)
    _close_writer(key)
    if key in _mlflow_runs:
        _mlflow_runs.discard(key)
        try:
            import mlflow

            mlflow.end_run(status=status)
        except Exception as e:
            _warn_once("MLflow", e)


def _close_writer(key: str) -> None:
    writer = _writers.pop(key, None)
    if writer is not None:
        try:
            writer.close()
        except Exception as e:
            _warn_once("TensorBoard", e)
