"""`tunekit eval` for preference runs: report.json, report.md and predictions.json, with the
documented keys, for a dpo run (with and without a reward model) and a reward run."""

import json

import pytest

from tunekit.config import config_from_dict
from tunekit.eval.evaluate import evaluate
from tunekit.train.session import train


def _run(task, tiny_model_dir, pairs_file, out):
    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "task": task,
            "data": {"train": str(pairs_file), "split": [0.5, 0.25, 0.25]},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "max_length": 64},
            "eval": {"max_new_tokens": 4},
            "output_dir": str(out),
        }
    )
    return train(cfg, quiet=True)


def test_dpo_and_reward_reports(tiny_model_dir, pairs_file, tmp_path):
    dpo = _run("dpo", tiny_model_dir, pairs_file, tmp_path / "dpo")
    report = evaluate(dpo, quiet=True)  # dispatches by the task table to evaluate_dpo
    assert report["task_metric"] == "preference_accuracy" and report["n_test"] == 4
    assert set(report["contenders"]) == {"reference", "policy"}
    policy = report["contenders"]["policy"]
    assert {"preference_accuracy", "reward_margin", "logp_chosen", "logp_rejected"} <= set(policy)
    assert report["reward_model"] is None and "win rate was not measured" in report["win_rate_note"]
    assert "win_rate" not in policy
    on_disk = json.loads((dpo / "report.json").read_text())
    assert on_disk["contenders"] == report["contenders"]
    assert len(json.loads((dpo / "predictions.json").read_text())) == 4
    assert "preference_accuracy" in (dpo / "report.md").read_text()

    reward = _run("reward", tiny_model_dir, pairs_file, tmp_path / "reward")
    r = evaluate(reward, quiet=True)
    assert r["task_metric"] == "accuracy" and set(r["contenders"]) == {"reward_model"}
    assert {"accuracy", "mean_margin"} == set(r["contenders"]["reward_model"])
    preds = json.loads((reward / "predictions.json").read_text())
    assert r["contenders"]["reward_model"]["accuracy"] == sum(p["correct"] for p in preds) / len(preds)

    # With a reward model, the dpo policy's greedy answers are scored against the base's.
    report = evaluate(dpo, quiet=True, reward_model=reward)
    policy, ref = report["contenders"]["policy"], report["contenders"]["reference"]
    rows = json.loads((dpo / "predictions.json").read_text())
    assert len(rows) == 4
    assert {"policy_answer", "reference_answer", "policy_score", "reference_score"} <= set(rows[0])
    # The win rate is the reward model's verdict, prompt by prompt (a tie is half a win).
    wins = [
        (r["policy_score"] > r["reference_score"]) + 0.5 * (r["policy_score"] == r["reference_score"])
        for r in rows
    ]
    assert policy["win_rate"] == pytest.approx(sum(wins) / 4) and ref["win_rate"] == pytest.approx(
        1 - sum(wins) / 4
    )
    assert policy["reward_score"] == pytest.approx(sum(r["policy_score"] for r in rows) / 4)
    assert ref["reward_score"] == pytest.approx(sum(r["reference_score"] for r in rows) / 4)
    assert "## Side by side" in (dpo / "report.md").read_text()
