"""The classic RLHF pipeline on a tiny random llama: sft -> reward -> RL (TRL GRPO) in one run dir."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunekit.config import config_from_dict, load_config
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
    assert [p["prompt"][0]["content"] for p in prompts] == ["short one", "short two"] and too_long == 1
    assert rl_prompts(examples, 1, tok, 40) == ([{"prompt": [{"role": "user", "content": "short one"}]}], 0)
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


# ---------------------------------------------------------------------------------------------
# rl.graders: RL against programmable graders, no reward model (train/graders.py)

FLAKY_GRADER = '''
import time

def grade(completion, reference):
    """1 for every completion, but a bug on camera tickets, NaN on router ones and a hang on api ones."""
    if '"camera"' in reference:
        raise RuntimeError("boom")
    if '"router"' in reference:
        return float("nan")
    if '"api"' in reference:
        time.sleep(30)
    return 1.0
'''
ROOT = Path(__file__).resolve().parents[1]
TICKET = json.dumps({"intent": "account.login", "priority": "P1", "product": "web_portal"})


def test_example_rl_graders_trains_on_a_tiny_model_and_reports_failing_graders(
    tiny_model_dir, tmp_path, monkeypatch
):
    """examples/rl_graders.yaml (the demo tickets, JSON field accuracy + schema validity), cut to two
    steps on a tiny random model, plus a string similarity (so completions of one prompt score apart
    and GRPO has something to learn from) and a python grader that raises, returns NaN or hangs."""
    (tmp_path / "flaky_grader.py").write_text(FLAKY_GRADER)
    raw = load_config(ROOT / "examples" / "rl_graders.yaml").model_dump(mode="json", exclude_defaults=True)
    raw["data"]["train"] = str(ROOT / raw["data"]["train"])
    raw["rl"]["graders"] += [
        {"type": "similarity", "weight": 0.5},
        {"type": "python", "function": "flaky_grader:grade", "name": "flaky"},
    ]
    raw["rl"] |= {"num_generations": 2, "max_new_tokens": 8, "max_prompts": 8, "grader_timeout": 0.3}
    raw |= {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "run")}
    raw["train"] |= {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "max_length": 160}
    raw["eval"] = {"max_examples": 4, "max_new_tokens": 8}
    monkeypatch.chdir(tmp_path)  # a python grader's module is imported from the current folder
    run = train(config_from_dict(raw), quiet=True)
    assert (run / "stages/sft/adapter/adapter_config.json").is_file()
    assert not (run / "stages" / "reward").exists()  # no reward model is trained

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    names = ["json_fields", "json_valid", "similarity", "flaky"]
    for m in metrics:
        assert {
            "reward",
            "frac_reward_zero_std",
            "grader_failure_rate",
            *(f"graders/{n}" for n in names),
        } <= set(m)
        assert 0 <= m["reward"] <= 1
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["graders"] == names and summary["reward_model"] is None
    failures = summary["grader_failures"]
    assert failures["calls"] == 2 * 2 * 2 * 4  # 2 steps x 2 prompts x 2 completions, 4 graders each
    assert failures["failed"] == failures["by_grader"]["flaky"] > 0  # only the flaky grader failed
    errors = {e["error"].split(":")[0] for e in failures["examples"]}
    assert errors <= {
        "RuntimeError",
        "returned nan, not a finite number",
        "ran past the 0.3 s limit (rl.grader_timeout)",
    }
    train_rows = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    for e in failures["examples"]:  # each failure names its example: the index in the train split, file:line
        assert e["grader"] == "flaky" and e["where"].startswith(raw["data"]["train"] + ":")
        reference = json.loads(train_rows[e["index"]]["messages"][-1]["content"])
        assert reference["product"] in ("camera", "router", "api")

    # RL moved the SFT adapter it started from.
    sft = load_file(run / "stages/sft/adapter/adapter_model.safetensors")
    rl = load_file(run / "adapter/adapter_model.safetensors")
    assert any(not torch.equal(sft[k], rl[k]) for k in sft)

    from tunekit.eval.evaluate import evaluate

    report = evaluate(run, quiet=True)
    assert report["task_metric"] == "grader_score" and report["n_test"] == 4
    assert set(report["contenders"]) == {"start", "policy"}
    rows = json.loads((run / "predictions.json").read_text())
    for name in ("start", "policy"):  # the task metric is the mean of the rows' combined scores
        mean = sum(r[f"{name}_score"] for r in rows) / 4
        assert report["contenders"][name]["grader_score"] == pytest.approx(mean)
    diff = report["contenders"]["policy"]["grader_score"] - report["contenders"]["start"]["grader_score"]
    assert report["paired"]["difference"] == pytest.approx(diff)
    assert 0 <= report["paired"]["p_value"] <= 1
    # Another file, as `tunekit eval RUN --data FILE`; a reward model has nothing to score here.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"prompt": "Ticket: login fails.", "chosen": TICKET, "rejected": "no"}) + "\n"
    )
    other = evaluate(run, data=pairs, quiet=True)
    assert other["n_test"] == 1 and other["test_data"] == str(pairs)
    assert json.loads((run / "predictions.json").read_text())[0]["reference"] == TICKET  # the chosen answer
    with pytest.raises(TunekitError, match="--reward-model: .* was trained against rl.graders"):
        evaluate(run, reward_model=str(tmp_path), quiet=True)


def test_graded_rl_reads_pairs_too_and_scores_against_the_chosen_answer(pairs_file, chat_file):
    from tunekit.data import load_examples
    from tunekit.train.recipes.rl import rl_prompts

    rows, _ = rl_prompts(load_examples(pairs_file), 2, references=True)
    assert rows[0] == {
        "prompt": [{"role": "user", "content": "What is the code for item 0?"}],
        "reference": "CODE-0", "index": 0, "where": f"{pairs_file}:1",
    }  # fmt: skip
    rows, _ = rl_prompts(load_examples(chat_file), None, references=True)
    assert len(rows) == 24 and rows[5]["reference"] == "CODE-1" and rows[5]["index"] == 5
    from tunekit.data.example import Example

    question = Example(messages=load_examples(chat_file)[0].prompt, source=str(chat_file), line=1)
    with pytest.raises(TunekitError, match="chat.jsonl:1: the row does not end with an assistant answer"):
        rl_prompts([question], None, references=True)


def test_conversation_rows_without_graders_are_refused_before_any_stage(tiny_model_dir, chat_file, tmp_path):
    from tunekit.errors import DataError

    with pytest.raises(DataError, match="no rejected answer"):
        train(_cfg(tiny_model_dir, chat_file, tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run" / "stages").exists()


def test_grader_config_errors_name_the_key(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"rl.graders.0: pattern: required by a type: regex grader"):
        _cfg(tiny_model_dir, chat_file, tmp_path / "run", graders=[{"type": "regex"}])
    with pytest.raises(ConfigError, match="rl.reward_model: not used with rl.graders"):
        _cfg(
            tiny_model_dir,
            chat_file,
            tmp_path / "run",
            graders=[{"type": "exact"}],
            reward_model=str(tmp_path),
        )
    # Found only when the run starts (a file, an import): still before anything is written.
    missing = [
        {"type": "json_valid", "json_schema": "nope.json"},
        {"type": "python", "function": "nomod:grade"},
    ]
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path / "run", graders=missing)
    with pytest.raises(ConfigError) as e:
        train(cfg, quiet=True)
    assert "rl.graders.0.json_schema: cannot read nope.json" in str(e.value)
    assert not (tmp_path / "run").exists()
