"""`tunekit eval RUN_DIR`: base model vs fine-tuned model on the same held-out test examples.

For adapter runs both contenders share one model in memory: the base is the fine-tuned model with
its adapter switched off, so the comparison cannot be skewed by loading two different copies. A
full fine-tune's base is loaded from the same source the run started from.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

from tunekit.console import err as console
from tunekit.data.reasoning import reply_with_reasoning, strip_thinking
from tunekit.data.tokenize import render_prompt, tokenize_example
from tunekit.data.tools import with_call_points
from tunekit.eval.generate import generate
from tunekit.eval.metrics import normalize
from tunekit.eval.report import write_report
from tunekit.io import atomic_write_json
from tunekit.models import load_model, resolve_model
from tunekit.runs.directory import load_run_config, load_test_examples, read_split
from tunekit.train.setup import load_trained


@contextmanager
def _contender(model, is_adapter: bool, cfg, name: str):
    """The model playing `name`: the fine-tuned one, or the base. An adapter run's base is the same
    model with its adapter switched off; a full fine-tune's base is loaded beside it."""
    if name != "base":
        yield model
    elif is_adapter:
        with model.disable_adapter():
            yield model
    else:
        base = load_model(resolve_model(cfg.model)).eval()
        yield base
        del base


def evaluate(run_dir: str | Path, data: str | Path | None = None, quiet: bool = False, **options) -> dict:
    """Evaluate a run on its held-out test split (or `data`) as its task's row of the task table
    says; writes report.json and report.md. `options` are the task's own (`few_shot`, `probe` for
    sft; `reward_model` for dpo and rl); one the task does not take is an error."""
    from tunekit.tasks import get_task

    run_dir = Path(run_dir)
    return get_task(load_run_config(run_dir).task).evaluate(run_dir, data, quiet, **options)


