"""`tunekit eval --compare OLD NEW --gate`: is NEW (a retrained run, e.g. `tunekit train CONFIG
--from OLD` on new data) fit to replace OLD?

Both models answer the same questions here (greedy decoding), so every check is a paired test on
identical questions. NEW is fit only when all three hold:

1. non-inferior on OLD's test set: the 95% CI of NEW - OLD (the task metric) lies above -margin;
2. non-inferior on the forgetting probe (NEW's `eval.probe`), each part: the same rule;
3. better on the new data (NEW's test set): NEW - OLD > 0 with p < alpha.

margin is NEW's `eval.gate_margin` (default 0.02: two points of accuracy), alpha its
`eval.verdict_alpha`. With `eval.probe: null` check 2 is skipped, and the result says so.
Writes NEW/gate.json and registers it as NEW's `gate` artifact, beside its config's
`train.init_from` (the run it started from): the registry holds the lineage and the decision.
"""

from __future__ import annotations

from pathlib import Path

from tunekit.console import err as console
from tunekit.eval.stats import paired_difference

PROBE_PARTS = ("multiple_choice", "open_exact_match")  # open_contains follows open_exact_match


def non_inferior(diff: dict, margin: float) -> bool:
    """NEW - OLD is not worse by `margin` or more: the 95% CI's lower end lies above -margin."""
    return diff["ci_low"] > -margin


def better(diff: dict, alpha: float) -> bool:
    """NEW - OLD is a real gain: positive and significant at `alpha`."""
    return diff["difference"] > 0 and diff["p_value"] < alpha


def gate_decision(
    old_test: dict, probe: dict[str, dict] | None, new_test: dict, margin: float, alpha: float
) -> dict:
    """The checks and the decision from the paired differences NEW - OLD (`stats.paired_difference`
    results): on OLD's test set, on each probe part (None: no probe), on the new data."""
    checks = {"old_test_non_inferior": non_inferior(old_test, margin)}
    if probe is not None:
        checks |= {f"probe_{name}_non_inferior": non_inferior(d, margin) for name, d in probe.items()}
    checks["new_data_better"] = better(new_test, alpha)
    failed = [name for name, ok in checks.items() if not ok]
    reason = (
        "NEW is fit to replace OLD: "
        + f"not worse than OLD by {margin:g} on the old test set"
        + (" and the probe" if probe is not None else " (no probe: eval.probe is null)")
        + f", better on the new data ({new_test['difference']:+.3f}, p = {new_test['p_value']:.3g})"
        if not failed
        else "NEW is not fit to replace OLD: failed " + ", ".join(failed)
    )
    return {"fit": not failed, "checks": checks, "reason": reason}


def _answers(run_dir: Path, sets: dict[str, list], probe_data) -> tuple[dict[str, list[str]], dict]:
    """One run's greedy replies to each named set of examples, and its per-question probe scores."""
    from tunekit.eval.generate import generate
    from tunekit.eval.probe import run_probe
    from tunekit.runs.directory import load_run_config
    from tunekit.train.setup import load_trained

    cfg = load_run_config(run_dir)
    model, tokenizer, _ = load_trained(run_dir)
    replies = {}
    for name, examples in sets.items():
        refs = [len(tokenizer(ex.target, add_special_tokens=False)["input_ids"]) for ex in examples]
        max_new = cfg.eval.max_new_tokens or 16 + max(refs)
        replies[name] = generate(model, tokenizer, examples, max_new, cfg.eval.batch_size)
    probe = run_probe(model, tokenizer, probe_data, cfg.eval.batch_size) if probe_data is not None else {}
    del model
    return replies, probe


def gate(old: str | Path, new: str | Path, quiet: bool = False) -> dict:
    """Run the gate (see the module docstring); returns and writes NEW/gate.json."""
    from tunekit.eval.metrics import default_metrics, metrics_to_score, resolve_metric, score_metrics
    from tunekit.eval.probe import load_probe
    from tunekit.io import atomic_write_json
    from tunekit.runs import registry
    from tunekit.runs.directory import load_run_config, load_test_examples

    old, new = Path(old), Path(new)
    cfg = load_run_config(new)
    sets = {
        "old_test": load_test_examples(old, load_run_config(old)),
        "new_test": load_test_examples(new, cfg),
    }
    spec = cfg.eval.probe if cfg.eval.probe and str(cfg.eval.probe).lower() not in ("none", "off") else None
    probe_data = load_probe(spec, cfg.eval.probe_max_questions, seed=cfg.train.seed) if spec else None
    refs = [ex.target for ex in sets["new_test"]]
    specs = metrics_to_score(cfg.eval.metrics, None, new / "config.yaml") or default_metrics(
        refs, all(ex.label is not None for ex in sets["new_test"])
    )
    metric = resolve_metric(specs[0]).name
    answers = {}
    for side, run in (("old", old), ("new", new)):
        if not quiet:
            console.print(f"gate: {side} model ({run}) answers the old and new test sets and the probe")
        answers[side] = _answers(run, sets, probe_data)

    def scores(side: str, name: str) -> list[float]:
        return score_metrics([specs[0]], answers[side][0][name], [ex.target for ex in sets[name]])[1][metric]

    diffs = {
        name: {"metric": metric} | paired_difference(scores("old", name), scores("new", name))
        for name in sets
    }
    probe = (
        {
            part: paired_difference(answers["old"][1][part], answers["new"][1][part])
            for part in PROBE_PARTS
            if part in answers["old"][1]
        }
        if probe_data is not None
        else None
    )
    margin, alpha = cfg.eval.gate_margin, cfg.eval.verdict_alpha
    result = {
        "old": str(old),
        "new": str(new),
        "new_started_from": str(cfg.train.init_from) if cfg.train.init_from else None,
        "margin": margin,
        "alpha": alpha,
        "old_test": diffs["old_test"] | {"n": len(sets["old_test"])},
        "new_test": diffs["new_test"] | {"n": len(sets["new_test"])},
        "probe": probe,
        "probe_source": probe_data.source if probe_data is not None else None,
    } | gate_decision(diffs["old_test"], probe, diffs["new_test"], margin, alpha)
    atomic_write_json(new / "gate.json", result)
    registry.add_artifact(new, "gate", new / "gate.json")
    return result


def print_gate(result: dict, console) -> None:
    """Each check's NEW - OLD difference with its CI and p-value, then the decision."""
    from rich.table import Table

    table = Table(title=f"gate: {result['old']} -> {result['new']} (margin {result['margin']:g})")
    for col in ("check", "n", "NEW - OLD [95% CI]", "p-value", "pass"):
        table.add_column(col)
    rows = [("old test set: non-inferior", result["old_test"], "old_test_non_inferior")]
    rows += [
        (f"probe {p}: non-inferior", d, f"probe_{p}_non_inferior") for p, d in (result["probe"] or {}).items()
    ]
    rows += [("new data: better", result["new_test"], "new_data_better")]
    for title, d, key in rows:
        table.add_row(
            title,
            str(d.get("n", "")),
            f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
            f"{d['p_value']:.3g}",
            "yes" if result["checks"][key] else "NO",
        )
    console.print(table)
    console.print(result["reason"])
