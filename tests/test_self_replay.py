"""data.replay: self: the base model's own greedy answers to general prompts, cached and mixed into training."""

import json

import pytest

from conftest import jsonl, make_tiny_llama, write
from tunekit.config import config_from_dict
from tunekit.data.replay import general_prompts_path, read_prompts
from tunekit.errors import ConfigError, DataError
from tunekit.train import self_replay
from tunekit.train.self_replay import cache_path, pool_from_cache, self_replay_pool

PROMPTS = ["Name a color.", "Say hello.", "Count to three.", "Name a fruit."]


def self_cfg(model_dir, train_file, prompts_file, tmp_path, **replay):
    return config_from_dict(
        {
            "model": str(model_dir),
            "data": {
                "train": str(train_file),
                "replay": {"source": "self", "prompts": str(prompts_file), "max_new_tokens": 6} | replay,
            },
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 2, "batch_size": 4, "max_length": 64},
            "output_dir": str(tmp_path / "run"),
        }
    )


@pytest.fixture
def prompts_file(tmp_path):
    return write(tmp_path, "prompts.jsonl", jsonl(*({"prompt": p} for p in PROMPTS)))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_config_shapes():
    def replay(v):
        return config_from_dict({"data": {"train": "x.jsonl", "replay": v}}).data.replay

    assert replay("self").source == "self" and replay("self").ratio == 0.1
    got = replay({"source": "self", "ratio": 0.2})
    assert (got.source, got.ratio, got.path) == ("self", 0.2, None)
    assert replay("general.json").path.name == "general.json" and replay("general.json").source == "file"
    assert replay({"path": "general.json"}).source == "file"
    assert replay(False) is None and replay(None) is None and replay("off") is None


def test_config_errors():
    def problems(v):
        with pytest.raises(ConfigError) as e:
            config_from_dict({"data": {"train": "x.jsonl", "replay": v}})
        return str(e.value)

    assert "data.replay.ratio" in problems({"source": "self", "ratio": 1.5})
    assert "data.replay.ratio" in problems({"source": "self", "ratio": 0})
    assert "needs `path: FILE`" in problems({"ratio": 0.2})
    assert "path: not used with source: self" in problems({"source": "self", "path": "a.json"})
    assert "data.replay.source" in problems({"source": "slef"})


def test_self_on_a_task_that_does_not_train_on_generations_is_an_error():
    from tunekit.tasks import check_config

    for task in ("classify", "reward", "dpo"):
        cfg = config_from_dict({"task": task, "data": {"train": "x.jsonl", "replay": "self"}})
        assert any(p.startswith("data.replay: only task: sft") for p in check_config(cfg)), task
    assert not [
        p for p in check_config(config_from_dict({"data": {"train": "x", "replay": "self"}})) if "replay" in p
    ]


def test_the_shipped_prompts_are_general_and_not_the_probe(tmp_path):
    from tunekit.data.replay import read_prompts
    from tunekit.eval.probe import load_probe

    prompts = read_prompts(general_prompts_path())
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    probe = load_probe("builtin")
    questions = {q.lower() for q, _ in probe.open} | {q.lower() for q, _, _ in probe.multiple_choice}
    assert not [p for p in prompts if p.lower() in questions or any(q in p.lower() for q in questions)]


def test_bad_prompts_file_names_the_line(tmp_path):
    bad = write(tmp_path, "p.jsonl", jsonl({"prompt": "ok"}, {"text": "no prompt key"}))
    with pytest.raises(DataError, match=r"p.jsonl:2: expected"):
        read_prompts(bad)
    with pytest.raises(DataError, match="data.replay.prompts: no such file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_cache_is_built_once_and_holds_the_base_models_greedy_answers(
    tiny_model_dir, tokenizer, chat_file, prompts_file, tmp_path, home, monkeypatch
):
    from tunekit.data.example import Example, Message
    from tunekit.eval.generate import generate
    from tunekit.models import load_model

    cfg = self_cfg(tiny_model_dir, chat_file, prompts_file, tmp_path)
    calls = []
    real = self_replay.generate_answers
    monkeypatch.setattr(self_replay, "generate_answers", lambda *a: calls.append(1) or real(*a))
    _, path, seconds = self_replay_pool(cfg, tokenizer, tiny_model_dir)
    assert path.is_file() and path.parent == home / "replay" and seconds is not None and calls == [1]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS

    # The cached answers are what the base model answers with greedy decoding, asked directly.
    model = load_model(tiny_model_dir)
    asked = [Example(messages=(Message("user", p), Message("assistant", ""))) for p in PROMPTS]
    assert [r["answer"] for r in rows] == generate(model, tokenizer, asked, 6)
    # A random tiny model never says its end-of-turn token within 6 tokens: nothing is replayed.
    assert not any(r["finished"] for r in rows) and pool_from_cache(path) == []

    # A second run reads the cache: no generation.
    _, again, seconds = self_replay_pool(cfg, tokenizer, tiny_model_dir)
    assert again == path and seconds is None and calls == [1]


