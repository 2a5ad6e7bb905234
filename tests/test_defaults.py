"""Settings chosen from the data where the config leaves them open (train/defaults.py)."""

import json

import pytest

from conftest import jsonl, write
from tunekit.config import config_from_dict, config_to_yaml, load_config
from tunekit.train.defaults import CLASSIFY_LR, PATIENCE, resolve_defaults


def _labels(tmp_path, n, name="labels.jsonl"):
    rows = [{"text": f"order {i} is {w}", "label": w} for i, w in enumerate(["late", "broken"] * (n // 2))]
    return write(tmp_path, name, jsonl(*rows))


def _cfg(train_file, **top):
    raw = {"model": "smollm2-135m-instruct", "data": {"train": str(train_file)}} | top
    return config_from_dict(raw)


def test_label_data_without_a_task_trains_a_label_head_with_a_schedule_for_its_size(tmp_path):
    said = []
    cfg = resolve_defaults(_cfg(_labels(tmp_path, 1000)), say=said.append)
    assert cfg.task == "classify"
    tc = cfg.train
    assert tc.learning_rate == CLASSIFY_LR["lora"] and tc.batch_size == 16
    # 800 training rows after the 80/10/10 split: 25,000 passes / 800 = 31 -> at most 10 epochs
    assert tc.epochs == 10
    assert tc.eval_every == 50 // 4 and tc.early_stopping_patience == PATIENCE
    assert "task: classify" in said[0] and "800 training rows" in said[1]


@pytest.mark.parametrize("rows, epochs", [(11250, 3), (40000, 2), (3000, 10)])
def test_epochs_shrink_as_the_data_grows(tmp_path, rows, epochs):
    cfg = resolve_defaults(_cfg(_labels(tmp_path, rows)))
    assert cfg.train.epochs == epochs


def test_what_the_user_wrote_stands(tmp_path):
    f = _labels(tmp_path, 100)
    cfg = resolve_defaults(_cfg(f, task="sft"))
    assert cfg.task == "sft" and cfg.train.learning_rate == 2.0e-4 and cfg.train.eval_every is None
    cfg = resolve_defaults(_cfg(f, method="full", train={"learning_rate": 3e-5, "epochs": 1}))
    assert cfg.task == "classify" and cfg.train.learning_rate == 3e-5 and cfg.train.epochs == 1
    full = resolve_defaults(_cfg(f, method="full"))
    assert full.train.learning_rate == CLASSIFY_LR["full"]
    # asking for replay (an sft feature) keeps generation
    assert resolve_defaults(_cfg(f, data={"train": str(f), "replay": "self"})).task == "sft"
    assert resolve_defaults(_cfg(f, data={"train": str(f), "replay": False})).task == "classify"


def test_chat_data_and_unreadable_files_are_left_alone(tmp_path, chat_file):
    cfg = _cfg(chat_file)
    assert resolve_defaults(cfg) == cfg
    missing = _cfg(tmp_path / "nope.jsonl")
    assert resolve_defaults(missing) == missing  # the data check names the missing file later


def test_a_resolved_config_written_and_read_back_resolves_to_itself(tmp_path):
    cfg = resolve_defaults(_cfg(_labels(tmp_path, 300)))
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(cfg))
    again = load_config(path)
    assert resolve_defaults(again) == again == cfg


def test_training_label_data_with_no_task_yields_a_classifier(tiny_model_dir, tmp_path):
    from tunekit.train.session import train

    f = _labels(tmp_path, 40)
    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train": str(f)},
            "train": {"max_steps": 2, "max_length": 32},
            "output_dir": str(tmp_path / "run"),
        }
    )
    run = train(cfg, quiet=True)
    assert json.loads((run / "labels.json").read_text()) == ["broken", "late"]
    written = load_config(run / "config.yaml")
    assert written.task == "classify" and written.train.early_stopping_patience == PATIENCE
