"""`tunekit eval RUN_DIR` for preference runs (task reward, dpo, rl), on the held-out test pairs.

- reward: the reward model's pairwise accuracy (chosen scores higher; ties are wrong) and mean
  margin r(chosen) - r(rejected).
- dpo, rl: the policy against its reference (dpo: the base model; rl: the SFT policy RL started
  from). Preference accuracy: how often the implicit reward beta * log(policy / reference) of the
  chosen answer beats the rejected one's (beta: dpo.beta, or rl.kl_coef). Win rate: policy and
  reference answer each test prompt (greedy, short), a reward model scores both, and the win rate
  is the share where the policy's answer scores higher (ties count half). The reward model is the
  rl run's reward stage; for dpo it is `rl.reward_model` of the config or the `reward_model`
  argument, and without one the report says the win rate was not measured.

- kto: on held-out rated answers, the policy against the base model (its reference). Reward
  accuracy: the share of answers whose implied reward beta * log(policy / reference) has the sign
  of their rating (> 0 desirable, < 0 undesirable; the reference's, all 0, count as wrong); the KL
  estimate (mean log-ratio on mismatched prompt/answer pairs) and the mean reward of each kind.
- orpo: reference-free, so the policy against the base model it started from, both scored alike:
  preference accuracy (the log odds ratio of chosen over rejected, from per-token mean log-probs,
  is > 0), the mean log odds ratio, and the NLL of the chosen answers.

Writes report.json (`task_metric`, `n_test`, `contenders`), report.md and predictions.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunekit.console import err as console
from tunekit.data.example import Example, Message
from tunekit.data.needs import require
from tunekit.errors import TunekitError
from tunekit.eval.generate import generate
from tunekit.eval.report import comparison_table
from tunekit.io import atomic_write_json, atomic_write_text
from tunekit.runs.directory import load_run_config, read_split
from tunekit.train.recipes.dpo import (
    compute_reference_logps,
    evaluate_pairs,
    reference,
    tokenize_pairs,
)
from tunekit.train.setup import ADAPTER_DIR, load_base, load_trained


def evaluate_reward(run_dir: str | Path, data: str | Path | None = None, quiet: bool = False) -> dict:
    """task: reward: the reward model's pairwise accuracy and margin on the test pairs (or `data`)."""
    return _evaluate(
        run_dir, data, quiet, lambda run_dir, cfg, examples: _reward_report(run_dir, cfg, examples)
    )


def evaluate_dpo(
    run_dir: str | Path, data: str | Path | None = None, quiet: bool = False, reward_model=None
) -> dict:
    """task: dpo: the policy against the base model it started from (its reference in training)."""

    def setup(run_dir: Path, cfg) -> _PolicyEval:
        return _PolicyEval(
            beta=cfg.dpo.beta,
            reference=_base_reference(cfg),
            reference_name="base model",
            reward_model=Path(reward_model or cfg.rl.reward_model)
            if (reward_model or cfg.rl.reward_model)
            else None,
            win_rate_is_task_metric=False,
            max_new_tokens=cfg.eval.max_new_tokens or 64,
        )

    return _evaluate(
        run_dir, data, quiet, lambda d, cfg, ex: _policy_report(d, cfg, ex, setup(d, cfg), quiet)
    )


def evaluate_rl(
    run_dir: str | Path, data: str | Path | None = None, quiet: bool = False, reward_model=None
) -> dict:
    """task: rl: the policy against the SFT policy RL started from, scored by the run's reward stage."""
    from tunekit.train.recipes.rl import stage_dirs

    def setup(run_dir: Path, cfg) -> _PolicyEval:
        start, reward_stage = stage_dirs(cfg, run_dir)
        return _PolicyEval(
            beta=cfg.rl.kl_coef or 1.0,
            reference=_policy_reference(start),
            reference_name=str(start),
            reward_model=Path(reward_model) if reward_model else reward_stage,
            win_rate_is_task_metric=True,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rl.max_new_tokens,
        )

    return _evaluate(
        run_dir, data, quiet, lambda d, cfg, ex: _policy_report(d, cfg, ex, setup(d, cfg), quiet)
    )


