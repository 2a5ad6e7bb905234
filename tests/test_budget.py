"""train.time_budget: the accepted forms, the plan (from given step times, so no test depends on this
machine's speed), and runs that keep the plan, end the schedule at its last step and stop at the deadline."""

import json

import pytest

from tunekit.config import config_from_dict, parse_duration
from tunekit.errors import ConfigError
from tunekit.train import loop
from tunekit.train.budget import EVAL_SHARE, format_duration, passes, plan_budget
from tunekit.train.loop import lr_at
from tunekit.train.session import train

_BASE = {"data": {"train": "x.jsonl"}}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60m", 3600), ("2h", 7200), ("90s", 90), ("1h30m", 5400), ("1h 30m", 5400), ("1.5h", 5400), ("45", 45)],
)
def test_budget_forms(text, seconds):
    assert parse_duration(text) == seconds
    cfg = config_from_dict(_BASE | {"train": {"time_budget": text}})
    assert cfg.train.time_budget == seconds
    assert config_from_dict(_BASE | {"train": {"time_budget": seconds}}).train.time_budget == seconds


@pytest.mark.parametrize("bad", ["soon", "10x", "", "0m", "m", "1..5h", 0, -3, True])
def test_a_bad_budget_names_the_key_and_the_forms(bad):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_BASE | {"train": {"time_budget": bad}})
    (problem,) = e.value.problems
    assert problem.startswith("train.time_budget:"), problem
    if bad is not True:
        assert "90s, 60m, 2h, 1h30m" in problem, problem


def test_cli_time_budget_becomes_the_config_key(tmp_path, monkeypatch):
    """`tunekit train CONFIG --time-budget 1h30m` is train.time_budget: 5400 (and an empty one is an error)."""
    from typer.testing import CliRunner

    from tunekit import cli
    from tunekit.train import session

    seen = []
    monkeypatch.setattr(session, "train", lambda cfg, **kw: seen.append(cfg))
    config = tmp_path / "c.yaml"
    config.write_text("data: {train: x.jsonl}\n")
    r = CliRunner().invoke(cli.app, ["train", str(config), "--time-budget", "1h30m"])
    assert r.exit_code == 0, r.output
    assert seen[0].train.time_budget == 5400
    r = CliRunner().invoke(cli.app, ["train", str(config), "--time-budget", ""])
    assert isinstance(r.exception, ConfigError) and "train.time_budget" in str(r.exception)


def test_format_duration_round_trips():
    for seconds in (45, 90, 3600, 5400, 7200, 3661):
        assert parse_duration(format_duration(seconds)) == seconds


def _plan(step_s, budget_s=600.0, val_s=None, config_steps=1000, **kw):
    kw = {"elapsed_s": 0.0, "done_steps": 5, "steps_per_epoch": 100, "base_eval_every": 100} | kw
    return plan_budget(budget_s, step_s=step_s, val_s=val_s, config_steps=config_steps, **kw)


def test_slow_steps_get_fewer_steps():
    fast, slow = _plan(0.1), _plan(2.0)
    assert fast.total_steps == 1000 and not fast.cut  # the config's plan fits: the budget never adds steps
    assert slow.total_steps < fast.total_steps and slow.cut
    # The 5 steps done are in elapsed_s (0 here); the rest fill the budget less the margin, no more.
    assert 600 * 0.97 - 2.0 < (slow.total_steps - 5) * 2.0 <= 600 * 0.97
    assert "do not fit" in slow.line() and "fit" in fast.line()


def test_spent_time_and_checkpoints_count():
    assert _plan(1.0, elapsed_s=300).total_steps < _plan(1.0).total_steps
    with_ckpt = _plan(1.0, ckpt_s=20.0, save_every=100)
    assert with_ckpt.total_steps < _plan(1.0).total_steps
    cost = (with_ckpt.total_steps - 5) * 1.0 + passes(4, with_ckpt.total_steps, 100) * 20.0
    assert cost <= 600 * 0.97


def test_validation_takes_a_bounded_share_on_the_config_grid():
    # 1 s a step, 10 s a validation pass: every epoch (100 steps) would be 10 passes in 1000 steps,
    # 100 s, a sixth of the budget; the cadence doubles to every 200 steps instead.
    plan = _plan(0.45, val_s=10.0)
    assert plan.eval_every % 100 == 0 and plan.eval_every > 100
    assert passes(0, plan.total_steps, plan.eval_every) * 10.0 <= EVAL_SHARE * 600
    assert plan.total_steps * 0.45 + passes(4, plan.total_steps, plan.eval_every) * 10.0 <= 600 * 0.97
    assert _plan(0.45, val_s=0.5).eval_every == 100  # cheap passes keep the config's cadence


def test_less_than_an_epoch_says_so():
    plan = _plan(10.0, budget_s=300, steps_per_epoch=400)
    assert plan.total_steps < 400
    assert "not even one epoch (400 steps)" in plan.line()
    assert _plan(1000.0, budget_s=10).total_steps == 5  # never fewer than the steps already done


def _cfg(tiny_model_dir, chat_file, tmp_path, **train):
    t = {"epochs": 3, "learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "seed": 0} | train
    return config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train": str(chat_file)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": t,
            "output_dir": str(tmp_path / "run"),
        }
    )


