"""`tunekit data check`: every row accounted for, duplicates, leakage, statistics, exit codes."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import shared_data
from tunekit.config import config_from_dict
from tunekit.data.check import check_config, check_data, write_clean
from tunekit.errors import DataError


def _chat(user, answer, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": msgs}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


SENT = (
    "the quick brown fox jumps over the lazy dog near the river bank today while birds sing loudly above "
    "and children play football in the green park beside the old stone church with its tall bell tower"
)  # 40 words: changing one leaves a word-3-shingle Jaccard of 35/41 = 0.85


def test_openai_cookbook_toy_chat_matches_openais_validator():
    """OpenAI's own notebook finds: 5 examples, no format errors, 1 without a system message,
    1 without a user message, and one example (line 5) far over a 4,096-token limit."""
    path = shared_data("openai-cookbook-chat/toy_chat_fine_tuning.jsonl")
    report = check_data([path], model="smollm2-135m-instruct", max_length=4096)
    d = report.to_dict()
    assert (d["total"], d["kept"], d["rejected"], d["errors"]) == (5, 5, 0, [])
    kinds = [(w["kind"], w["line"]) for w in d["warnings"]]
    assert sum(k == "no_system" for k, _ in kinds) == 1
    assert sum(k == "no_user" for k, _ in kinds) == 1
    assert [line for k, line in kinds if k == "too_long"] == [5]
    assert d["stats"]["tokens_per_example"]["max"] > 4096
    assert report.exit_code == 0


def test_rows_accounted_for_and_exit_codes(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [
            _chat("hi", "hello"),
            "{not json",
            {"messages": [{"role": "robot", "content": "x"}]},
            _chat("a", "b"),
        ],
    )
    report = check_data([path])
    d = report.to_dict()
    assert d["total"] == 4 and d["kept"] == 2 and d["rejected"] == 2
    assert {e["line"] for e in d["errors"]} == {2, 3}
    assert all({"file", "line", "field", "kind", "message"} <= set(e) for e in d["errors"])
    assert report.exit_code == 1
    assert check_data([_write(tmp_path / "ok.jsonl", [_chat("hi", "hello")])]).exit_code == 0
    assert check_data([tmp_path / "missing.jsonl"]).exit_code == 2


def test_exact_and_near_duplicates_with_lines(tmp_path):
    near = SENT.replace("today", "tonight")
    rows = [
        _chat(SENT, "x"),
        _chat("unrelated question about taxes", "y"),
        _chat(SENT.upper() + "  ", "X"),
        _chat(near, "x"),
    ]
    d = check_data([_write(tmp_path / "d.jsonl", rows)]).to_dict()
    exact = [x for x in d["duplicates"] if x["kind"] == "exact"]
    assert exact and exact[0]["lines"] == [1, 3]
    near_pairs = [x["lines"] for x in d["duplicates"] if x["kind"] == "near"]
    assert [1, 4] in near_pairs


def test_leakage_between_train_and_test(tmp_path):
    train = _write(tmp_path / "train.jsonl", [_chat(SENT, "a"), _chat("only in train, nothing else", "b")])
    test = _write(
        tmp_path / "test.jsonl", [_chat("something different entirely here", "c"), _chat(SENT, "a")]
    )
    leaks = check_data([train, test]).to_dict()["leakage"]
    assert {
        "kind": "exact",
        "a": {"file": str(train), "line": 1},
        "b": {"file": str(test), "line": 2},
    } in leaks


def test_label_stats_and_declared_label_set(tmp_path):
    rows = [{"text": f"t{i}", "label": "a"} for i in range(6)] + [
        {"text": "u", "label": "b"},
        {"text": "v", "label": "c"},
    ]
    path = _write(tmp_path / "c.jsonl", rows)
    s = check_data([path]).stats
    assert s["labels"] == {"a": 6, "b": 1, "c": 1} and s["label_imbalance_ratio"] == 6.0
    r = check_data([path], labels=["a", "b"])
    assert [(e.line, e.kind) for e in r.errors] == [(8, "bad_label")] and r.rejected == 1


def test_banking77_statistics():
    path = shared_data("banking77/train.csv")
    s = check_data([path], columns={"label": "category"}).stats
    assert s["examples"] == 10003 and len(s["labels"]) == 77
    assert s["label_imbalance_ratio"] == pytest.approx(187 / 35, rel=1e-3)


def test_write_clean(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_chat("hi", "hello"), "{bad", _chat("a", "b")])
    report = check_data([path])
    write_clean(report, tmp_path / "clean")
    kept = (tmp_path / "clean/d.clean.jsonl").read_text().splitlines()
    rejects = [json.loads(x) for x in (tmp_path / "clean/d.rejects.jsonl").read_text().splitlines()]
    assert len(kept) == 2 and len(rejects) == 1 and rejects[0]["line"] == 2 and rejects[0]["reasons"]


def test_cli_json_and_exit_code(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_chat("hi", "hello"), "{bad"])
    out = tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, "-m", "tunekit", "data", "check", str(path), "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1, r.stderr
    d = json.loads(out.read_text())
    assert {"total", "kept", "rejected", "errors", "warnings", "duplicates", "leakage", "stats"} <= set(d)
    assert "Traceback" not in r.stderr and "invalid" in r.stdout.lower()


def _cfg(tiny_model_dir, train, tmp_path, **extra):
    return config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train": str(train)},
            "train": {"max_steps": 1, "batch_size": 2, "max_length": 64},
            "output_dir": str(tmp_path / "run"),
        }
        | extra
    )


def test_train_refuses_bad_data_unless_allowed(tiny_model_dir, chat_file, tmp_path):
    from tunekit.train.session import train

    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat_file.read_text() + "{oops\n")
    cfg = _cfg(tiny_model_dir, bad, tmp_path)
    with pytest.raises(DataError, match="allow-data-errors"):
        train(cfg, quiet=True)
    run = train(cfg, quiet=True, allow_data_errors=True)
    manifest = json.loads((run / "data/manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 24


def test_estimate_is_measured(tiny_model_dir, chat_file, tmp_path):
    from tunekit.estimate.training import estimate_checked

    cfg = _cfg(tiny_model_dir, chat_file, tmp_path)
    e = estimate_checked(cfg, check_config(cfg), price_per_hour=2.0)
    assert e["measured_tokens_per_s"] > 0 and e["peak_memory_mb"] > 0
    assert e["estimated_cost"] == pytest.approx(e["estimated_seconds"] / 3600 * 2.0)


def test_cli_config_check(tiny_model_dir, chat_file, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": {"train": str(chat_file)}}))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunekit",
            "data",
            "check",
            "--config",
            str(cfg),
            "--estimate",
            "--price-per-hour",
            "1.5",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "training estimate" in r.stdout and "measured here" in r.stdout


# ---- rows no task can train on, and empty files (issue 20, item 9) ------------------------------


def test_a_text_only_csv_is_an_error_at_data_check(tmp_path):
    """Before: data check passed (exit 0) and `train` died in the chat template with a traceback."""
    path = tmp_path / "t.csv"
    path.write_text("text\nhello there\ngeneral kenobi\n")
    report = check_data([path])
    assert (report.kept, report.rejected, report.exit_code) == (0, 2, 1)
    assert {(e.line, e.kind) for e in report.errors} == {(2, "no_prompt"), (3, "no_prompt")}
    assert "raw text" in report.errors[0].message


def test_a_conversation_that_starts_with_the_answer_is_an_error(tmp_path):
    alone = {"messages": [{"role": "assistant", "content": "hello"}]}
    weighted = {"messages": [{"role": "assistant", "content": "hi", "weight": 0}, {"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"}]}  # fmt: skip
    hh = {"chosen": "\n\nAssistant: yes", "rejected": "\n\nAssistant: no"}
    path = _write(tmp_path / "d.jsonl", [_chat("hi", "hello"), alone, weighted])
    report = check_data([path])
    assert [(e.line, e.kind) for e in report.errors] == [(2, "no_prompt")]
    assert report.kept == 2  # a leading answer with weight 0 is context, not a target
    report = check_data([_write(tmp_path / "hh.jsonl", [hh])])
    assert [(e.line, e.kind) for e in report.errors] == [(1, "no_prompt")]


@pytest.mark.parametrize("content", ["", "\n\n  \n", "text,label\n"])
def test_an_empty_file_is_an_error(tmp_path, content):
    """Before: 0 rows, exit 0."""
    path = tmp_path / ("d.csv" if "," in content else "d.jsonl")
    path.write_text(content)
    report = check_data([path])
    assert report.exit_code == 1
    assert [(e.line, e.kind) for e in report.errors] == [(0, "empty_file")]


def test_train_on_rows_without_a_prompt_is_a_clean_error(tiny_model_dir, tmp_path):
    """Before: a ValueError traceback from the chat template; with --allow-data-errors too."""
    from tunekit.train.session import train

    path = tmp_path / "t.csv"
    path.write_text("text\nhello there\ngeneral kenobi\nthe third\n")
    cfg = _cfg(tiny_model_dir, path, tmp_path)
    with pytest.raises(DataError, match="allow-data-errors") as info:
        train(cfg, quiet=True)
    assert "no_prompt" in str(info.value) or "raw text" in str(info.value)
    with pytest.raises(DataError, match="cannot be trained on"):
        train(cfg, quiet=True, allow_data_errors=True)


# ---- output paths (issue 20, item 14) ------------------------------------------------------------


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "tunekit", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def test_outputs_under_a_file_or_over_the_data_are_clear_errors(tmp_path):
    """Before: NotADirectoryError / FileExistsError tracebacks, or the data file overwritten."""
    data = _write(tmp_path / "d.jsonl", [_chat("hi", "hello"), _chat("a", "bb")])
    cases = {
        ("--json", data / "r.json"): "is a file, not a folder",
        ("--json", data): "is the input file",
        ("--json", tmp_path): "is a folder",
        ("--write-clean", data): "is a file, not a folder",
        ("--write-clean", data / "sub"): "is a file, not a folder",
    }
    for (flag, target), message in cases.items():
        code, out = _cli("data", "check", data, flag, target)
        assert code == 2 and message in out and "Traceback" not in out, (flag, target, out)
    before = data.read_text()
    code, out = _cli("data", "split", data, "--out", data / "x")
    assert code == 2 and "is a file, not a folder" in out and "Traceback" not in out, out
    (tmp_path / "s").mkdir()
    src = _write(tmp_path / "s" / "train.jsonl", [_chat(f"q{i}", f"answer {i}") for i in range(10)])
    code, out = _cli("data", "split", src, "--out", tmp_path / "s")
    assert code == 2 and "is the input file" in out, out
    assert data.read_text() == before and len(src.read_text().splitlines()) == 10


def test_write_clean_refuses_two_files_with_one_stem(tmp_path):
    from tunekit.errors import TunekitError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = _write(tmp_path / "a" / "d.jsonl", [_chat("hi", "hello")])
    two = _write(tmp_path / "b" / "d.jsonl", [_chat("a", "bb")])
    with pytest.raises(TunekitError, match="would both write d.clean.jsonl"):
        write_clean(check_data([one, two]), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
