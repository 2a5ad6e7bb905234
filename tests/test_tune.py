"""`tunekit tune` on a tiny random llama: trials finish and are tabled, best.yaml trains, the study
resumes, and a failing or interrupted trial is recorded without ending the study."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from tunekit.config import load_config
from tunekit.errors import ConfigError, Interrupted
from tunekit.iterate.tune import tune
from tunekit.train import session


def _config(tmp_path, tiny_model_dir, chat_file, **train) -> Path:
    path = tmp_path / "tune.yaml"
    raw = {
        "model": str(tiny_model_dir),
        "data": {"train": str(chat_file)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"epochs": 1, "learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "seed": 0} | train,
        "eval": {"probe": None},
        "output_dir": str(tmp_path / "run"),
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def _rows(out):
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_three_trials_then_resume_with_more(tmp_path, tiny_model_dir, chat_file):
    config, out = _config(tmp_path, tiny_model_dir, chat_file), tmp_path / "study"
    result = tune(config, 3, out, budget_s=600, quiet=True)
    rows = _rows(out)
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} <= {"complete", "pruned"} and rows[0]["state"] == "complete"
    assert all(r["method"] in ("lora", "full") and float(r["learning_rate"]) > 0 for r in rows)
    assert all(r["val_loss"] for r in rows if r["state"] == "complete")
    assert (out / "trials.md").read_text().count("\n| ") >= 4  # header + 3 trials
    assert (out / "study.db").is_file() and (out / "trial-000" / "train_summary.json").is_file()

    # best.yaml: the config with the best trial's values, and it trains as it is.
    best = result.best
    assert best is not None and best["val_loss"] == min(r["val_loss"] for r in result.trials if r["val_loss"])
    cfg = load_config(out / "best.yaml", [f"output_dir={tmp_path / 'best-run'}", "train.max_steps=2"])
    assert cfg.method == best["method"] and cfg.train.learning_rate == pytest.approx(best["learning_rate"])
    assert session.train(cfg, quiet=True).joinpath("train_summary.json").is_file()

    # The same folder resumes: the first three trials are kept as they were, one more runs.
    tune(config, 4, out, budget_s=600, quiet=True)
    again = _rows(out)
    assert len(again) == 4 and again[:3] == rows


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    real, calls = session.train, []

    def first_runs_out_of_memory(cfg, **kw):
        calls.append(cfg)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(cfg, **kw)

    monkeypatch.setattr(session, "train", first_runs_out_of_memory)
    out = tmp_path / "study"
    tune(_config(tmp_path, tiny_model_dir, chat_file), 2, out, quiet=True)
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["fail", "complete"]
    assert "out of memory" in rows[0]["note"] and rows[0]["note"].startswith("failed: RuntimeError")
    assert (out / "best.yaml").is_file()


def test_an_interrupted_trial_runs_again_on_resume(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    real = session.train

    def interrupted(cfg, **kw):
        raise Interrupted("SIGTERM at step 1 of 5: checkpoint saved", exit_code=143)

    monkeypatch.setattr(session, "train", interrupted)
    config, out = _config(tmp_path, tiny_model_dir, chat_file), tmp_path / "study"
    with pytest.raises(Interrupted):
        tune(config, 1, out, quiet=True)
    assert [r["state"] for r in _rows(out)] == ["interrupted"]
    monkeypatch.setattr(session, "train", real)
    result = tune(config, 1, out, quiet=True)
    first, rerun = result.trials
    assert (first["state"], rerun["state"]) == ("interrupted", "complete")
    assert (first["learning_rate"], first["method"]) == (rerun["learning_rate"], rerun["method"])


def test_a_study_of_another_config_is_refused(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    monkeypatch.setattr(session, "train", lambda cfg, **kw: (_ for _ in ()).throw(RuntimeError("no")))
    out = tmp_path / "study"
    tune(_config(tmp_path, tiny_model_dir, chat_file), 1, out, quiet=True)
    with pytest.raises(ConfigError) as e:
        tune(_config(tmp_path, tiny_model_dir, chat_file, learning_rate=1e-3), 2, out, quiet=True)
    assert any("train.learning_rate: 0.01 -> 0.001" in p for p in e.value.problems), e.value.problems


def test_tune_needs_a_validation_split(tmp_path, tiny_model_dir, chat_file):
    config = _config(tmp_path, tiny_model_dir, chat_file)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["split"] = [0.9, 0.0, 0.1]
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        tune(config, 2, tmp_path / "study", quiet=True)
    assert any(p.startswith("data.split: tune compares trials") for p in e.value.problems)


def test_cli_budget_error_names_the_flag(tmp_path, tiny_model_dir, chat_file):
    from typer.testing import CliRunner

    from tunekit import cli
    from tunekit.errors import TunekitError

    config = _config(tmp_path, tiny_model_dir, chat_file)
    r = CliRunner().invoke(cli.app, ["tune", str(config), "--budget", "soon", "--out", str(tmp_path / "s")])
    assert isinstance(r.exception, TunekitError)
    assert str(r.exception).startswith("--budget: 'soon' is not a duration") and "1h30m" in str(r.exception)
    assert not (tmp_path / "s").exists()


def test_the_objective_is_the_kept_weights_score():
    from tunekit.errors import TunekitError
    from tunekit.iterate.tune import _objective

    last = {"final_validation": {"val_loss": 0.9, "val_accuracy": 0.7}}
    assert _objective(last, "val_loss") == 0.9 and _objective(last, "val_accuracy") == 0.7
    stopped = last | {"stopped_early": True, "best_metric": {"val_accuracy": 0.8}, "best_val_loss": None}
    assert _objective(stopped, "val_accuracy") == 0.8  # early stopping kept the step with accuracy 0.8
    assert _objective(last | {"stopped_early": True, "best_val_loss": 0.5}, "val_loss") == 0.5
    with pytest.raises(TunekitError, match="without a finite val_loss"):
        _objective({"final_validation": {}}, "val_loss")


def test_label_data_is_tuned_on_validation_accuracy(tmp_path, tiny_model_dir):
    """Text + label data with no task: is a classify run (train/defaults.py); tune then maximises the
    validation accuracy, and the table's objective column says so."""
    words = {"late": "delay", "broken": "damage", "refund": "money"}
    rows = [
        {"text": f"order {i} is about {w}", "label": words[w]}
        for i in range(24)
        for w in [list(words)[i % 3]]
    ]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "classify.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "data": {"train": str(tmp_path / "labels.jsonl")},
                "train": {"epochs": 1, "batch_size": 4, "max_length": 32},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    result = tune(config, 2, tmp_path / "study", quiet=True)
    assert "val_accuracy" in result.trials[0] and 0 <= result.best["val_accuracy"] <= 1
    assert (tmp_path / "study" / "trials.md").read_text().startswith("# tunekit tune: val_accuracy")