def test_a_budgeted_run_keeps_its_plan_and_ends_the_schedule_at_its_last_step(
    tiny_model_dir, chat_file, tmp_path, monkeypatch
):
    """The plan is made from fixed step and validation times (10 s and 5 s, not this machine's), so
    the run is deterministic: 19 examples in batches of 4 are 5 steps an epoch, 15 planned. After 5
    steps, 100 s less the margin leave room for 9 more steps with no validation; two passes (a tenth
    of the budget) is a cadence of 10 steps, and 8 more steps plus passes at 10 and 13 fit."""
    real = loop.plan_budget

    def fixed(budget_s, elapsed_s, done_steps, step_s, val_s, *args, **kw):
        return real(budget_s, 0.0, done_steps, 10.0, 5.0, *args, **kw | {"ckpt_s": 0.0})

    monkeypatch.setattr(loop, "plan_budget", fixed)
    run = train(_cfg(tiny_model_dir, chat_file, tmp_path, time_budget="100s"), quiet=True)
    summary = json.loads((run / "train_summary.json").read_text())
    budget = summary["time_budget"]
    assert summary["steps"] == budget["total_steps"] == 13
    assert budget["config_steps"] == 15 and budget["cut_by_budget"] and not budget["ended_training"]
    assert budget["step_s"] == 10.0 and budget["eval_every"] == 10 and budget["budget_s"] == 100
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [10, 13]
    lrs = {m["step"]: m["learning_rate"] for m in metrics if "learning_rate" in m}
    # The schedule was rebuilt on 13 steps: the last step is at the end of the cosine, not mid-way.
    assert lrs[13] == pytest.approx(lr_at(12, 13, 0, 1e-2, "cosine"))
    assert lrs[13] < 0.05 * 1e-2 < lr_at(12, 15, 0, 1e-2, "cosine")
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_the_deadline_stops_the_run_with_a_checkpoint(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    """A plan far too hopeful (a microsecond a step) in a budget shorter than one real step: the
    deadline check after the first step stops the run, saved and summarised."""
    real = loop.plan_budget
    monkeypatch.setattr(
        loop, "plan_budget", lambda b, e, d, s, v, *a, **kw: real(b, 0.0, d, 1e-6, None, *a, **kw)
    )
    run = train(_cfg(tiny_model_dir, chat_file, tmp_path, time_budget=0.001), quiet=True)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 1 and summary["time_budget"]["ended_training"] is True
    assert (run / "checkpoints" / "step-000001").is_dir()
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_rl_refuses_a_budget_naming_the_key(tmp_path):
    cfg = config_from_dict(
        {
            "task": "rl",
            "data": {"train": "x.jsonl"},
            "train": {"time_budget": "1h"},
            "output_dir": str(tmp_path),
        }
    )
    with pytest.raises(ConfigError) as e:
        train(cfg, quiet=True)
    assert any(p.startswith("train.time_budget: task: rl") for p in e.value.problems), e.value.problems


def test_a_resumed_budgeted_run_keeps_its_plan(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    """SIGTERM at step 8, after the plan was made at step 5: the resumed run ends at the plan's step 13,
    validating on the plan's cadence, with the schedule of 13 steps (not the config's 15)."""
    import signal

    from conftest import signal_on_call
    from tunekit.errors import Interrupted
    from tunekit.train.recipes import sft

    real = loop.plan_budget
    monkeypatch.setattr(
        loop,
        "plan_budget",
        lambda b, e, d, s, v, *a, **kw: real(b, 0.0, d, 10.0, 5.0, *a, **kw | {"ckpt_s": 0.0}),
    )
    cfg = _cfg(tiny_model_dir, chat_file, tmp_path, time_budget="100s")
    with pytest.MonkeyPatch.context() as mp:
        signal_on_call(mp, sft, "accumulate_gradients", 8, signal.SIGTERM)
        with pytest.raises(Interrupted):
            train(cfg, quiet=True)
    run = train(cfg, quiet=True, resume=True)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == summary["time_budget"]["total_steps"] == 13
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [10, 13]
    lrs = {m["step"]: m["learning_rate"] for m in metrics if "learning_rate" in m}
    assert lrs[13] == pytest.approx(lr_at(12, 13, 0, 1e-2, "cosine"))


def test_slow_steps_are_planned_before_the_usual_five():
    from tunekit.train.budget import BudgetClock

    slow = BudgetClock(100.0, spent_s=9.0)  # one step has taken 9% of the budget
    slow.timed_step(9.0)
    assert slow.wants_plan(1, 240)
    fast = BudgetClock(3600.0)
    fast.timed_step(0.5)
    assert not fast.wants_plan(1, 240) and fast.wants_plan(240, 240)


def test_a_budget_shorter_than_a_step_plans_what_fits(tiny_model_dir, chat_file, tmp_path):
    """The first step alone takes longer than the budget: the plan (made at once) is that one step."""
    run = train(_cfg(tiny_model_dir, chat_file, tmp_path, time_budget=0.001), quiet=True)
    budget = json.loads((run / "train_summary.json").read_text())["time_budget"]
    assert budget["total_steps"] == budget["measured_at"] == 1 and budget["cut_by_budget"]
    assert (run / "adapter" / "adapter_config.json").is_file()
