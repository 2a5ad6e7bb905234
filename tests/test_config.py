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


# ---------------------------------------------------------------------------------------------
# Values that validate in pydantic's lax mode but crash later: every field of each kind refuses them.


def _fields(model, prefix=""):
    """(dotted key, annotation members) of every leaf field of the config, nested sections included."""
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        members = typing.get_args(field.annotation) or (field.annotation,)
        members = (field.annotation,) if typing.get_origin(field.annotation) in (tuple, list) else members
        sub = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if sub:
            yield from _fields(sub[0], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", members


_BASE = {"data": {"train": "x.jsonl", "replay": {"path": "r.jsonl"}}}


def _rejected(key: str, value: str) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(_BASE, [f"{key}={value}"])
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"{key}"), e.value.problems
    return e.value.problems[0]


def test_the_field_walk_finds_every_kind():
    from tunekit.config import Config

    kinds = {k: m for k, m in _fields(Config)}
    assert {"train.epochs", "train.learning_rate", "lora.alpha", "data.split"} <= set(kinds)
    assert {"train.batch_size", "train.seed", "data.split_seed", "data.replay.seed"} <= set(kinds)
    assert {"output_dir", "data.train", "data.validation", "train.init_from", "rl.policy"} <= set(kinds)


def test_the_issue_cases_are_rejected_at_load_naming_the_key():
    assert "finite" in _rejected("train.epochs", ".inf")
    assert "finite" in _rejected("train.learning_rate", ".inf")
    assert "finite" in _rejected("lora.alpha", ".inf")
    assert "4294967295" in _rejected("train.seed", str(2**64 + 1))
    assert "empty path" in _rejected("output_dir", '""')
    assert "boolean" in _rejected("train.batch_size", "true")


def test_every_float_field_is_finite():
    from tunekit.config import Config

    floats = [k for k, m in _fields(Config) if float in m]
    assert len(floats) >= 12
    for key in floats:
        for bad in (".inf", "-.inf", ".nan"):
            assert "finite" in _rejected(key, bad), key
    for bad in ("[.inf, 0, 0]", "[.nan, 0.5, 0.5]"):
        assert "finite" in _rejected("data.split", bad)


def test_every_int_field_refuses_bools_and_values_beyond_64_bits():
    from tunekit.config import Config

    ints = [k for k, m in _fields(Config) if int in m and bool not in m]
    assert len(ints) >= 15
    for key in ints:
        for bad in ("true", "false"):
            assert "boolean" in _rejected(key, bad), key
        _rejected(key, str(2**64))
        _rejected(key, str(-(2**64)))
    for key in [k for k, m in _fields(Config) if float in m and bool not in m]:
        assert "boolean" in _rejected(key, "true"), key
    assert "boolean" in _rejected("data.split", "[true, 0, 0]")
    # a field that admits a bool keeps it
    assert config_from_dict(_BASE, ["train.gradient_checkpointing=true"]).train.gradient_checkpointing is True


def test_every_seed_fits_numpy():
    from tunekit.config import Config

    seeds = [k for k, _ in _fields(Config) if k.endswith("seed")]
    assert len(seeds) == 3
    for key in seeds:
        _rejected(key, "-1")
        _rejected(key, str(2**32))
        assert config_from_dict(_BASE, [f"{key}={2**32 - 1}"])


def test_every_path_field_refuses_an_empty_string():
    from pathlib import Path

    from tunekit.config import Config

    paths = [k for k, m in _fields(Config) if Path in m]
    assert len(paths) >= 8
    for key in paths:
        for bad in ('""', '"  "'):
            assert "empty path" in _rejected(key, bad), key
