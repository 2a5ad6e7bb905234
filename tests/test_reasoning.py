"""Reasoning traces: `reasoning_content` and `<think>` blocks read into one Example; `data.reasoning`
trains on the thinking, masks it out of the loss, or drops it; evaluation scores the answer after it."""

import json

import pytest

from conftest import jsonl, write
from tunekit.config import config_from_dict
from tunekit.data import load_examples, read_examples
from tunekit.data.reasoning import apply_reasoning, strip_thinking
from tunekit.data.tokenize import IGNORE_INDEX, render_prompt, tokenize_example
from tunekit.errors import ConfigError
from tunekit.eval.metrics import score_metrics
from tunekit.models import load_tokenizer

THINK = "2 and 2 make 4."


def row(assistant: dict) -> dict:
    return {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant"} | assistant]}


def test_reasoning_content_and_a_think_block_are_the_same_turn(tmp_path):
    rows = [
        row({"content": f"<think>\n{THINK}\n</think>\n\n4"}),
        row({"reasoning_content": THINK, "content": "4"}),
        row({"content": f"{THINK}</think>4"}),  # the template's prompt opened the block (DeepSeek-R1)
        {
            "conversations": [
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": f"<think>{THINK}</think>4"},
            ]
        },
    ]
    examples = [load_examples(write(tmp_path, f"{i}.jsonl", jsonl(r)))[0] for i, r in enumerate(rows)]
    assert {(e.messages[-1].reasoning, e.messages[-1].content) for e in examples} == {(THINK, "4")}
    assert {e.target for e in examples} == {"4"}  # the answer, without its thinking
    # The canonical form keeps it: a run directory's split reads back the same turn.
    again = load_examples(write(tmp_path, "c.jsonl", jsonl(examples[0].to_dict())), format="chat")[0]
    assert again.messages == examples[0].messages


@pytest.mark.parametrize(
    ("assistant", "kind", "field"),
    [
        ({"reasoning_content": THINK, "content": f"<think>{THINK}</think>4"}, "duplicate_reasoning", "messages[1].reasoning_content"),
        ({"content": f"<think>{THINK} 4"}, "unclosed_thinking", "messages[1].content"),
        ({"content": f"<think>{THINK}</think>"}, "empty_content", "messages[1].content"),
    ],
)  # fmt: skip
def test_bad_reasoning_is_an_error_naming_the_field(tmp_path, assistant, kind, field):
    path = write(tmp_path, "x.jsonl", jsonl(row({"content": "4"}), row(assistant)))
    _, problems = read_examples(path)
    assert [(p.line, p.kind, p.field) for p in problems] == [(2, kind, field)]


def loss_text(tok, t) -> str:
    return tok.decode([i for i, label in zip(t.input_ids, t.labels, strict=True) if label != IGNORE_INDEX])


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    path = write(
        tmp_path_factory.mktemp("r"), "x.jsonl", jsonl(row({"reasoning_content": THINK, "content": "4"}))
    )
    return load_examples(path)


@pytest.mark.parametrize("template", [None, "qwen", "llama3"])
def test_the_three_modes_set_what_carries_loss(thinking, default_model_dir, template):
    tok = load_tokenizer(default_model_dir, template)
    eot = {None: "<|im_end|>\n", "qwen": "<|im_end|>", "llama3": "<|eot_id|>"}[template]
    trained = tokenize_example(tok, apply_reasoning(thinking, "train")[0], 256)
    assert loss_text(tok, trained) == f"<think>\n{THINK}\n</think>\n\n4{eot}"
    masked = tokenize_example(tok, apply_reasoning(thinking, "mask")[0], 256)
    assert masked.input_ids == trained.input_ids  # the thinking stays in the context ...
    assert loss_text(tok, masked) == f"4{eot}"  # ... but only the answer carries loss
    dropped = tokenize_example(tok, apply_reasoning(thinking, "drop")[0], 256)
    assert THINK not in tok.decode(dropped.input_ids) and loss_text(tok, dropped) == f"4{eot}"
    # Inference prompts are the same whatever the mode: the reasoning belongs to the answer.
    assert render_prompt(tok, thinking[0]) == render_prompt(tok, apply_reasoning(thinking, "drop")[0])


def test_the_config_key_defaults_to_train_and_names_itself_when_wrong(tmp_path):
    base = {"model": "m", "data": {"train": str(tmp_path / "t.jsonl")}}
    assert config_from_dict(base).data.reasoning == "train"
    assert config_from_dict(base | {"data": base["data"] | {"reasoning": "mask"}}).data.reasoning == "mask"
    with pytest.raises(ConfigError) as e:
        config_from_dict(base | {"data": base["data"] | {"reasoning": "hide"}})
    assert "data.reasoning" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_from_dict(
            base | {"data": {"train": str(tmp_path / "t.jsonl"), "reasoning": "drop", "streaming": True}}
        )
    assert "data.reasoning" in str(e.value) and "data.streaming" in str(e.value)


@pytest.mark.parametrize("mode", ["train", "mask", "drop"])
def test_the_run_directory_keeps_the_mode_it_trains_with(tmp_path, mode):
    from tunekit.runs.directory import prepare_splits, read_split

    rows = [row({"reasoning_content": f"{i} and 1 make {i + 1}.", "content": str(i + 1)}) for i in range(10)]
    data = write(tmp_path, "r.jsonl", jsonl(*rows))
    cfg = config_from_dict({"model": "m", "data": {"train": str(data), "reasoning": mode}})
    (tmp_path / "run" / "data").mkdir(parents=True)
    splits = prepare_splits(cfg, tmp_path / "run")
    stored = read_split(tmp_path / "run", "train")
    assert [e.messages for e in stored] == [e.messages for e in splits["train"]]
    turns = [e.messages[-1] for e in stored]
    assert all(bool(m.reasoning) == (mode != "drop") for m in turns)
    assert all(m.reasoning_weight == (0 if mode == "mask" else 1) for m in turns)
    lines = (tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()
    assert ("reasoning_weight" in json.loads(lines[0])["messages"][-1]) == (mode == "mask")


def test_evaluation_scores_the_answer_after_the_thinking():
    preds = ["<think>\n2 and 2 make 4.\n</think>\n\n4", "<think>I am still thinking", "4", "</think> 5"]
    values, per = score_metrics(["exact_match"], preds, ["4"] * 4)
    assert per["exact_match"] == [1.0, 0.0, 1.0, 0.0]  # a reply cut off inside its thinking has no answer
    assert strip_thinking("<think>x</think>\n\nanswer") == "answer"
    assert strip_thinking("plain answer") == "plain answer"


def test_a_model_trained_to_think_is_scored_on_its_answer(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny model trained (data.reasoning: train) to think, then answer: the predictions hold the
    thinking, the metric scores the answer after it."""
    from test_serve import base_that_can_stop
    from tunekit.eval.evaluate import evaluate
    from tunekit.train.session import train

    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    rows = [row({"reasoning_content": "Easy.", "content": "FOUR"}) for _ in range(24)]
    for i, r in enumerate(rows):
        r["messages"][0]["content"] = f"question {i}?"
    config = {
        "model": str(base_that_can_stop(tiny_model_dir, tmp_path)),
        "data": {"train": str(write(tmp_path, "think.jsonl", jsonl(*rows))), "split": [0.75, 0.0, 0.25]},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 40, "learning_rate": 2e-2, "batch_size": 4, "max_length": 64, "seed": 0},
        "eval": {"probe": None, "few_shot": 0},
        "output_dir": str(tmp_path / "run"),
    }
    run = train(config_from_dict(config), quiet=True)
    report = evaluate(run, quiet=True)
    assert report["contenders"]["finetuned"]["exact_match"] == 1.0
    predictions = json.loads((run / "predictions.json").read_text())
    assert all(p["finetuned"].startswith("<think>") and p["reference"] == "FOUR" for p in predictions)
    assert all(p["finetuned_correct"] for p in predictions)
