"""Evaluation: metrics, and the report of a run on a tiny model."""

import json

import pytest

from tunekit.config import config_from_dict
from tunekit.errors import TunekitError
from tunekit.eval.evaluate import evaluate
from tunekit.eval.metrics import METRICS, exact_match_scores, macro_f1
from tunekit.train.session import train


def test_exact_match_ignores_whitespace_noise():
    assert exact_match_scores([" a  b\n", "c"], ["a b", "d"]) == [1.0, 0.0]
    assert exact_match_scores([], []) == []


def test_macro_f1_by_hand():
    # labels x: tp=1 fp=1 fn=1 -> f1 .5 ; y: tp=1 fp=0 fn=0 -> 1 ; z: tp=0 fp=1? no: pred z never gold
    preds, refs = ["x", "y", "x", "q"], ["x", "y", "q", "x"]
    # x: pred 2, gold 2, tp 1 -> p=.5 r=.5 f1=.5 ; y: 1,1,1 -> 1 ; q: pred 1, gold 1, tp 0 -> 0
    assert macro_f1(preds, refs) == pytest.approx((0.5 + 1 + 0) / 3)
    assert METRICS["accuracy"].fn(preds, refs) == [1.0, 1.0, 0.0, 0.0]


@pytest.fixture
def tiny_run(tiny_model_dir, chat_file, tmp_path):
    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train": str(chat_file)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": 15, "learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "seed": 0},
            "eval": {"max_new_tokens": 8, "probe": None},
            "output_dir": str(tmp_path / "run"),
        }
    )
    return train(cfg, quiet=True)


def test_report_compares_base_and_finetuned(tiny_run):
    report = evaluate(tiny_run, quiet=True)
    on_disk = json.loads((tiny_run / "report.json").read_text())
    assert on_disk["task_metric"] == "exact_match"
    assert on_disk["n_test"] == len((tiny_run / "data/test.jsonl").read_text().splitlines()) > 0
    base, ft = on_disk["contenders"]["base"], on_disk["contenders"]["finetuned"]
    for c in (base, ft):
        assert {"exact_match", "test_loss", "perplexity", "seconds_per_example"} <= set(c)
    # the adapter learned the toy task: its held-out loss is far below the random base's
    assert ft["test_loss"] < base["test_loss"] - 1.0
    md = (tiny_run / "report.md").read_text()
    assert "| exact_match |" in md and "Side by side" in md
    assert report["contenders"] == on_disk["contenders"]


def test_eval_on_another_file(tiny_run, tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"prompt": "What is the code for item 1?", "completion": "CODE-1"}) + "\n")
    report = evaluate(tiny_run, data=path, quiet=True)
    assert report["n_test"] == 1 and report["test_data"] == str(path)


def test_eval_needs_a_run_dir(tmp_path):
    with pytest.raises(TunekitError, match="not a tunekit run directory"):
        evaluate(tmp_path)


def test_quickstart_pipeline_on_tiny_model(tiny_model_dir, tmp_path):
    """The quickstart's own code path (train, eval, timings, table) with a tiny model swapped in."""
    from tunekit.demo.quickstart import quickstart

    overrides = [
        f"model={tiny_model_dir}",
        "train.max_steps=2",
        "eval.max_examples=3",
        "eval.max_new_tokens=3",
        "eval.probe=null",
    ]
    report = quickstart(tmp_path / "qs", overrides)
    on_disk = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert on_disk["n_test"] == 3 and set(on_disk["contenders"]) == {"base", "base_few_shot", "finetuned"}
    assert on_disk["stage_seconds"]["total"] > 0 and on_disk["train_tokens_per_s"] > 0
    assert report["stage_seconds"] == on_disk["stage_seconds"]
