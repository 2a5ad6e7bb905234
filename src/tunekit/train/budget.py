"""The time budget (`train.time_budget`): time the first steps, then plan the run to fit.

    steps 1..k        run as the config planned them, each one timed (k = MEASURE_STEPS, or fewer
                      when they take more than MEASURE_SHARE of the budget)
    after step k      a validation pass is timed on a sample; `plan_budget` picks the last step and
                      the validation cadence; the loop's learning-rate schedule is rebuilt on the new
                      last step, so cosine or linear decay still reaches its end there
    every step        the deadline is checked: past it, the loop saves a checkpoint and ends cleanly

The budget is a ceiling, never a target: the config's epochs (or max_steps) stay the most a run
trains. What the plan chose, and why, is one printed line and the `time_budget` record of
train_summary.json. `watch_validation` lets a caller see each validation as it happens
(`tunekit tune` reports them to its pruner).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass

MEASURE_STEPS = 5  # steps timed before planning; the first (allocations, kernel choice, caches) is left out
MEASURE_SHARE = 0.05  # ... or fewer, once timing them has taken this share of the budget (slow steps)
EVAL_SHARE = 0.10  # validation passes take at most this share of the budget (the last one always runs)
MARGIN = 0.03  # share of the budget kept free for step-time jitter
RECENT = 200  # measurements kept for the medians: recent ones, as the machine's load changes


def format_duration(seconds: float) -> str:
    """'1h30m', '60m', '90s': the shortest of the forms train.time_budget accepts."""
    s = round(seconds)
    if s < 120 and s % 60:
        return f"{s}s"
    h, m = divmod(s // 60, 60)
    rest = f"{s % 60}s" if s % 60 else ""
    return (f"{h}h" if h else "") + (f"{m}m" if m or not h else "") + rest


@dataclass
class BudgetPlan:
    """What the budget chose: the last step, the validation cadence, and the figures behind them."""

    budget_s: float
    step_s: float  # median seconds per optimizer step (steps 2..k)
    val_s: float  # seconds of one validation pass (0: the run has none)
    config_steps: int  # what the config alone planned
    total_steps: int  # the run's new last step
    steps_per_epoch: int
    eval_every: int | None  # None: no validation
    measured_at: int  # the step after which the plan was made

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    @property
    def cut(self) -> bool:
        """The budget, not the config, set the last step."""
        return self.total_steps < self.config_steps

    def line(self) -> str:
        """The one line a run prints: what was chosen, and why."""
        text = (
            f"time budget {format_duration(self.budget_s)}: {self.total_steps:,} step{'s' * (self.total_steps != 1)} "
            f"({self.epochs:.2f} epochs) at {self.step_s:.3g} s/step"
        )
        if self.eval_every is not None:
            text += f", validation every {self.eval_every:,} steps ({self.val_s:.3g} s each)"
        if not self.cut:
            return text + f"; the config's {self.config_steps:,} steps fit"
        text += f"; the config's {self.config_steps:,} steps do not fit"
        if self.total_steps < self.steps_per_epoch:
            text += f": not even one epoch ({self.steps_per_epoch:,} steps) does, so this trains what fits"
        return text

    def record(self) -> dict:
        """The plan as train_summary.json's `time_budget` holds it."""
        return asdict(self) | {"epochs": round(self.epochs, 4), "cut_by_budget": self.cut}


def passes(done: int, steps: int, every: int | None) -> int:
    """Validation passes (or checkpoints) still to come when a run at step `done` ends at `steps`,
    passing every `every` steps and at its last step."""
    if not every:
        return 0
    return steps // every - done // every + (1 if steps % every else 0)


def plan_budget(
    budget_s: float,
    elapsed_s: float,
    done_steps: int,
    step_s: float,
    val_s: float | None,
    config_steps: int,
    steps_per_epoch: int,
    base_eval_every: int,
    *,
    ckpt_s: float = 0.0,
    save_every: int | None = None,
    eval_every: int | None = None,
    pending: bool = True,
) -> BudgetPlan:
    """The last step and validation cadence that fit `budget_s` seconds, `elapsed_s` of which are spent
    (after `done_steps` steps): the most steps whose remaining steps, validation passes (`val_s`
    each; None: the run never validates) and checkpoints (`ckpt_s` each, every `save_every` steps)
    fit in what is left, less a MARGIN. Never more steps than the config planned, never fewer than done.

    The cadence (unless `eval_every` fixes it, as when re-planning) is `base_eval_every` (the
    config's eval_every, or one epoch) or a multiple of it, so that at most EVAL_SHARE of the budget
    goes to validation (the last step always validates); a multiple keeps the validation steps of
    runs with the same config on one grid, which is what `tunekit tune`'s pruner compares.
    `pending`: step `done_steps`'s own validation and checkpoint (if due) are still to run.
    """
    left = budget_s * (1 - MARGIN) - elapsed_s
    step_s = max(step_s, 1e-9)
    since = done_steps - 1 if pending else done_steps  # passes after this step are still to come

    def most_steps(every: int | None) -> int:
        """The largest last step whose remaining cost fits (the cost only grows with the steps)."""
        lo, hi = done_steps, max(done_steps, config_steps)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            cost = (mid - done_steps) * step_s + passes(since, mid, every) * (val_s or 0.0)
            cost += passes(since, mid, save_every) * ckpt_s
            lo, hi = (mid, hi) if cost <= left else (lo, mid - 1)
        return lo

    every = eval_every
    if val_s is not None and every is None:
        rough = max(1, most_steps(None))  # the steps with no validation at all: an upper bound
        most = max(1, math.floor(EVAL_SHARE * budget_s / val_s)) if val_s > 0 else rough
        every = base_eval_every * max(1, math.ceil(rough / (most * base_eval_every)))
    return BudgetPlan(
        budget_s=budget_s,
        step_s=step_s,
        val_s=val_s or 0.0,
        config_steps=config_steps,
        total_steps=max(most_steps(every if val_s is not None else None), 1),
        steps_per_epoch=steps_per_epoch,
        eval_every=every if val_s is not None else None,
        measured_at=done_steps,
    )