def evaluate_generation(
    run_dir: Path,
    data: str | Path | None = None,
    quiet: bool = False,
    few_shot: int | None = None,
    probe: str | Path | None = None,
    metrics: list[str] | None = None,
    label_scoring: bool | None = None,
) -> dict:
    """SFT: three contenders on the same held-out prompts, scored against the references.

    `base` (zero-shot), `base_few_shot` (the base shown `eval.few_shot` train examples first) and
    `finetuned`. Each metric comes with its 95% bootstrap CI, each pair of contenders with a paired
    test; then the forgetting probe, the failure triage, and report.json/.md/.html.
    `few_shot` and `probe` override the run config's `eval.few_shot` and `eval.probe`, `metrics`
    its `eval.metrics`; a `module:function` metric is imported only when named in `metrics`.

    Label data (every reference one of `data.labels`, or of the training split's labels) is
    predicted by label scoring (eval/label_scoring.py): the most likely label as the reply, one
    forward pass per example, every prediction a valid label; `label_scoring=False` (`tunekit eval
    --generate`, `eval.label_scoring: false`) generates freely instead. Other data is generated.
    """
    from tunekit.eval.failures import analyze_failures, train_group_counts
    from tunekit.eval.metrics import (
        confusion_matrix,
        default_metrics,
        metrics_to_score,
        resolve_metric,
        score_metrics,
    )
    from tunekit.eval.probe import forgetting_report, load_probe, run_probe, target_logprobs
    from tunekit.eval.report import training_curves
    from tunekit.eval.report_html import write_report_html
    from tunekit.eval.stats import paired_difference, ratio_ci
    from tunekit.eval.verdict import run_verdict

    cfg = load_run_config(run_dir)
    chosen = metrics_to_score(cfg.eval.metrics, metrics, run_dir / "config.yaml")  # before any model loads
    k = cfg.eval.few_shot if few_shot is None else few_shot
    probe_spec = cfg.eval.probe if probe is None else probe
    if str(probe_spec).strip().lower() in ("none", "off", "null", ""):  # `--probe none` turns it off
        probe_spec = None
    # Read before any model loads: a mistyped probe path fails in seconds, not after the base model
    # has answered the whole test set.
    probe_data = (
        load_probe(probe_spec, cfg.eval.probe_max_questions, seed=cfg.train.seed) if probe_spec else None
    )
    # A conversation's tool calls before its last turn are scored too (data/tools.py `with_call_points`).
    examples = with_call_points(load_test_examples(run_dir, cfg, data))
    train_examples = read_split(run_dir, "train")

    model, tokenizer, is_adapter = load_trained(run_dir)
    references = [ex.target for ex in examples]
    use_labels = cfg.eval.label_scoring if label_scoring is None else label_scoring
    candidates, why_not = (
        label_candidates(cfg.data.labels, train_examples, examples)
        if use_labels
        else (None, "label scoring turned off (--generate or eval.label_scoring: false)")
    )
    labels = set(cfg.data.labels or []) or (
        {normalize(ex.target) for ex in [*examples, *train_examples]}
        if all(ex.label is not None for ex in examples)
        else None
    )
    metric_specs = chosen or default_metrics(references, labels is not None)
    task_metric = resolve_metric(metric_specs[0]).name
    # Room for the longest reference reply, its reasoning included (a model trained to think writes it first).
    max_new = cfg.eval.max_new_tokens or 16 + max(
        len(tokenizer(reply_with_reasoning(ex.messages[-1]), add_special_tokens=False)["input_ids"])
        for ex in examples
    )
    shots = few_shot_examples(train_examples, k, cfg.train.seed)
    inputs = {"base": examples, "finetuned": examples}
    if shots:
        inputs["base_few_shot"] = [with_shots(ex, shots) for ex in examples]
    order = [n for n in ("base", "base_few_shot", "finetuned") if n in inputs]

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    contenders, predictions, per_example, probe_scores, modes = {}, {}, {}, {}, {}
    for name in order:
        exs = inputs[name]
        # Few-shot prompts are longer than training's max_length by design: never cut them.
        max_len = cfg.train.max_length if name != "base_few_shot" else 1 << 16
        full = [tokenize_example(tokenizer, ex, 1 << 30) for ex in exs]
        tok = [_cut(it, max_len) for it in full]
        with _contender(model, is_adapter, cfg, "base" if name.startswith("base") else name) as m:
            t0 = time.perf_counter()  # after a full fine-tune's base has loaded: latency is answering only
            scored, why = (
                (None, why_not)
                if candidates is None
                else (_score_labels(m, tokenizer, exs, full, tok, candidates, cfg.eval.batch_size))
            )
            if scored is None:
                preds = generate(m, tokenizer, exs, max_new, cfg.eval.batch_size)
                t_gen = time.perf_counter() - t0
                logps = target_logprobs(m, tok, tokenizer.pad_token_id, cfg.eval.batch_size)
                modes[name] = {"mode": "generation", "reason": why}
            else:
                preds, logps, modes[name] = scored
                t_gen = time.perf_counter() - t0
            if probe_data is not None and name in ("base", "finetuned"):
                probe_scores[name] = run_probe(m, tokenizer, probe_data, cfg.eval.batch_size)
        seconds = time.perf_counter() - t0
        values, scores = score_metrics(metric_specs, preds, references)
        loss, loss_lo, loss_hi = ratio_ci([-s for s, _ in logps], [n for _, n in logps])
        contenders[name] = values | {
            "test_loss": loss,
            "test_loss_ci_low": loss_lo,
            "test_loss_ci_high": loss_hi,
            "perplexity": math.exp(min(loss, 50)),
            "perplexity_ci_low": math.exp(min(loss_lo, 50)),
            "perplexity_ci_high": math.exp(min(loss_hi, 50)),
            "prompt_tokens_per_example": sum(n_tokens(render_prompt(tokenizer, ex)) for ex in exs) / len(exs),
            "completion_tokens_per_example": sum(n_tokens(p) for p in preds) / len(exs),
            "latency_s_per_example": t_gen / len(exs),
            "seconds_per_example": seconds / len(exs),
        }
        predictions[name], per_example[name] = preds, scores
        if not quiet:
            shown = ", ".join(f"{m_} {contenders[name][m_]:.3f}" for m_ in (task_metric, "test_loss"))
            how = modes[name]
            mode = (
                f"labels scored: {how['candidates']} candidates"
                if how["mode"] == "label_scoring"
                else "generated"
            )
            console.print(f"eval {name}: {shown} ({seconds:.0f}s, {mode})")

    pairs = [("base", "finetuned"), ("base_few_shot", "finetuned"), ("base", "base_few_shot")]
    comparisons = {
        f"{b}_vs_{a}": {"metric": task_metric}
        | paired_difference(per_example[a][task_metric], per_example[b][task_metric])
        for a, b in pairs
        if a in per_example and b in per_example and task_metric in per_example[a]
    }
    rows = []
    for i, ex in enumerate(examples):
        row = {
            "source": ex.where,
            "prompt": ex.prompt[-1].content if ex.prompt else "",
            "reference": ex.target,
        }
        row |= {"label": ex.label} if ex.label is not None else {}
        for name in order:
            row[name] = predictions[name][i]
            row[f"{name}_correct"] = normalize(strip_thinking(predictions[name][i])) == normalize(ex.target)
            if task_metric in per_example[name]:
                row[f"{name}_score"] = per_example[name][task_metric][i]
        rows.append(row)
    report = {
        "task_metric": task_metric,
        "metrics": [resolve_metric(s).name for s in metric_specs],
        "n_test": len(examples),
        "test_data": str(data) if data is not None else str(run_dir / "data" / "test.jsonl"),
        "few_shot": {"k": len(shots), "sources": [s.where for s in shots]},
        "prediction": prediction_summary(modes),
        "contenders": contenders,
        "comparisons": comparisons,
        "training": training_curves(run_dir),
        "examples": rows[: cfg.eval.show_examples],
        "failures": sorted(
            (r for r in rows if not r["finetuned_correct"]), key=lambda r: r.get("finetuned_score", 0.0)
        )[:200],
        "failure_analysis": analyze_failures(rows, labels, train_group_counts(train_examples)),
    }
    if labels is not None:
        report["confusion_matrix"] = {
            n: confusion_matrix(predictions[n], references, sorted(labels)) for n in ("base", "finetuned")
        }
    if probe_scores:
        report["forgetting"] = forgetting_report(probe_data, probe_scores["base"], probe_scores["finetuned"])
    report["verdict"] = run_verdict(run_dir, report, cfg.eval)  # prompting or fine-tuning, priced
    atomic_write_json(run_dir / "report.json", report)
    write_report(run_dir, report)
    write_report_html(run_dir, report)
    atomic_write_json(run_dir / "predictions.json", rows)
    return report


