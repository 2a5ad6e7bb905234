"""The run registry: training registers runs (running -> done / failed) with config, metrics, summary and
artifacts; TensorBoard gets the same scalars; a broken registry never breaks training; `tunekit runs`."""

import json
import warnings

import pytest
from typer.testing import CliRunner

from tunekit.cli import app
from tunekit.config import config_from_dict
from tunekit.errors import TunekitError
from tunekit.runs import registry
from tunekit.train.session import train


def _cfg(tiny_model_dir, tmp_path, name="run", **lora):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"item {i}?"},
                {"role": "assistant", "content": f"C-{i % 3}"},
            ]
        }
        for i in range(16)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train": str(data)},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0} | lora,
            "train": {
                "max_steps": 3,
                "learning_rate": 1e-2,
                "batch_size": 4,
                "max_length": 64,
                "log_every": 1,
            },
            "output_dir": str(tmp_path / name),
        }
    )


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registry, "_warned", False)
    return tmp_path / "home"


def test_training_registers_the_run_with_metrics_summary_artifacts_and_tensorboard(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(_cfg(tiny_model_dir, tmp_path), quiet=True)
    (run,) = registry.list_runs()
    assert (run["name"], run["status"], run["task"], run["method"]) == ("run", "done", "sft", "lora")
    assert (run["step"], run["total_steps"]) == (3, 3)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert run["summary"]["final_train_loss"] == summary["final_train_loss"]
    full = registry.get_run("run")
    assert full["config"]["lora"]["r"] == 4
    assert [a["kind"] for a in full["artifacts"]] == ["adapter"]
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert registry.get_metrics(run["id"]) == jsonl
    assert registry.get_metrics(run["id"], after_step=2) == jsonl[-1:]
    # TensorBoard holds the same training losses, step by step.
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tb = events.Scalars("train/loss")
    assert [e.step for e in tb] == [m["step"] for m in jsonl]
    assert [e.value for e in tb] == pytest.approx([m["loss"] for m in jsonl], rel=1e-6)


def test_a_failed_run_is_marked_failed_with_its_error(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, name="broken", target_modules=["no_such_layer"])
    with pytest.raises(TunekitError):
        train(cfg, quiet=True)
    run = registry.get_run("broken")
    assert run["status"] == "failed" and "no_such_layer" in run["error"]


def test_a_broken_registry_never_breaks_training(tiny_model_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the registry's folder should be")
    monkeypatch.setenv("TUNEKIT_HOME", str(blocker))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir = train(_cfg(tiny_model_dir, tmp_path), quiet=True)
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    said = [str(w.message) for w in caught if "tunekit registry" in str(w.message)]
    assert len(said) == 1, said  # warned once, not at every step


def test_runs_command_lists_and_shows(tiny_model_dir, tmp_path):
    train(_cfg(tiny_model_dir, tmp_path, name="alpha"), quiet=True)
    runner = CliRunner()
    listing = runner.invoke(app, ["runs"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    assert "alpha" in listing.output and "done" in listing.output
    shown = runner.invoke(app, ["runs", "alpha"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "artifact adapter" in shown.output and "final_train_loss" in shown.output
    missing = runner.invoke(app, ["runs", "nope"])
    assert missing.exit_code != 0 and "no such run" in str(missing.exception)
