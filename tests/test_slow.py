"""End to end on the real default model (SmolLM2-135M-Instruct). Minutes, so marked slow."""

import json

import pytest

from tunekit.config import config_from_dict
from tunekit.demo.quickstart import demo_data_path, quickstart, quickstart_config
from tunekit.eval.evaluate import evaluate
from tunekit.train.session import train

pytestmark = pytest.mark.slow


def test_short_real_finetune_beats_base_on_held_out_loss(tmp_path):
    cfg = config_from_dict(
        {
            "data": {"train": str(demo_data_path())},
            "lora": {"dropout": 0.0},
            "train": {"max_steps": 12, "learning_rate": 1e-3, "batch_size": 8, "max_length": 256},
            "eval": {"max_examples": 16},
            "output_dir": str(tmp_path / "run"),
        }
    )
    run = train(cfg, quiet=True)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 3
    report = evaluate(run, quiet=True)
    base, ft = report["contenders"]["base"], report["contenders"]["finetuned"]
    assert report["n_test"] == 16
    assert ft["test_loss"] < base["test_loss"] / 3
    assert base["exact_match"] <= 0.1  # the base cannot know the private taxonomy


def test_quickstart_end_to_end(tmp_path):
    """The quickstart pipeline (train, evaluate base zero-shot, base few-shot and fine-tuned, report),
    cut to 40 steps and 40 test rows so CI has time for it: the full 2-epoch recipe takes 24 minutes
    here and its 0.975 exact match is a benchmark figure that `make demo` reproduces (README,
    BENCHMARKS.md). Measured at these settings: fine-tuned exact match 0.325 [0.20, 0.48], field
    accuracy 0.75; base few-shot 0.00 and 0.16."""
    report = quickstart(tmp_path / "quickstart", ["train.max_steps=40", "eval.max_examples=40"])
    c = report["contenders"]
    assert report["task_metric"] == "exact_match" and report["n_test"] == 40
    assert set(c) == {"base", "base_few_shot", "finetuned"}
    assert c["base"]["exact_match"] <= 0.1 and c["base_few_shot"]["exact_match"] <= 0.1
    # margins below the measured figures, for float differences between CPUs
    assert c["finetuned"]["exact_match"] >= 0.15
    assert c["finetuned"]["field_accuracy"] >= 0.6 > c["base_few_shot"]["field_accuracy"] + 0.3
    assert c["finetuned"]["test_loss"] < c["base"]["test_loss"] / 10
    for name in ("report.md", "report.json", "adapter/adapter_model.safetensors", "metrics.jsonl"):
        assert (tmp_path / "quickstart" / name).is_file()
    assert set(report["stage_seconds"]) >= {"training", "evaluation (base + fine-tuned)", "total"}


def test_quickstart_recipe_is_the_measured_one():
    """The README's 0.975 was measured with exactly this recipe; a change to it must re-measure."""
    cfg = quickstart_config("unused")
    assert (cfg.method, cfg.train.epochs, cfg.train.learning_rate, cfg.train.batch_size) == (
        "lora",
        2,
        1e-3,
        8,
    )
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.train.max_steps) == (16, 32, 0.0, None)
