"""`tunekit eval RUN_DIR` for task: rl runs. A run trained against a reward model is evaluated by
eval/preference.py (preference accuracy and win rate on the test pairs); a run trained against
`rl.graders` here: greedy answers of the RL policy and of the policy RL started from (stages/sft or
rl.policy), scored by the run's own graders against each test example's reference answer.

Writes report.json (`task_metric` grader_score, `contenders` start and policy, `paired`: policy -
start), report.md and predictions.json (each example's answers and scores).
"""

from __future__ import annotations

import time
from pathlib import Path

from tunekit.config import Config
from tunekit.console import err as console
from tunekit.data import load_examples
from tunekit.errors import TunekitError
from tunekit.eval.generate import generate
from tunekit.eval.preference import evaluate_rl
from tunekit.eval.report import comparison_table
from tunekit.eval.stats import mean_ci, paired_difference
from tunekit.io import atomic_write_json, atomic_write_text
from tunekit.runs.directory import load_run_config, read_split
from tunekit.train.recipes.rl import build_graders, require_answers, stage_dirs
from tunekit.train.setup import ADAPTER_DIR, load_trained


def evaluate_rl_run(run_dir: str | Path, data=None, quiet: bool = False, reward_model=None) -> dict:
    """`tunekit eval` of an rl run: with a reward model, eval/preference.py's (win rate, preference
    accuracy on the test pairs); with rl.graders, `evaluate_graded`."""
    cfg = load_run_config(Path(run_dir))
    if cfg.rl.graders is None:
        return evaluate_rl(run_dir, data, quiet=quiet, reward_model=reward_model)
    if reward_model is not None:
        raise TunekitError(
            f"--reward-model: {run_dir} was trained against rl.graders, which score it; drop it"
        )
    return evaluate_graded(Path(run_dir), cfg, data, quiet)


def evaluate_graded(run_dir: Path, cfg: Config, data=None, quiet: bool = False) -> dict:
    """The policy against the policy RL started from, on the test split (or `data`): greedy answers
    of each, scored by the run's graders against the references; the mean score with its 95%
    bootstrap CI, each grader's mean, and the paired difference (policy - start) with its CI and
    p-value (eval/stats.py: exact McNemar for 0/1 scores, else a sign-flip permutation test).
    Writes report.json (task_metric grader_score), report.md and predictions.json."""
    t0 = time.perf_counter()
    examples = (
        load_examples(data, format=cfg.data.format, columns=cfg.data.columns or None)
        if data is not None
        else read_split(run_dir, "test")
    )
    examples = examples[: cfg.eval.max_examples] if cfg.eval.max_examples else examples
    if not examples:
        raise TunekitError(f"{run_dir}: the test split is empty; pass --data FILE or set data.split")
    require_answers(examples)
    asks = examples
    scorer = build_graders(cfg)
    start, _ = stage_dirs(cfg, run_dir)
    max_new = cfg.eval.max_new_tokens or cfg.rl.max_new_tokens
    answers = {}
    model, tokenizer, is_adapter = load_trained(run_dir)
    answers["policy"] = generate(model, tokenizer, asks, max_new, cfg.eval.batch_size)
    if is_adapter:
        model.load_adapter(start / ADAPTER_DIR, adapter_name="start")
        model.set_adapter("start")
        answers["start"] = generate(model, tokenizer, asks, max_new, cfg.eval.batch_size)
    else:
        del model
        answers["start"] = generate(load_trained(start)[0], tokenizer, asks, max_new, cfg.eval.batch_size)

    scores: dict[str, list[float]] = {}
    contenders: dict[str, dict] = {}
    predictions = [{"source": ex.where, "reference": ex.target} for ex in asks]
    for name in ("start", "policy"):
        each_sum: dict[str, float] = {}
        scores[name] = []
        for i, (ex, answer) in enumerate(zip(asks, answers[name], strict=True)):
            total, each = scorer.score(answer, {"reference": ex.target}, i, ex.where)
            scores[name].append(total)
            predictions[i] |= {f"{name}_answer": answer, f"{name}_score": total}
            for g, v in each.items():
                each_sum[g] = each_sum.get(g, 0.0) + v
        mean, lo, hi = mean_ci(scores[name])
        contenders[name] = {"grader_score": mean, "grader_score_ci_low": lo, "grader_score_ci_high": hi}
        contenders[name] |= {f"grader/{g}": v / len(asks) for g, v in each_sum.items()}
    report = {
        "task": cfg.task,
        "task_metric": "grader_score",
        "n_test": len(asks),
        "test_data": str(data) if data is not None else str(run_dir / "data" / "test.jsonl"),
        "seconds": time.perf_counter() - t0,
        "unit": "examples",
        "start_model": str(start),
        "graders": [name for name, _, _ in scorer.graders],
        "contenders": contenders,
        "paired": paired_difference(scores["start"], scores["policy"]),
        "grader_failures": scorer.report(),
    }
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_json(run_dir / "predictions.json", predictions)
    p = report["paired"]
    atomic_write_text(
        run_dir / "report.md",
        f"# Evaluation report\n\nTask `rl` with graders ({', '.join(report['graders'])}), held-out test: "
        f"{len(asks)} examples from `{report['test_data']}`. start: the policy RL started from ({start}).\n\n"
        + comparison_table(report)
        + f"\n\npolicy - start: {p['difference']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}], "
        f"p = {p['p_value']:.3g} ({p['test']}).\n",
    )
    if not quiet:
        console.print(
            f"eval rl (graders): grader_score start {contenders['start']['grader_score']:.3f}, policy "
            f"{contenders['policy']['grader_score']:.3f}; difference {p['difference']:+.3f}, p = {p['p_value']:.3g} "
            f"({report['seconds']:.0f}s)"
        )
    return report
