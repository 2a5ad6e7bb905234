"""The rating view's two requests: the pairs one rater sees, and storing one verdict.

Blind: the page sees only A and B. Which contender is A is fixed per rater and pair
(eval/pairs.py first_shown_as) and mapped back here, so the page never learns which is which,
and the registry keeps the verdict in the comparison's own order (first, second) with the side
`first` was shown on.
"""

from __future__ import annotations

from pathlib import Path

from tunekit.errors import TunekitError
from tunekit.eval.pairs import RUN_PREFIX, build_pairs, comparisons, first_shown_as, rater_order
from tunekit.runs import registry

PAGE_VERDICTS = ("A", "B", "tie", "both_bad")
MAX_RATER = 80
MAX_COMMENT = 4000


def _comparisons(run: dict) -> list[str]:
    """This run's own comparisons, then its fine-tuned replies against every other evaluated run's."""
    own = comparisons(run["run_dir"])
    others = [
        RUN_PREFIX + r["run_dir"]
        for r in registry.list_runs()
        if r["id"] != run["id"] and (Path(r["run_dir"]) / "predictions.json").is_file()
    ]
    return own + others


def _checked(run: dict, rater: str, comparison: str) -> tuple[str, str, list[str]]:
    rater = rater.strip()
    if not rater:
        raise TunekitError("give your name (the rater field): each rater's verdicts are kept apart")
    if len(rater) > MAX_RATER:
        raise TunekitError(f"a rater name is at most {MAX_RATER} characters")
    available = _comparisons(run)
    comparison = comparison or available[0]
    if comparison not in available:
        raise TunekitError(f"run {run['name']}: no comparison {comparison!r}; choose one of {available}")
    return rater, comparison, available


def rating_view(run: dict, rater: str, comparison: str) -> dict:
    """The pairs of `comparison` in `rater`'s order, each as prompt, A, B and the verdict (A, B, tie,
    both_bad or None) and comment `rater` gave it."""
    rater, comparison, available = _checked(run, rater, comparison)
    pairs, identical = build_pairs(run["run_dir"], comparison)
    given = {r["item"]: r for r in registry.get_ratings(run["id"], comparison) if r["rater"] == rater}
    shown = []
    for p in rater_order(rater, pairs):
        first_is_a = first_shown_as(rater, p["item"]) == "A"
        a, b = (p["first"], p["second"]) if first_is_a else (p["second"], p["first"])
        mine = given.get(p["item"])
        verdict = mine and _to_page(mine["verdict"], first_is_a)
        shown.append(
            {
                "item": p["item"],
                "prompt": p["prompt"],
                "context": (p.get("prompt_messages") or [])[:-1],
                "reference": p["reference"],
                "a": a["reply"],
                "b": b["reply"],
                "verdict": verdict,
                "comment": mine["comment"] if mine else "",
            }
        )
    return {
        "run": run["name"],
        "comparison": comparison,
        "comparisons": available,
        "identical": identical,
        "pairs": shown,
        "rated": sum(1 for s in shown if s["verdict"]),
        "raters": sorted({r["rater"] for r in registry.get_ratings(run["id"], comparison)}),
    }


def store_rating(run: dict, body: dict) -> dict:
    """Store one verdict given on the page (A, B, tie, both_bad) in the comparison's own order."""
    rater, comparison, _ = _checked(run, str(body.get("rater", "")), str(body.get("comparison", "")))
    verdict, comment = body.get("verdict"), str(body.get("comment") or "")
    if verdict not in PAGE_VERDICTS:
        raise TunekitError(f"verdict {verdict!r}: give one of {', '.join(PAGE_VERDICTS)}")
    if len(comment) > MAX_COMMENT:
        raise TunekitError(f"a comment is at most {MAX_COMMENT} characters")
    pairs, _ = build_pairs(run["run_dir"], comparison)
    pair = next((p for p in pairs if p["item"] == body.get("item")), None)
    if pair is None:
        raise TunekitError(
            f"no pair {body.get('item')!r} in {comparison}: the run was evaluated again; reload the page"
        )
    shown = first_shown_as(rater, pair["item"])
    stored = {"A": "first", "B": "second"} if shown == "A" else {"A": "second", "B": "first"}
    registry.save_rating(
        run["id"], comparison, pair["item"], rater, stored.get(verdict, verdict), shown, comment, pair
    )
    mine = {r["item"] for r in registry.get_ratings(run["id"], comparison) if r["rater"] == rater}
    return {"rated": len(mine & {p["item"] for p in pairs}), "total": len(pairs)}


def _to_page(verdict: str, first_is_a: bool) -> str:
    """A stored verdict (first, second, tie, both_bad) as this rater's page shows it."""
    if verdict in ("tie", "both_bad"):
        return verdict
    return "A" if (verdict == "first") == first_is_a else "B"
