"""Hostile input never produces a traceback: the config loader and the data readers, fuzzed.

Every failure must be a TunekitError (which the CLI prints as a one-paragraph message), whatever the
bytes: deeply nested structures, integers too long to convert, billion-laughs YAML aliases, binary
files, oversized lines. The data readers' own fuzz tests live in test_data_formats.py.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunekit.config import config_from_dict, load_config
from tunekit.data import read_examples
from tunekit.errors import TunekitError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values a YAML document can hold: scalars of every type and nested lists/dicts of them.
yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=30)
    | st.sampled_from(["lora", "full", "qlora", "sft", "dpo", "auto", "x.jsonl", "-1", "1e-4"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
# Mostly the real keys, so the fuzzer gets past the top level into each section's validation.
config_keys = st.sampled_from(
    ["model", "method", "task", "data", "lora", "dpo", "rl", "train", "eval", "output_dir", "unknown"]
)
section_keys = st.sampled_from(
    ["train", "format", "labels", "split", "r", "alpha", "use_dora", "epochs", "learning_rate", "batch_size",
     "max_length", "beta", "algorithm", "num_generations", "max_examples", "bogus"]
)  # fmt: skip
configs = st.dictionaries(
    config_keys, yaml_values | st.dictionaries(section_keys, yaml_values, max_size=5), max_size=8
)


@SETTINGS
@given(raw=configs | yaml_values)
def test_any_config_structure_is_valid_or_a_config_error(raw):
    try:
        config_from_dict(raw)
    except TunekitError as e:
        assert str(e)


@SETTINGS
@given(overrides=st.lists(st.text(max_size=40), max_size=4))
def test_any_set_override_is_applied_or_a_config_error(overrides):
    try:
        config_from_dict({"data": {"train": "x.jsonl"}}, overrides)
    except TunekitError as e:
        assert str(e)


@SETTINGS
@given(text=st.binary(max_size=400))
def test_any_bytes_as_a_config_file_give_a_config_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(text)
        try:
            load_config(path)
        except TunekitError as e:
            assert str(path) in str(e)


HOSTILE_CONFIGS = {
    "deeply_nested": "model: " + "[" * 20000 + "]" * 20000 + "\n",
    "huge_integer": "data: {train: x.jsonl}\ntrain: {batch_size: " + "9" * 5000 + "}\n",
    "huge_float": "data: {train: x.jsonl}\ntrain: {learning_rate: 1.0e400}\n",
    "billion_laughs": "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True))
    + "data: {train: *g}\n",
    "binary": "\x00\x01\x02\xff",
    "outside_paths": "data: {train: /etc/shadow}\noutput_dir: /proc/tunekit-run\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CONFIGS))
def test_hostile_configs_give_a_short_clear_error(name, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_text(HOSTILE_CONFIGS[name], encoding="utf-8", errors="surrogateescape")
    try:
        load_config(path)
    except TunekitError as e:
        msg = str(e)
        assert str(path) in msg
        assert len(msg) < 3000, "a hostile config must not flood the terminal"


def test_config_pointing_outside_the_project_fails_cleanly_on_the_command_line(tmp_path):
    """/etc/shadow is unreadable and /proc is not writable: both must be clear errors, exit 2."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {train: /etc/shadow}\noutput_dir: /proc/tunekit-run\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tunekit", "train", str(cfg)], capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert "/etc/shadow" in out


def test_hostile_data_files_read_without_traceback(tmp_path):
    cases = {
        "deep.jsonl": '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        "bignum.jsonl": '{"prompt": "a", "completion": "b", "n": ' + "9" * 10_000 + "}\n",
        "bigline.jsonl": '{"prompt": "' + "a" * 5_000_000 + '", "completion": "b"}\n',
        "nul.jsonl": '{"prompt": "a\\u0000b", "completion": "c"}\n',
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        examples, problems = read_examples(path)
        assert len(examples) + len({p.line for p in problems if p.severity == "error"}) == 1, name
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 64)
    examples, problems = read_examples(binary)
    assert not examples and problems
