"""data.streaming: large data sets read, checked, split and tokenized in bounded memory.

The streaming path must train exactly as the normal path does on the same examples, split the same
way every time, report bad rows with file:line, keep its token store exact, resume, and hold its
memory flat as the rows grow (measured in a fresh process with getrusage, not timed).
"""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tunekit.train.recipes.sft as sft
import tunekit.train.tokens as tokens
from conftest import jsonl, signal_on_call, write
from tunekit.config import config_from_dict
from tunekit.data.example import Example, Message
from tunekit.data.problems import Problem
from tunekit.data.readers import iter_jsonl_records, read_records
from tunekit.data.stream import (
    TokenStore,
    build_token_store,
    check_stream,
    hash_split,
    iter_examples,
    write_stream_splits,
)
from tunekit.data.tokenize import tokenize_example
from tunekit.errors import ConfigError, DataError, Interrupted
from tunekit.runs.directory import read_metrics
from tunekit.train.session import train


def _qa(i: int, answer: str | None = None) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"What is the code for item {i}?"},
            {"role": "assistant", "content": answer or f"CODE-{i % 4}"},
        ]
    }


def _cfg(model_dir, train_file, out, streaming=True, data=None, **train_kw):
    t = {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "max_length": 64, "save_steps": 3}
    return config_from_dict(
        {
            "model": str(model_dir),
            "data": {"train": str(train_file), "streaming": streaming} | (data or {}),
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
            "train": t | train_kw,
            "output_dir": str(out),
        }
    )


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture
def held_out(tmp_path) -> dict:
    """Validation and test files of their own, so the train file is not split: both paths then
    train on exactly the train file's rows."""
    val = write(tmp_path, "val.jsonl", jsonl(*[_qa(i) for i in range(100, 104)]))
    test = write(tmp_path, "test.jsonl", jsonl(*[_qa(i) for i in range(200, 204)]))
    return {"validation": str(val), "test": str(test)}