def evaluate_kto(run_dir: str | Path, data: str | Path | None = None, quiet: bool = False) -> dict:
    """task: kto: the policy against the base model (its reference in training), on rated answers."""
    return _evaluate(run_dir, data, quiet, lambda d, cfg, ex: _kto_report(d, cfg, ex), kind="unpaired")


def evaluate_orpo(run_dir: str | Path, data: str | Path | None = None, quiet: bool = False) -> dict:
    """task: orpo: the policy against the base model it started from, on the test pairs' log odds."""
    return _evaluate(run_dir, data, quiet, lambda d, cfg, ex: _orpo_report(d, cfg, ex))


def _evaluate(run_dir, data, quiet: bool, score, kind: str = "pairs") -> dict:
    """Score the test pairs (kind "pairs"; or rated answers, "unpaired") with `score(run_dir, cfg,
    examples) -> (report, rows)`; write report.json, report.md and predictions.json."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    examples = _test_pairs(run_dir, cfg, data, kind)
    t0 = time.perf_counter()
    report, rows = score(run_dir, cfg, examples)
    report = {
        "task": cfg.task,
        "task_metric": report.pop("task_metric"),
        "n_test": len(examples),
        "test_data": str(data) if data is not None else str(run_dir / "data" / "test.jsonl"),
        "seconds": time.perf_counter() - t0,
    } | report
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_json(run_dir / "predictions.json", rows)
    _write_markdown(run_dir, report, rows, cfg.eval.show_examples)
    if not quiet:
        tm = report["task_metric"]
        shown = ", ".join(
            f"{name} {m[tm]:.3f}"
            for name, m in report["contenders"].items()
            if isinstance(m.get(tm), int | float)
        )
        console.print(f"eval {cfg.task}: {tm}: {shown} ({report['seconds']:.0f}s)")
    return report


def _test_pairs(run_dir: Path, cfg, data, kind: str = "pairs") -> list[Example]:
    from tunekit.data import load_examples

    if data is not None:
        examples = load_examples(data, format=cfg.data.format, columns=cfg.data.columns or None)
    else:
        examples = _read_pair_split(run_dir, "test")
    examples = examples[: cfg.eval.max_examples] if cfg.eval.max_examples else examples
    if not examples:
        raise TunekitError(f"{run_dir}: the test split is empty; pass --data FILE or set data.split")
    require(kind, examples, "test", cfg.task)
    return examples


def _read_pair_split(run_dir: Path, name: str) -> list[Example]:
    """A split as training saw it, rejected answers included (run_dir.read_split reads the files as
    plain chat, which has no `rejected`)."""
    import json

    read_split(run_dir, name)  # its checks and errors for a missing split
    path = run_dir / "data" / f"{name}.jsonl"
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            out.append(
                Example(
                    messages=tuple(Message(**m) for m in row["messages"]),
                    rejected=tuple(Message(**m) for m in row["rejected"]) if "rejected" in row else None,
                    desirable=row.get("desirable"),
                    source=str(path),
                    line=i,
                    format="chat",
                )
            )
    return out


# ---------------------------------------------------------------------------------------------
# task: reward


def _reward_report(run_dir: Path, cfg, examples: list[Example]) -> tuple[dict, list[dict]]:
    """Pairwise accuracy and mean margin of the reward model, from one scoring pass."""
    from tunekit.train.recipes.reward import load_reward_model, score_texts

    model, tokenizer = load_reward_model(run_dir)
    convs = [[*p, *c] for p, c, _ in (ex.pair() for ex in examples)] + [
        [*p, *r] for p, _, r in (ex.pair() for ex in examples)
    ]
    scores = score_texts(
        model, tokenizer, [_dicts(c) for c in convs], cfg.eval.batch_size, cfg.train.max_length
    )
    n = len(examples)
    rows = [
        {
            "source": ex.where,
            "prompt": ex.pair()[0][-1].content,
            "chosen_score": scores[i],
            "rejected_score": scores[n + i],
            "correct": scores[i] > scores[n + i],
        }
        for i, ex in enumerate(examples)
    ]
    metrics = {
        "accuracy": sum(r["correct"] for r in rows) / n,
        "mean_margin": sum(r["chosen_score"] - r["rejected_score"] for r in rows) / n,
    }
    return {"task_metric": "accuracy", "contenders": {"reward_model": metrics}}, rows


# ---------------------------------------------------------------------------------------------
# task: dpo and rl


@dataclass(frozen=True)
class _PolicyEval:
    """What differs between the preference-trained policies (dpo, rl) in their evaluation."""

    beta: float  # of the implicit reward beta * log(policy / reference)
    reference: Callable  # (model, is_adapter) -> a context manager yielding the reference policy
    reference_name: str
    reward_model: Path | None  # scores the win rate; None: not measured
    win_rate_is_task_metric: bool
    max_new_tokens: int


def _policy_report(run_dir: Path, cfg, examples, ev: _PolicyEval, quiet: bool) -> tuple[dict, list[dict]]:
    model, tokenizer, is_adapter = load_trained(run_dir)
    pad = tokenizer.pad_token_id
    pairs = tokenize_pairs(tokenizer, examples, cfg.train.max_length, "test")
    with ev.reference(model, is_adapter) as ref:
        compute_reference_logps(ref, pairs, pad, cfg.eval.batch_size)
    implicit = evaluate_pairs(model, pairs, pad, ev.beta, 0.0, cfg.eval.batch_size)
    policy = {"preference_accuracy": implicit["val_accuracy"], "reward_margin": implicit["val_margin"]}
    # The reference against itself: every implicit reward is 0, a tie, which counts as wrong.
    ref_metrics = {"preference_accuracy": 0.0, "reward_margin": 0.0}
    policy |= _policy_logps(model, pairs, pad, cfg.eval.batch_size)
    ref_metrics |= {
        "logp_chosen": sum(p.ref_chosen for p in pairs) / len(pairs),
        "logp_rejected": sum(p.ref_rejected for p in pairs) / len(pairs),
    }
    rows = [
        {"source": ex.where, "prompt": ex.pair()[0][-1].content, "chosen": ex.target,
         "rejected": ex.rejected[-1].content}
        for ex in examples
    ]  # fmt: skip

    report: dict = {"task_metric": "preference_accuracy", "beta": ev.beta, "reward_model": None}
    if ev.reward_model is None:
        report["win_rate_note"] = (
            "no reward model: the win rate was not measured (set rl.reward_model in the config, or pass one)"
        )
    else:
        wins = _win_rate(cfg, model, tokenizer, is_adapter, examples, ev, rows)
        policy |= {"reward_score": wins["policy_score"], "win_rate": wins["win_rate"]}
        ref_metrics |= {"reward_score": wins["reference_score"], "win_rate": 1 - wins["win_rate"]}
        report["reward_model"] = str(ev.reward_model)
        if ev.win_rate_is_task_metric:
            report["task_metric"] = "win_rate"
    report["contenders"] = {"reference": ref_metrics, "policy": policy}
    report["reference_model"] = ev.reference_name
    return report, rows


def _policy_logps(model, pairs, pad: int, batch_size: int) -> dict[str, float]:
    """Mean summed log-prob of the chosen and of the rejected answers under `model`."""
    import torch

    from tunekit.train.recipes.dpo import collate_pairs, sequence_logps

    chosen = rejected = 0.0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            b = collate_pairs(pairs[i : i + batch_size], pad)
            c, r = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"]).chunk(2)
            chosen, rejected = chosen + float(c.sum()), rejected + float(r.sum())
    return {"logp_chosen": chosen / len(pairs), "logp_rejected": rejected / len(pairs)}


def _base_reference(cfg) -> Callable:
    """dpo's reference: the base (the adapter switched off, or the base model loaded beside a full
    fine-tune)."""

    @contextmanager
    def ref(model, is_adapter: bool) -> Iterator:
        if is_adapter:
            with reference(model) as r:
                yield r
            return
        from tunekit.models import resolve_model

        yield load_base(resolve_model(cfg.model), "full").eval()

    return ref


def _policy_reference(start: Path) -> Callable:
    """rl's reference: the SFT policy RL started from (its adapter loaded beside the RL adapter on
    the same base, or its full model)."""

    @contextmanager
    def ref(model, is_adapter: bool) -> Iterator:
        if not is_adapter:
            yield load_trained(start)[0]
            return
        if "reference" not in model.peft_config:
            model.load_adapter(start / ADAPTER_DIR, adapter_name="reference")
        model.set_adapter("reference")
        try:
            yield model
        finally:
            model.set_adapter("default")

    return ref


def _win_rate(cfg, model, tokenizer, is_adapter, examples, ev: _PolicyEval, rows) -> dict[str, float]:
    """Greedy answers of policy and reference to each test prompt, scored by the reward model."""
    from tunekit.train.recipes.reward import load_reward_model, score_texts

    prompts = [ex.pair()[0] for ex in examples]
    asks = [Example(messages=(*p, Message("assistant", ""))) for p in prompts]  # .prompt is p
    max_new = ev.max_new_tokens
    answers = {}
    with ev.reference(model, is_adapter) as ref:
        answers["reference"] = generate(ref, tokenizer, asks, max_new, cfg.eval.batch_size)
    answers["policy"] = generate(model, tokenizer, asks, max_new, cfg.eval.batch_size)
    rm, rm_tok = load_reward_model(ev.reward_model)
    scores = {
        name: score_texts(
            rm, rm_tok, [_dicts([*p, Message("assistant", a)]) for p, a in zip(prompts, texts, strict=True)],
            cfg.eval.batch_size, cfg.train.max_length,
        )
        for name, texts in answers.items()
    }  # fmt: skip
    wins = 0.0
    for i, row in enumerate(rows):
        s_p, s_r = scores["policy"][i], scores["reference"][i]
        wins += 1.0 if s_p > s_r else 0.5 if s_p == s_r else 0.0
        row |= {
            "policy_answer": answers["policy"][i],
            "reference_answer": answers["reference"][i],
            "policy_score": s_p,
            "reference_score": s_r,
        }
    n = len(rows)
    return {
        "win_rate": wins / n,
        "policy_score": sum(scores["policy"]) / n,
        "reference_score": sum(scores["reference"]) / n,
    }


# ---------------------------------------------------------------------------------------------
# task: kto and orpo


def _kto_report(run_dir: Path, cfg, examples: list[Example]) -> tuple[dict, list[dict]]:
    """Reward accuracy, KL estimate and mean rewards of the policy and of its reference (the base)."""
    from tunekit.train.recipes.kto import (
        KtoWeights,
        compute_reference_logps,
        prompt_and_answer,
        rated_metrics,
        score_rated,
        tokenize_rated,
    )

    model, tokenizer, is_adapter = load_trained(run_dir)
    pad, bs = tokenizer.pad_token_id, cfg.eval.batch_size
    w = KtoWeights(cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
    items = tokenize_rated(tokenizer, examples, cfg.train.max_length, "test")
    with _base_reference(cfg)(model, is_adapter) as ref:
        compute_reference_logps(ref, items, pad, bs)
    logps, kl_logps = score_rated(model, items, pad, bs)
    ref_logps = [it.ref for it in items]
    contenders = {}
    for name, (lp, kl) in {
        "reference": (ref_logps, [it.ref_kl for it in items]),
        "policy": (logps, kl_logps),
    }.items():
        m = rated_metrics(items, lp, kl, w)
        contenders[name] = {"reward_accuracy": m.pop("accuracy"), "kto_loss": m.pop("loss")} | m
        contenders[name] |= _mean_logps(items, lp)
    rows = []
    for ex, it, lp, q in zip(examples, items, logps, ref_logps, strict=True):
        prompt, answer = prompt_and_answer(ex)
        rows.append(
            {"source": ex.where, "prompt": prompt[-1].content if prompt else "", "answer": answer[-1].content,
             "desirable": it.desirable, "reward": w.beta * (lp - q)}
        )  # fmt: skip
    note = (
        f"Reference: base model. reward_accuracy: the share of answers whose implied reward beta * "
        f"log(policy / reference) (beta {w.beta}) has the sign of their rating (> 0 desirable, < 0 "
        "undesirable); kl: the mean log-ratio on mismatched prompt/answer pairs (KTO's reference point)."
    )
    report = {"task_metric": "reward_accuracy", "beta": w.beta, "unit": "rated answers", "metric_note": note}
    return report | {"contenders": contenders, "reference_model": "base model"}, rows


def _mean_logps(items, logps: list[float]) -> dict[str, float]:
    """Mean summed log-prob of the desirable and of the undesirable answers (a kind absent: left out)."""
    out = {}
    for key, flag in (("logp_desirable", True), ("logp_undesirable", False)):
        chosen = [lp for it, lp in zip(items, logps, strict=True) if it.desirable is flag]
        if chosen:
            out[key] = sum(chosen) / len(chosen)
    return out


def _orpo_report(run_dir: Path, cfg, examples: list[Example]) -> tuple[dict, list[dict]]:
    """Preference accuracy of the log odds ratio, its mean and the chosen NLL, for base and policy."""
    from tunekit.train.recipes.orpo import score_pairs

    model, tokenizer, is_adapter = load_trained(run_dir)
    pad, bs, beta = tokenizer.pad_token_id, cfg.eval.batch_size, cfg.orpo.beta
    pairs = tokenize_pairs(tokenizer, examples, cfg.train.max_length, "test")
    with _base_reference(cfg)(model, is_adapter) as base:
        base_metrics, base_odds = score_pairs(base, pairs, pad, beta, bs)
    policy_metrics, policy_odds = score_pairs(model, pairs, pad, beta, bs)
    contenders = {
        name: {"preference_accuracy": m["accuracy"], "log_odds_ratio": m["log_odds"], "nll_chosen": m["nll"],
               "orpo_loss": m["loss"], "logp_chosen": m["logp_chosen"], "logp_rejected": m["logp_rejected"]}
        for name, m in (("base", base_metrics), ("policy", policy_metrics))
    }  # fmt: skip
    rows = [
        {"source": ex.where, "prompt": ex.pair()[0][-1].content, "chosen": ex.target,
         "rejected": ex.rejected[-1].content, "base_log_odds": b, "policy_log_odds": p}
        for ex, b, p in zip(examples, base_odds, policy_odds, strict=True)
    ]  # fmt: skip
    note = (
        "Reference-free: the policy against the base model it started from, both scored alike. "
        "preference_accuracy: how often the log odds ratio log(odds(chosen) / odds(rejected)), from "
        "each answer's per-token mean log-prob, is above 0; nll_chosen: per chosen-answer token; "
        "logp_*: per-token means."
    )
    report = {"task_metric": "preference_accuracy", "beta": beta, "metric_note": note}
    return report | {"contenders": contenders, "reference_model": "base model"}, rows


# ---------------------------------------------------------------------------------------------
# Report


def _dicts(messages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _write_markdown(run_dir: Path, report: dict, rows: list[dict], show: int) -> None:
    tm = report["task_metric"]
    c = report["contenders"]
    parts = [
        "# Evaluation report\n",
        f"Task `{report['task']}`, held-out test: {report['n_test']} {report.get('unit', 'preference pairs')} "
        f"from `{report['test_data']}`.\n",
        f"Task metric **{tm}**: "
        + ", ".join(f"{name} {m[tm]:.3f}" for name, m in c.items() if m.get(tm) is not None)
        + ".\n",
        comparison_table(report) + "\n",
    ]
    if report.get("win_rate_note"):
        parts.append(f"_{report['win_rate_note']}_\n")
    if report.get("metric_note"):
        parts.append(report["metric_note"] + "\n")
    elif "policy" in c:
        parts.append(
            f"Reference: {report['reference_model']}. preference_accuracy: how often the implicit reward "
            f"beta * log(policy / reference) (beta {report['beta']}) of the chosen answer beats the rejected one's.\n"
        )
    if show and rows and "policy_answer" in rows[0]:
        parts.append("## Side by side\n")
        for i, r in enumerate(rows[:show], 1):
            parts.append(f"### Example {i} ({r['source']})\n")
            parts.append(f"**prompt**\n\n```\n{r['prompt']}\n```\n")
            for who in ("reference", "policy"):
                parts.append(
                    f"**{who}** (reward {r[f'{who}_score']:.3f})\n\n```\n{r[f'{who}_answer']}\n```\n"
                )
    atomic_write_text(run_dir / "report.md", "\n".join(parts) + "\n")