def few_shot_examples(train: list, k: int, seed: int) -> list:
    """k training examples, drawn once with the run's seed: every test prompt sees the same shots."""
    import random

    if k <= 0 or not train:
        return []
    return random.Random(seed).sample(train, min(k, len(train)))


def with_shots(example, shots: list):
    """`example` with the shots' turns (user, assistant, ...) before its own; its system prompt stays
    first. The shots' answers are part of the prompt (weight 0): the test loss counts the example's
    own reply only, the same tokens as the zero-shot base's."""
    from dataclasses import replace

    system = [m for m in example.messages if m.role == "system"]
    turns = [
        replace(m, weight=0) if m.role == "assistant" else m
        for s in shots
        for m in s.messages
        if m.role != "system"
    ]
    rest = [m for m in example.messages if m.role != "system"]
    return replace(example, messages=tuple(system + turns + rest))


def label_candidates(declared, train_examples: list, examples: list) -> tuple[list[str] | None, str]:
    """(the candidate labels, "") when every test reference is one of a known label set: the
    declared `data.labels`, else the labels of the training split; (None, why not) otherwise."""
    if declared:
        known, source = list(declared), "data.labels"
    else:
        known = sorted({ex.target for ex in train_examples if ex.label is not None})
        source = "the training split's labels"
    if not known:
        return None, ""  # free-form data: generation is the only way
    if any(ex.label is None for ex in examples):
        return None, ""  # free-form data: generation is the only way
    outside = sorted({ex.target for ex in examples} - set(known))
    if outside:
        shown = ", ".join(repr(x) for x in outside[:3]) + (", ..." if len(outside) > 3 else "")
        return None, f"{len(outside)} test reference(s) not among {source} ({shown})"
    return known, ""


def _score_labels(model, tokenizer, exs, full, tok, candidates, batch_size: int):
    """((predictions, (sum, count) of each reference's log-probs, the mode's summary), "") by label
    scoring, or (None, why not) where it does not apply (`label_scoring_unsupported`). An example
    that train.max_length cuts keeps the cut test loss the plain path gives it."""
    from tunekit.eval.label_scoring import (
        SEARCH_BUDGET,
        Candidates,
        label_scoring_unsupported,
        score_labels,
    )
    from tunekit.eval.probe import target_logprobs
    from tunekit.models.stops import stop_token_ids

    cands = Candidates.build(tokenizer, exs[0], candidates, stop_token_ids(tokenizer, model))
    why_not = label_scoring_unsupported(model, full, cands)
    if why_not is not None:
        return None, why_not
    got = score_labels(model, full, cands, tokenizer.pad_token_id, batch_size, budget=SEARCH_BUDGET)
    logps = list(got.reference_logprobs)
    cut = [i for i, it in enumerate(tok) if it.truncated]
    redone = target_logprobs(model, [tok[i] for i in cut], tokenizer.pad_token_id, batch_size)
    for i, lp in zip(cut, redone, strict=True):
        logps[i] = lp
    mode = {
        "mode": "label_scoring",
        "candidates": len(candidates),
        "trie_tokens": cands.n_nodes,
        "expanded_per_example": sum(got.expanded) / len(exs),
        "exact_share": sum(got.exact) / len(exs),  # searches that ended within SEARCH_BUDGET
    }
    return (got.predictions, logps, mode), ""


def prediction_summary(modes: dict[str, dict]) -> dict:
    """How the predictions were made, for report.json/.md: the first contender's mode (label
    scoring over N candidates, or generation and why), and each contender's."""
    return next(iter(modes.values()), {"mode": "generation"}) | {"contenders": modes}


def _cut(item, max_length: int):
    """A tokenized example cut to `max_length` tokens, as tokenize_example(..., max_length) gives it."""
    from tunekit.data.tokenize import TokenizedExample

    cut = max(0, len(item.input_ids) - max_length)
    return TokenizedExample(item.input_ids[:max_length], item.labels[:max_length], truncated=cut)