class BudgetClock:
    """The loop's side of the budget: the clock (started at the loop's first step; a resumed run carries
    on from the seconds its checkpoint spent), the measured times, the plan and the deadline."""

    def __init__(self, budget_s: float, spent_s: float = 0.0, plan: BudgetPlan | None = None):
        self.budget_s, self.spent_s, self.plan = budget_s, spent_s, plan
        self.step_times: deque[float] = deque(maxlen=RECENT)
        self.val_times: deque[float] = deque(maxlen=RECENT)
        self.ckpt_times: deque[float] = deque(maxlen=RECENT)
        self.n_steps, self.first_step = 0, 0.0  # steps timed by this process, and the first one's time
        self.val_estimate: float | None = None  # one validation pass, scaled up from a timed sample
        self.replans = 0  # times the plan was cut short after it was made
        self.ended_training = False  # the deadline, not the plan, ended the run
        self._t0 = time.perf_counter()

    def start(self) -> None:
        """Start the clock (at the loop's first step: loading the model and data are not counted)."""
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.spent_s + time.perf_counter() - self._t0

    def over(self) -> bool:
        return self.elapsed() >= self.budget_s

    def timed_step(self, seconds: float) -> None:
        """One optimizer step's seconds. The first this process runs pays for warm-up (allocations,
        kernel choice, caches): it counts only until others exist."""
        self.n_steps += 1
        if self.n_steps == 1:
            self.first_step = seconds
        else:
            self.step_times.append(seconds)

    def wants_plan(self, step: int, total_steps: int) -> bool:
        """Plan after MEASURE_STEPS steps, or sooner: at the config's last step, or once the steps timed
        have taken MEASURE_SHARE of the budget (steps so slow that waiting for more would spend it)."""
        slow = self.n_steps >= 1 and self.elapsed() >= MEASURE_SHARE * self.budget_s
        return self.plan is None and (self.n_steps >= MEASURE_STEPS or step >= total_steps or slow)

    def figures(self) -> tuple[float, float | None, float]:
        """(seconds a step, a validation pass, a checkpoint): medians of the recent measurements;
        a validation pass not yet timed in full is the sample's estimate, a checkpoint not yet timed 0."""
        val = statistics.median(self.val_times) if self.val_times else self.val_estimate
        ckpt = statistics.median(self.ckpt_times) if self.ckpt_times else 0.0
        return statistics.median(self.step_times or [self.first_step]), val, ckpt

    def record(self, train_seconds: float) -> dict:
        """train_summary.json's `time_budget`: the plan, the seconds the loop took, and who ended it."""
        plan = self.plan.record() if self.plan else {"budget_s": self.budget_s}
        return plan | {
            "spent_s": round(self.elapsed(), 3),
            "train_seconds": round(train_seconds, 3),
            "replans": self.replans,
            "ended_training": self.ended_training,
        }

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run keeps the plan and the clock."""
        return {"spent_s": self.elapsed(), "plan": asdict(self.plan) if self.plan else None}

    @classmethod
    def from_state(cls, budget_s: float, state: dict | None) -> BudgetClock:
        if not state:
            return cls(budget_s)
        plan = BudgetPlan(**state["plan"]) if state.get("plan") else None
        if plan is not None:
            plan.budget_s = budget_s
        return cls(budget_s, float(state.get("spent_s", 0.0)), plan)


def measure_validation(validate: Callable[[list], object], items: list) -> float:
    """Seconds one validation pass over `items` takes, timed on a spread sample and scaled up."""
    n = len(items)
    k = min(n, max(32, n // 20))
    sample = [items[round(i * (n - 1) / max(1, k - 1))] for i in range(k)] if k < n else items
    t0 = time.perf_counter()
    validate(sample)
    return (time.perf_counter() - t0) * n / max(1, len(sample))


# -- watching validations ---------------------------------------------------------------------------
# A callable (step, metrics) for each validation pass of the loop; it may raise to end the run
# (tunekit tune's pruner does). A ContextVar: only the code inside `watch_validation` is watched.
_WATCHERS: ContextVar[tuple[Callable[[int, dict], None], ...]] = ContextVar("validation_watchers", default=())


@contextmanager
def watch_validation(fn: Callable[[int, dict], None]) -> Iterator[None]:
    """Call `fn(step, metrics)` after each validation pass of the runs trained inside this block."""
    token = _WATCHERS.set((*_WATCHERS.get(), fn))
    try:
        yield
    finally:
        _WATCHERS.reset(token)


def notify_validation(step: int, metrics: dict) -> None:
    for fn in _WATCHERS.get():
        fn(step, metrics)
