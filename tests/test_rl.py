"""The classic RLHF pipeline on a tiny random llama: sft -> reward -> RL (TRL GRPO) in one run dir."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tunekit.config import config_from_dict
from tunekit.errors import ConfigError, TunekitError
from tunekit.models import load_model
from tunekit.train.session import train
from tunekit.train.setup import load_trained


def _cfg(tiny_model_dir, pairs_file, out, **rl):
    return config_from_dict(
        {
            "model": str(tiny_model_dir),
            "task": "rl",
            "data": {"train": str(pairs_file), "split": [0.75, 0.125, 0.125]},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "rl": {"num_generations": 2, "max_new_tokens": 6, "max_prompts": 4} | rl,
            "train": {
                "max_steps": 2,
                "batch_size": 2,
                "learning_rate": 1e-2,
                "max_length": 64,
                "warmup_ratio": 0.0,
            },
            "eval": {"max_examples": 2, "max_new_tokens": 6},
            "output_dir": str(out),
        }
    )


def test_pipeline_runs_end_to_end_and_trains_only_the_policy_adapter(tiny_model_dir, pairs_file, tmp_path):
    run = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "run"), quiet=True)
    for name in ("stages/sft/adapter", "stages/reward/adapter", "adapter"):
        assert (run / name / "adapter_config.json").is_file(), name
    assert not (run / "adapter" / "ref").exists()  # TRL's reference copy is not saved with the policy

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all({"reward", "kl", "loss"} <= set(m) for m in metrics)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["task"] == "rl" and set(summary["stages"]) == {"sft", "reward", "rl"}
    assert summary["final_reward"] == metrics[-1]["reward"]

    # RL moved the SFT adapter it started from ...
    sft = load_file(run / "stages/sft/adapter/adapter_model.safetensors")
    rl = load_file(run / "adapter/adapter_model.safetensors")
    assert sft.keys() == rl.keys()
    assert any(not torch.equal(sft[k], rl[k]) for k in sft)
    # ... and the base under it is untouched.
    model, tok, _ = load_trained(run)
    ids = tok("What is the code for item 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad(), model.disable_adapter():
        ours = model(input_ids=ids).logits
        base = load_model(tiny_model_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, base)

    # Evaluation: the policy against the SFT policy, with the reward stage's win rate.
    from tunekit.eval.evaluate import evaluate

    report = evaluate(run, quiet=True)
    assert report["task_metric"] == "win_rate" and report["n_test"] == 2
    assert set(report["contenders"]) == {"reference", "policy"}
    # The win rate is the reward stage's verdict on each prompt's pair of answers (a tie: half a win).
    rows = json.loads((run / "predictions.json").read_text())
    wins = [
        (r["policy_score"] > r["reference_score"]) + 0.5 * (r["policy_score"] == r["reference_score"])
        for r in rows
    ]
    assert len(rows) == 2 and report["contenders"]["policy"]["win_rate"] == pytest.approx(sum(wins) / 2)
    for name in ("policy", "reference"):  # and its scores are the mean reward of each one's answers
        assert report["contenders"][name]["reward_score"] == pytest.approx(
            sum(r[f"{name}_score"] for r in rows) / 2
        )
    assert report["reference_model"] == str(run / "stages" / "sft")


def test_given_stages_must_be_runs_of_the_right_task(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "run", policy=str(tmp_path), reward_model=str(tmp_path))
    with pytest.raises(ConfigError, match="rl.policy: .* not a tunekit run directory"):
        train(cfg, quiet=True)


def test_prompts_too_long_for_max_length_are_left_out_and_counted(tiny_model_dir, pairs_file, tmp_path):
    """TRL does not truncate RL prompts, so long ones would run the machine out of memory."""
    from tunekit.data.example import Example, Message
    from tunekit.models import load_tokenizer
    from tunekit.train.recipes.rl import rl_prompts

    tok = load_tokenizer(tiny_model_dir)

    def pair(text):
        return Example(
            messages=(Message("user", text), Message("assistant", "a")), rejected=(Message("assistant", "b"),)
        )

    examples = [pair("short one"), pair("word " * 400), pair("short two"), pair("short one")]
    prompts, too_long = rl_prompts(examples, None, tok, max_prompt_tokens=40)
    assert [p[0]["content"] for p in prompts] == ["short one", "short two"] and too_long == 1
    assert rl_prompts(examples, 1, tok, 40) == ([[{"role": "user", "content": "short one"}]], 0)
    with pytest.raises(TunekitError, match="all 1 are longer than 5 tokens.*raise train.max_length"):
        rl_prompts(examples[1:2], None, tok, max_prompt_tokens=5)


def test_completion_budget_must_leave_room_for_the_prompt(tiny_model_dir, pairs_file, tmp_path):
    # rl's own config rule (its TASK's check_config), applied before the run starts.
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "run", max_new_tokens=64)
    with pytest.raises(ConfigError, match="rl.max_new_tokens: 64 leaves no room .* train.max_length: 64"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()
    from tunekit.estimate.training import estimate_report

    with pytest.raises(ConfigError, match="rl.max_new_tokens"):
        estimate_report(cfg, measure=False)
