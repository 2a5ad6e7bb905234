import pytest

from tunekit.config import config_from_dict, config_to_yaml, load_config
from tunekit.errors import ConfigError


def test_defaults_fill_in():
    cfg = config_from_dict({"data": {"train": "x.jsonl"}})
    assert cfg.model == "smollm2-135m-instruct"
    assert cfg.method == "lora"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (
        16,
        32,
        0.05,
        "all-linear",
    )
    assert (cfg.train.epochs, cfg.train.learning_rate, cfg.train.batch_size, cfg.train.grad_accum) == (
        3,
        2e-4,
        8,
        1,
    )
    assert cfg.train.max_steps is None and cfg.train.max_length == 512 and cfg.train.seed == 42


def test_all_errors_reported_at_once_with_dotted_paths_and_suggestions():
    raw = {"data": {"trian": "x"}, "lora": {"rank": 3}, "train": {"batch_size": -1, "lr": 3}}
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, ["train.max_step=5"])
    msg = str(e.value)
    assert "data.train: required key is missing" in msg
    assert "data.trian: unknown key; did you mean 'data.train'?" in msg
    assert "lora.rank: unknown key; did you mean 'lora.r'?" in msg
    assert "train.lr: unknown key; did you mean 'train.learning_rate'?" in msg
    assert "train.max_step: unknown key; did you mean 'train.max_steps'?" in msg
    assert "train.batch_size" in msg and "greater than 0" in msg
    assert len(e.value.problems) == 6


def test_set_overrides_are_typed():
    cfg = config_from_dict(
        {"data": {"train": "x.jsonl"}}, ["train.max_steps=5", "lora.target_modules=[q_proj, v_proj]"]
    )
    assert cfg.train.max_steps == 5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_bad_set_syntax_and_unknown_section():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"train": "x"}}, ["train.max_steps", "trian.epochs=1"])
    msg = str(e.value)
    assert "expected KEY=VALUE" in msg
    assert "trian: unknown key; did you mean 'train'?" in msg


def test_bad_ratios_and_method(tmp_path):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"train": "x", "split": [0.5, 0.1, 0.1]}, "method": "lorax"})
    assert "data.split" in str(e.value) and "method" in str(e.value)


def test_yaml_file_roundtrip_and_errors_name_the_file(tmp_path):
    cfg = config_from_dict({"data": {"train": "x.jsonl"}, "output_dir": "runs/a"})
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    top = tmp_path / "top.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)