def test_streaming_trains_exactly_as_the_normal_path(tiny_model_dir, chat_file, held_out, tmp_path):
    normal = train(_cfg(tiny_model_dir, chat_file, tmp_path / "normal", False, held_out), quiet=True)
    streamed = train(_cfg(tiny_model_dir, chat_file, tmp_path / "stream", True, held_out), quiet=True)
    a, b = _losses(normal), _losses(streamed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    # The run directory holds the same split files; the streamed one a token store, not a JSONL cache.
    for name in ("train", "validation", "test"):
        assert (normal / f"data/{name}.jsonl").read_text() == (streamed / f"data/{name}.jsonl").read_text()
    manifest = json.loads((streamed / "data/manifest.json").read_text())
    assert manifest["counts"] == {"train": 24, "validation": 4, "test": 4}
    assert "streaming" in manifest and len(manifest["rows"]) == 8  # the held-out rows only
    (store,) = (streamed / "cache").glob("train-*.tokens")
    assert len(TokenStore(store)) == 24
    summary = json.loads((streamed / "train_summary.json").read_text())
    assert summary["train_examples"] == 24


def test_the_hash_split_is_deterministic_follows_the_ratios_and_keeps_duplicates_together(tmp_path):
    rows = [_qa(i, f"answer {i}") for i in range(6000)] + [_qa(7, "answer 7")] * 5
    src = write(tmp_path, "big.jsonl", jsonl(*rows))
    ratios = (0.8, 0.15, 0.05)
    a = write_stream_splits(src, tmp_path / "a/train.jsonl", ratios, seed=3)
    b = write_stream_splits(src, tmp_path / "b/train.jsonl", ratios, seed=3)
    assert (tmp_path / "a/train.jsonl").read_bytes() == (tmp_path / "b/train.jsonl").read_bytes()
    assert [e.line for e in a.held["validation"]] == [e.line for e in b.held["validation"]]
    n = len(rows)
    counts = {"train": len(a.train), "validation": len(a.held["validation"]), "test": len(a.held["test"])}
    assert sum(counts.values()) == n
    for name, r in zip(("train", "validation", "test"), ratios, strict=True):
        # binomial sampling noise: 4 standard deviations
        assert abs(counts[name] - r * n) <= 4 * (n * r * (1 - r)) ** 0.5, (name, counts)
    # exact duplicates (rows 7 and the five copies) share one split; another seed, another split
    held_lines = {e.line for part in a.held.values() for e in part}
    copies = {8, 6001, 6002, 6003, 6004, 6005}
    assert copies <= held_lines or not copies & held_lines
    seeds = {
        tuple(
            hash_split(Example(messages=(Message("user", str(i)), Message("assistant", "x"))), ratios, s)
            for i in range(50)
        )
        for s in (1, 2)
    }
    assert len(seeds) == 2
    # given validation and test files (their ratio is 0): everything is train
    assert {hash_split(e, (1.0, 0.0, 0.0), 3) for e in a.held["validation"]} == {"train"}


def test_streamed_reader_matches_the_whole_file_reader(tmp_path):
    files = [
        b'{"a":1}\n\n{"b":2}\n',
        codecs.BOM_UTF8 + b'{"a":1}\r\n[1]\n{bad\n"str"\n  \n{"x":"\xff"}\n{"y":"\xe2\x80\xa8"}\n{"z":1}',
        b'\xff{"a":1}\n{"n": ' + b"1" * 5000 + b"}\n" + b"[" * 10000 + b"\n",
        b"",
    ]
    for k, content in enumerate(files):
        path = write(tmp_path, f"f{k}.jsonl", content)
        records, problems = read_records(path)
        items = list(iter_jsonl_records(path))
        assert [i for i in items if not isinstance(i, Problem)] == records
        assert [i for i in items if isinstance(i, Problem)] == problems


def test_a_bad_row_stops_the_run_with_its_file_and_line(tiny_model_dir, tmp_path, held_out):
    rows = jsonl(*[_qa(i) for i in range(3)]).splitlines(keepends=True)
    rows[1] = '{"messages": [{"role": "user", "content": "hi"}\n'  # line 2: invalid JSON
    rows.append(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")  # line 4
    rows += jsonl(*[_qa(i) for i in range(3, 12)]).splitlines(keepends=True)
    src = write(tmp_path, "train.jsonl", "".join(rows))
    cfg = _cfg(tiny_model_dir, src, tmp_path / "run", data=held_out, max_steps=2)
    with pytest.raises(DataError) as e:
        train(cfg, quiet=True)
    msg = str(e.value)
    assert f"{src}:2: invalid JSON" in msg and f"{src}:4: messages[0].role: unknown role 'robot'" in msg
    assert "2 of 21 rows have errors" in msg and "--allow-data-errors" in msg
    assert not (tmp_path / "run").exists()  # refused before the run directory was made

    report = check_stream(cfg)
    assert (report.rows, report.kept, report.rejected) == (21, 19, 2)
    run = train(cfg, quiet=True, allow_data_errors=True)
    assert json.loads((run / "data/manifest.json").read_text())["counts"]["train"] == 11


def test_the_streaming_check_counts_duplicates_and_leakage(tiny_model_dir, tmp_path, held_out):
    rows = [_qa(i) for i in range(10)] + [_qa(3), _qa(3), _qa(5)] + [_qa(100)]  # 100: in val.jsonl
    src = write(tmp_path, "train.jsonl", jsonl(*rows))
    report = check_stream(_cfg(tiny_model_dir, src, tmp_path / "run", data=held_out))
    assert (report.duplicate_groups, report.duplicate_rows) == (2, 5)
    assert report.leaked == 1
    assert report.rows == 14 + 8 and report.rejected == 0
    assert report.warnings["no_system"] == 22


def test_only_jsonl_and_only_sft_stream(tiny_model_dir, tmp_path):
    csv = write(tmp_path, "train.csv", "prompt,completion\na,b\n")
    with pytest.raises(ConfigError, match=r"data.streaming .* convert it to JSON Lines"):
        _cfg(tiny_model_dir, csv, tmp_path / "run")
    src = write(tmp_path, "train.jsonl", jsonl({"text": "a", "label": "x"}))
    cfg = _cfg(tiny_model_dir, src, tmp_path / "run")
    cfg.task = "classify"
    with pytest.raises(ConfigError, match="data.streaming: only task: sft"):
        train(cfg, quiet=True)


def test_the_token_store_round_trips_tokenize_example(tokenizer, tmp_path):
    examples = [
        Example(messages=(Message("user", "2+2?"), Message("assistant", "4"))),
        Example(
            messages=(
                Message("system", "Be brief."),
                Message("user", "Name a colour."),
                Message("assistant", "Red.", weight=0),
                Message("user", "Another?"),
                Message("assistant", "Blue, a colour of the sky and of the sea " * 6),
            )
        ),
        Example(messages=(Message("user", "long " * 80), Message("assistant", "cut off"))),  # no target left
        Example(messages=(Message("user", "héllo ✓"), Message("assistant", "wörld ✓"))),
    ]
    want = [tokenize_example(tokenizer, ex, 48) for ex in examples]
    stats = build_token_store(examples, lambda ex: tokenize_example(tokenizer, ex, 48), tmp_path / "s.tokens")
    assert (stats.examples, stats.empty, stats.truncated) == (3, 1, 2)
    store = TokenStore(tmp_path / "s.tokens")
    kept = [t for t in want if t.n_loss_tokens]
    assert len(store) == 3
    assert [store[i] for i in range(3)] == kept and list(store) == kept
    assert store[-1] == kept[-1]
    assert store.lengths.tolist() == [len(t.input_ids) for t in kept]
    with pytest.raises(IndexError):
        store[3]


def test_building_and_reading_the_store_holds_memory_flat(tmp_path):
    """200,000 rows through the streaming reader into a token store, in a fresh process: the peak
    RSS grows by a few MiB (one chunk), where the normal path's lists take about 1 GiB. Reading the
    store back maps file pages (RssFile, which the kernel can drop), not heap (RssAnon)."""
    n = 200_000
    src = tmp_path / "big.jsonl"
    with src.open("w") as f:
        for i in range(n):
            f.write(json.dumps(_qa(i, f"The code for item {i} is CODE-{i % 97}.")) + "\n")
    store = tmp_path / "big.tokens"
    script = textwrap.dedent(
        f"""
        import resource
        from pathlib import Path
        from tunekit.data.stream import TokenStore, build_token_store, iter_examples
        from tunekit.data.tokenize import TokenizedExample

        def tokenize(ex):  # a stand-in tokenizer (the real one costs ~1 ms a row): 1 token a byte
            prompt = list(ex.messages[0].content.encode())
            answer = list(ex.messages[1].content.encode())
            return TokenizedExample(prompt + answer, [-100] * len(prompt) + answer)

        def anon_kib():
            return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("RssAnon"))

        rows = iter_examples({str(src)!r})
        for _ in range(1000):  # warm up: imports, the first allocations
            next(rows)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        stats = build_token_store(rows, tokenize, Path({str(store)!r}))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tokens = TokenStore(Path({str(store)!r}))
        anon = anon_kib()
        total = sum(len(tokens[i].input_ids) for i in range(0, len(tokens), 7)) + int(tokens.lengths.sum())
        print(before, after, anon, anon_kib(), stats.examples, stats.tokens, len(tokens), total)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before, after, anon0, anon1, examples, tokens, stored, _ = map(int, out.split())
    assert examples == stored == n - 1000
    grew_mib = (after - before) / 1024  # ru_maxrss is in KiB on Linux
    print(f"{examples} rows, {tokens:,} tokens: peak RSS grew {grew_mib:.1f} MiB building the store")
    # A chunk is 1M tokens (4 MiB of ids, 4 of labels, and the arrays of a flush); the normal path's
    # examples and token lists take about 1 GiB for these rows (measured, not asserted here).
    assert grew_mib < 48, grew_mib
    assert (anon1 - anon0) / 1024 < 16, (anon0, anon1)  # reading: file pages, not heap


def test_a_streaming_run_resumes_with_the_same_losses(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    data = {"split": [0.75, 0.25, 0.0]}
    straight = train(
        _cfg(tiny_model_dir, chat_file, tmp_path / "straight", data=data, max_steps=8), quiet=True
    )

    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "stopped", data=data, max_steps=8)
    signal_on_call(monkeypatch, sft, "accumulate_gradients", 5)
    with pytest.raises(Interrupted):
        train(cfg, quiet=True)
    monkeypatch.undo()
    # The resumed run reads its own split files and reuses the token store: never the source again.
    chat_file.unlink()
    built = []
    monkeypatch.setattr(tokens, "build_token_store", lambda *a: built.append(a))
    resumed = train(cfg, quiet=True, resume=True)
    assert not built
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(6, 9):
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])
    assert (resumed / "adapter" / "adapter_model.safetensors").is_file()


def test_iter_examples_detects_the_format_and_checks_columns(tmp_path):
    src = write(tmp_path, "pc.jsonl", jsonl({"q": "2+2", "completion": "4"}, {"q": "3+3", "completion": "6"}))
    items = list(iter_examples(src, columns={"prompt": "q"}))
    assert [e.format for e in items] == ["prompt_completion"] * 2 and items[1].line == 2
    with pytest.raises(
        DataError, match="'nope' \\(for prompt\\) not found in the file; its keys are q, completion"
    ):
        list(iter_examples(src, columns={"prompt": "nope"}))


def test_the_readme_documents_streaming():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "data.streaming" in readme


def test_two_processes_share_the_store_and_train_as_one(tiny_model_dir, held_out, tmp_path):
    """`--nproc 2` (gloo): rank 0 builds the store, rank 1 maps it; 2 x batch 4 streamed trains what
    1 x batch 8 trains on the normal path."""
    import os

    rows = [_qa(i) for i in range(48)]
    src = write(tmp_path, "train.jsonl", jsonl(*rows))
    losses = {}
    for name, streaming, batch, nproc in (("one", False, 8, []), ("two", True, 4, ["--nproc", "2"])):
        cfg = {
            "model": str(tiny_model_dir),
            "data": {"train": str(src), "streaming": streaming} | held_out,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"batch_size": batch, "max_steps": 4, "learning_rate": 5e-3, "max_length": 64},
            "output_dir": str(tmp_path / name),
        }
        path = write(tmp_path, f"{name}.yaml", json.dumps(cfg))
        proc = subprocess.run(
            [sys.executable, "-m", "tunekit", "train", str(path), *nproc],
            capture_output=True,
            text=True,
            timeout=600,
            env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        )
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        losses[name] = _losses(tmp_path / name)
    assert sorted(losses["one"]) == sorted(losses["two"]) == [1, 2, 3, 4]
    for step, loss in losses["one"].items():
        assert abs(loss - losses["two"][step]) <= 1e-4 * abs(loss), (step, losses)
    assert len(list((tmp_path / "two" / "cache").glob("train-*.tokens"))) == 1