def test_cache_key_changes_with_model_template_prompts_and_settings(
    tiny_model_dir, tokenizer, tmp_path, home
):
    from tunekit.config import ReplayConfig
    from tunekit.models import load_tokenizer

    replay = ReplayConfig(source="self")
    base = cache_path(tiny_model_dir, tokenizer, PROMPTS, replay, quantized=False)
    assert base == cache_path(tiny_model_dir, tokenizer, PROMPTS, replay, quantized=False)
    other_model = make_tiny_llama(tmp_path / "other", tokenizer, seed=1)
    completion = load_tokenizer(tiny_model_dir, "completion")
    keys = {
        base,
        cache_path(other_model, tokenizer, PROMPTS, replay, quantized=False),
        cache_path(tiny_model_dir, completion, PROMPTS, replay, quantized=False),
        cache_path(tiny_model_dir, tokenizer, PROMPTS[:3], replay, quantized=False),
        cache_path(tiny_model_dir, tokenizer, PROMPTS, ReplayConfig(source="self", max_new_tokens=7), False),
        cache_path(tiny_model_dir, tokenizer, PROMPTS, replay, quantized=True),
    }
    assert len(keys) == 6
    # The same folder with rewritten weights is another model.
    weights = other_model / "model.safetensors"
    before = cache_path(other_model, tokenizer, PROMPTS, replay, quantized=False)
    weights.write_bytes(weights.read_bytes())
    import os

    os.utime(weights, ns=(1, 1))
    assert cache_path(other_model, tokenizer, PROMPTS, replay, quantized=False) != before


@pytest.mark.parametrize("method, data", [("lora", "chat"), ("full", "classification")])
def test_training_mixes_the_ratio_of_finished_answers_into_train_only(
    tiny_model_dir, tokenizer, chat_file, prompts_file, tmp_path, home, monkeypatch, method, data
):
    from tunekit.train.session import train

    if data == "classification":  # classification as generation: text -> label rows, task sft
        rows = [{"text": f"order {i} is about {w}", "label": w} for i, w in enumerate(["cats", "dogs"] * 12)]
        chat_file = write(tmp_path, "labels.jsonl", jsonl(*rows))
    cfg = self_cfg(tiny_model_dir, chat_file, prompts_file, tmp_path, ratio=0.5)
    cfg.method = method
    # A real model finishes most answers; the random tiny one never does, so the cache is written
    # here as a finished generation would leave it (one answer cut off, which must not be replayed).
    path = cache_path(tiny_model_dir, tokenizer, PROMPTS, cfg.data.replay, False)
    rows = [{"prompt": p, "answer": f"ANSWER {i}", "finished": i != 3} for i, p in enumerate(PROMPTS)]
    path.parent.mkdir(parents=True)
    write(path.parent, path.name, jsonl(*rows))
    monkeypatch.setattr(self_replay, "generate_answers", lambda *a: pytest.fail("the cache was not used"))

    run = train(cfg, quiet=True)
    summary = json.loads((run / "train_summary.json").read_text())
    n_train = summary["train_examples"]  # the task's own
    assert summary["replay_examples"] == round(0.5 * n_train)
    for split in ("train", "validation", "test"):
        assert "ANSWER" not in (run / "data" / f"{split}.jsonl").read_text()
    picked = self_replay.replay_for_training(cfg, tokenizer, tiny_model_dir, n_train, quiet=True)
    assert len(picked) == round(0.5 * n_train)
    assert {ex.target for ex in picked} <= {"ANSWER 0", "ANSWER 1", "ANSWER 2"}  # never the cut one


def test_a_damaged_cache_is_a_clear_error(tmp_path):
    bad = write(tmp_path, "cache.jsonl", jsonl({"prompt": "p", "answer": "a", "finished": True}) + "{oops\n")
    with pytest.raises(DataError, match=r"cache.jsonl:2: not a self-replay cache row"):
        pool_from_cache(bad)
