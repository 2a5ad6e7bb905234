"""data.replay: general examples mixed into training (never into validation or test)."""

import json

import pytest

from conftest import shared_data
from tunekit.config import ReplayConfig, config_from_dict
from tunekit.data.replay import mix_replay, replay_examples
from tunekit.errors import ConfigError, DataError


def test_replay_draws_a_seeded_share(tmp_path):
    path = shared_data("llamafactory-demo/alpaca_en_demo.json")
    got = replay_examples(ReplayConfig(path=path, ratio=0.1), n_train=200)
    assert len(got) == 20 and all(ex.messages[-1].role == "assistant" for ex in got)
    assert got == replay_examples(ReplayConfig(path=path, ratio=0.1), n_train=200)  # same seed, same draw
    mixed, n = mix_replay(["task"] * 200, ReplayConfig(path=path, ratio=0.1))
    assert n == 20 and len(mixed) == 220 and mixed[:200] == ["task"] * 200
    assert mix_replay(["task"], None) == (["task"], 0)


def test_replay_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.replay.ratio"):
        config_from_dict({"data": {"train": "x.jsonl", "replay": {"path": "a.json", "ratio": 2}}})
    with pytest.raises(DataError, match="data.replay.path: no such file"):
        replay_examples(ReplayConfig(path=tmp_path / "nope.json"), 10)


def test_training_with_replay_keeps_splits_clean(tiny_model_dir, chat_file, tmp_path):
    from tunekit.train.session import train

    replay = tmp_path / "general.jsonl"
    replay.write_text(
        "".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("yes", "no", "maybe"))
    )
    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train": str(chat_file), "replay": {"path": str(replay), "ratio": 0.5}},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 2, "batch_size": 4, "max_length": 64},
            "output_dir": str(tmp_path / "run"),
        }
    )
    run = train(cfg, quiet=True)
    summary = json.loads((run / "train_summary.json").read_text())
    n_train = summary["train_examples"]
    assert summary["replay_examples"] == round(0.5 * n_train)
    for split in ("train", "validation", "test"):
        assert "Say " not in (run / "data" / f"{split}.jsonl").read_text()


def test_replay_file_shorthand_and_off(tmp_path):
    """`data.replay: FILE` is {path: FILE}; false and null turn replay off."""
    path = shared_data("llamafactory-demo/alpaca_en_demo.json")
    cfg = config_from_dict({"data": {"train": "x.jsonl", "replay": str(path)}})
    assert (cfg.data.replay.source, cfg.data.replay.path) == ("file", path)
    assert len(replay_examples(cfg.data.replay, 50)) == 5
    for off in (False, None):
        assert config_from_dict({"data": {"train": "x.jsonl", "replay": off}}).data.replay is None
