"""End to end on the real default model (SmolLM2-135M-Instruct). Minutes, so marked slow."""

import json

import pytest

from tunekit.config import config_from_dict
from tunekit.eval.evaluate import evaluate
from tunekit.quickstart import demo_data_path, quickstart
from tunekit.train.sft import train_sft

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
    run = train_sft(cfg, quiet=True)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 3
    report = evaluate(run, quiet=True)
    base, ft = report["contenders"]["base"], report["contenders"]["finetuned"]
    assert report["n_test"] == 16
    assert ft["test_loss"] < base["test_loss"] / 3
    assert base["exact_match"] <= 0.1  # the base cannot know the private taxonomy


def test_quickstart_end_to_end(tmp_path):
    report = quickstart(tmp_path / "quickstart")
    c = report["contenders"]
    assert report["task_metric"] == "exact_match" and report["n_test"] == 80
    assert c["base"]["exact_match"] <= 0.1
    # measured 0.9+ (README); a margin for float differences between CPUs
    assert c["finetuned"]["exact_match"] >= 0.85
    for name in ("report.md", "report.json", "adapter/adapter_model.safetensors", "metrics.jsonl"):
        assert (tmp_path / "quickstart" / name).is_file()
