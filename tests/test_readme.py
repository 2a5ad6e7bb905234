"""The README stays true: its commands exist with the options it shows, its config block validates,
and its Python example imports what it names (LitGPT's tests/test_readme.py idea)."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

import tunekit
from tunekit.config import config_from_dict

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _command_names() -> set[str]:
    """Every command and command group the CLI registers, at any depth."""
    from tunekit.cli import app

    names, apps = set(), [app]
    while apps:
        a = apps.pop()
        names |= {(c.name or c.callback.__name__).replace("_", "-") for c in a.registered_commands}
        for g in a.registered_groups:
            names.add(g.name)
            apps.append(g.typer_instance)
    return names


def test_quick_start_is_the_two_make_commands():
    first = _blocks("bash")[0]
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == ["make demo", "make test"]


def test_every_tunekit_command_and_option_exists():
    lines = [ln.split("#")[0].strip() for b in _blocks("bash") for ln in b.splitlines()]
    commands = [ln for ln in lines if ln.startswith("tunekit")]
    assert len(commands) >= 5
    for cmd in commands:
        words = cmd.split()[1:]
        sub = [w for w in words[:2] if re.fullmatch(r"[a-z]+", w) and w in _command_names()]
        r = subprocess.run([sys.executable, "-m", "tunekit", *sub, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stderr)
        for opt in re.findall(r"--[a-z][a-z-]*", cmd):
            assert opt in r.stdout, (cmd, opt)


def test_config_block_validates():
    block = next(b for b in _blocks("yaml") if b.startswith("model:"))
    cfg = config_from_dict(yaml.safe_load(block))
    assert cfg.method == "lora" and cfg.lora.r == 16 and cfg.train.learning_rate == 2e-4


def test_python_example_names_exist():
    block = _blocks("python")[0]
    names = re.search(r"from tunekit import (.+)", block).group(1).split(", ")
    for name in names:
        assert hasattr(tunekit, name.strip()), name
    compile(block, "README", "exec")
