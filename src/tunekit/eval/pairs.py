"""Reply pairs to rate (`tunekit ui`) or judge (`tunekit eval --judge`): two contenders' replies to
the same held-out prompts, from the predictions.json that `tunekit eval` writes.

A comparison names the two sides, `first|second`:

    base_few_shot|finetuned     two contenders of one run (the default; base|finetuned without shots)
    run:/abs/path/B             this run's fine-tuned replies against run B's, prompts matched by
                                prompt and reference as `tunekit eval --compare` matches them

Pairs whose two replies are the same text are left out (counted): there is nothing to prefer.
Each pair has a stable `item` id, a hash of its prompt and both replies: a re-evaluation that
changes a reply makes a new pair, so an old verdict never lands on a reply nobody saw.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from tunekit.errors import TunekitError

RUN_PREFIX = "run:"


def read_predictions(run_dir: Path) -> tuple[dict, list[dict]]:
    """(report.json, predictions.json) of an evaluated run, or an error that says to evaluate it."""
    report, preds = run_dir / "report.json", run_dir / "predictions.json"
    if report.is_file() and not preds.is_file():
        raise TunekitError(
            f"{run_dir}: its evaluation wrote no replies (predictions.json): only runs that generate "
            "replies (task: sft) can be rated or judged"
        )
    if not (report.is_file() and preds.is_file()):
        raise TunekitError(f"{run_dir}: no report.json/predictions.json; run `tunekit eval {run_dir}` first")
    return json.loads(report.read_text()), json.loads(preds.read_text())


def comparisons(run_dir: str | Path) -> list[str]:
    """The comparisons within an evaluated run, the default first."""
    report, _ = read_predictions(Path(run_dir))
    names = list(report.get("contenders") or {})
    if "finetuned" not in names:
        raise TunekitError(
            f"{run_dir}: its evaluation has no fine-tuned replies to compare (task without generation)"
        )
    return [f"{b}|finetuned" for b in ("base_few_shot", "base") if b in names]


def build_pairs(run_dir: str | Path, comparison: str) -> tuple[list[dict], int]:
    """(the pairs of `comparison`, how many were left out as identical), in test order."""
    run_dir = Path(run_dir)
    report, rows = read_predictions(run_dir)
    if comparison.startswith(RUN_PREFIX):
        other = Path(comparison[len(RUN_PREFIX) :])
        _, other_rows = read_predictions(other)
        by_key = {(r["prompt"], r["reference"]): r for r in other_rows}
        sides = [
            (
                r,
                f"{run_dir.name}/finetuned",
                r["finetuned"],
                f"{other.name}/finetuned",
                by_key[k]["finetuned"],
            )
            for r in rows
            if (k := (r["prompt"], r["reference"])) in by_key
        ]
    else:
        first, _, second = comparison.partition("|")
        if comparison not in comparisons(run_dir):
            raise TunekitError(
                f"{run_dir}: no comparison {comparison!r}; its evaluation has: {', '.join(comparisons(run_dir))}"
            )
        sides = [(r, first, r[first], second, r[second]) for r in rows]
    messages = _prompt_messages(run_dir, report)
    pairs, identical = [], 0
    for row, a_name, a, b_name, b in sides:
        if a.strip() == b.strip():
            identical += 1
            continue
        pair = {
            "source": row.get("source", ""),
            "prompt": row["prompt"],
            "reference": row["reference"],
            "first": {"name": a_name, "reply": a},
            "second": {"name": b_name, "reply": b},
        }
        if row.get("source") in messages:
            pair["prompt_messages"] = messages[row["source"]]
        pair["item"] = item_id(pair)
        pairs.append(pair)
    return pairs, identical


def item_id(pair: dict) -> str:
    """A pair's stable id: a hash of its prompt and both replies."""
    key = [pair.get("prompt_messages") or pair["prompt"], pair["first"]["reply"], pair["second"]["reply"]]
    return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode()).hexdigest()[:16]


def _prompt_messages(run_dir: Path, report: dict) -> dict[str, list[dict]]:
    """source -> the whole prompt (system and earlier turns) where predictions.json keeps only the
    last user message: for prompts of more than one message in the run's own test split."""
    from tunekit.runs.directory import read_split

    test = run_dir / "data" / "test.jsonl"
    if Path(report.get("test_data", "")).resolve() != test.resolve() or not test.is_file():
        return {}  # evaluated on another file (--data): its prompts are the last messages only
    return {
        ex.where: [{"role": m.role, "content": m.content} for m in ex.prompt]
        for ex in read_split(run_dir, "test")
        if len(ex.prompt) > 1
    }


def first_shown_as(rater: str, item: str) -> str:
    """Where `rater` sees the comparison's first reply, A or B: a coin flip fixed per rater and pair,
    so a rater who comes back sees the same order, and different raters see different orders."""
    return "A" if hashlib.sha256(f"{rater}\0{item}".encode()).digest()[0] % 2 == 0 else "B"


def rater_order(rater: str, pairs: list[dict]) -> list[dict]:
    """The pairs in the order `rater` is shown them: shuffled, with a seed of their own name."""
    seed = int.from_bytes(hashlib.sha256(rater.encode()).digest()[:8], "big")
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    return shuffled
