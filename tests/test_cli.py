"""The command line as a user runs it: real processes, exit codes, no tracebacks for user mistakes."""

import json
import subprocess
import sys
from pathlib import Path

import yaml


def tunekit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunekit", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_commands():
    r = tunekit("--help")
    assert r.returncode == 0
    for cmd in ("train", "eval", "data", "quickstart"):
        assert cmd in r.stdout


def test_data_split_cli(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(50)))
    r = tunekit("data", "split", str(src), "--out", str(tmp_path / "out"), "--seed", "3")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["counts"] == {"train": 40, "validation": 5, "test": 5}
    assert "train 40" in r.stderr


def test_data_split_cli_stratifies_with_renamed_label_column(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text(
        "text,category\n" + "".join(f"msg {i},{'spam' if i % 5 == 0 else 'ham'}\n" for i in range(100))
    )
    r = tunekit("data", "split", str(src), "--out", str(tmp_path / "out"), "--column", "label=category")
    assert r.returncode == 0, r.stderr
    test_rows = [json.loads(x) for x in (tmp_path / "out/test.jsonl").read_text().splitlines()]
    assert len(test_rows) == 10 and sum(r["category"] == "spam" for r in test_rows) == 2


def test_bad_data_line_is_named_without_traceback(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    r = tunekit("data", "split", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert f"{src}:2" in r.stderr and "Traceback" not in r.stderr


def test_bad_ratios_cli(tmp_path):
    r = tunekit("data", "split", "x.jsonl", "--out", str(tmp_path), "--ratios", "0.8,0.1")
    assert r.returncode == 2 and "--ratios" in r.stderr and "Traceback" not in r.stderr


def test_config_errors_reported_at_once(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train": "x.jsonl"}, "train": {"lr": 1, "epocs": 2}}))
    r = tunekit("train", str(cfg), "--set", "lora.rank=4")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for key in ("train.lr", "train.epocs", "lora.rank", "did you mean 'train.epochs'"):
        assert key in r.stderr


def test_missing_train_file_is_named(tmp_path, tiny_model_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"model": str(tiny_model_dir), "data": {"train": "nope.jsonl"}, "output_dir": str(tmp_path / "r")}
        )
    )
    r = tunekit("train", str(cfg))
    assert r.returncode == 2 and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_train_and_eval_cli_on_tiny_model(tmp_path, tiny_model_dir, chat_file):
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "data": {"train": str(chat_file)},
                "train": {"batch_size": 4, "max_length": 64},
                "eval": {"max_new_tokens": 4, "few_shot": 0, "probe": None},  # covered elsewhere; slow here
                "output_dir": str(run),
            }
        )
    )
    r = tunekit("train", str(cfg), "--set", "train.max_steps=2")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 2
    r = tunekit("eval", str(run))
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "report.json").read_text())["n_test"] > 0

    # Iterate: a second run from the first one's weights (--from), then what changed (--compare).
    run2 = tmp_path / "run2"
    r = tunekit(
        "train", str(cfg), "--from", str(run), "--set", "train.max_steps=2", "--set", f"output_dir={run2}"
    )
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((run2 / "config.yaml").read_text())["train"]["init_from"] == str(run)
    assert tunekit("eval", str(run2)).returncode == 0
    r = tunekit("eval", "--compare", str(run), str(run2))
    assert r.returncode == 0, r.stderr
    assert "shared test examples" in r.stdout.replace("\n", " ")
    assert "paired exact_match" in r.stdout

    # --from a folder that is not a run of the same method: a clear error, no traceback.
    r = tunekit("train", str(cfg), "--from", str(tmp_path), "--set", f"output_dir={tmp_path / 'run3'}")
    assert r.returncode == 2 and "train.init_from" in r.stderr and "Traceback" not in r.stderr


def heavy_imports(*args):
    """The heavy libraries `tunekit ARGS` imports, by bench/cli_startup.py's probe (this tree's src)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "cli_startup.py"
    spec = importlib.util.spec_from_file_location("cli_startup", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.heavy_modules(path.parents[1] / "src", list(args))


def test_help_and_a_plain_data_check_import_no_torch(tmp_path):
    """`tunekit --help`, a command's help and `data check FILE` (no --model/--config) start in a
    fraction of a second: torch, transformers and the training libraries load only when a command
    needs them."""
    small = tmp_path / "small.jsonl"
    rows = [{"prompt": f"question {i}?", "completion": f"answer {i}"} for i in range(10)]
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for args in (
        ["--help"],
        ["data", "check", "--help"],
        ["train", "--help"],
        ["data", "check", str(small)],
    ):
        assert heavy_imports(*args) == [], f"tunekit {' '.join(args)} imported them"


def test_every_data_format_is_listed_in_the_help_and_the_config_field():
    import os

    from tunekit.config import DataConfig
    from tunekit.data.formats import FORMATS

    r = subprocess.run(
        [sys.executable, "-m", "tunekit", "data", "split", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    description = DataConfig.model_fields["format"].description
    assert len(FORMATS) >= 9
    for name in FORMATS:
        assert name in r.stdout, f"{name} missing from `tunekit data split --help`"
        assert name in description, f"{name} missing from data.format's description"
