"""Human (or judge) verdicts on reply pairs -> preference data, a win rate, and agreement.

A rating is one rater's verdict on one pair of replies to the same prompt, in the comparison's own
order (`first`, `second`: e.g. base_few_shot and finetuned), whatever order the rater saw them in:

    {"item": "3f2a...", "rater": "ana", "verdict": "second", "comment": "",
     "pair": {"prompt": "Reset my password?", "first": {"name": "base_few_shot", "reply": "..."},
              "second": {"name": "finetuned", "reply": "..."}}}

Several raters may rate the same pair: the pair's decision is their majority (a split vote is a
disagreement, left out of the data like ties and both-bad, and counted). The pairs decided for one
side become preference rows (`{"prompt", "chosen", "rejected"}`, tunekit's `preference` format) for
`task: reward` or `task: dpo`.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

VERDICTS = ("first", "second", "tie", "both_bad")
Z95 = 1.959963984540054


def decide(verdicts: list[str]) -> str:
    """The majority verdict of one pair's raters; `disagreement` when the top verdicts tie."""
    counts = Counter(verdicts).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "disagreement"
    return counts[0][0]


def decisions(ratings: list[dict]) -> dict[str, tuple[str, dict]]:
    """item -> (its raters' decision, the pair), in the order the items were first rated."""
    by_item: dict[str, list[dict]] = {}
    for r in ratings:
        by_item.setdefault(r["item"], []).append(r)
    return {item: (decide([r["verdict"] for r in rs]), rs[0]["pair"]) for item, rs in by_item.items()}


def preference_rows(ratings: list[dict]) -> tuple[list[dict], Counter]:
    """The preference rows of the pairs decided for one side, and the count of every decision
    (first, second, tie, both_bad, disagreement): exported + left out = pairs rated."""
    rows, counts = [], Counter()
    for decision, pair in decisions(ratings).values():
        counts[decision] += 1
        if decision in ("first", "second"):
            loser = "second" if decision == "first" else "first"
            rows.append(
                {
                    "prompt": pair.get("prompt_messages") or pair["prompt"],
                    "chosen": _answer(pair, decision),
                    "rejected": _answer(pair, loser),
                }
            )
    return rows, counts


def _answer(pair: dict, side: str):
    """A reply as the prompt's form wants it: a string, or one assistant message after a message list."""
    reply = pair[side]["reply"]
    return [{"role": "assistant", "content": reply}] if pair.get("prompt_messages") else reply


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(k/n, low, high): the Wilson score interval of a proportion (95% by default); nan when n = 0.
    Unlike the plain normal interval it stays inside [0, 1] and is honest for small n."""
    if n == 0:
        return (math.nan, math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (p, max(0.0, centre - half), min(1.0, centre + half))


def win_rate(verdicts: list[str]) -> dict:
    """How often `second` beat `first` among the decisive verdicts (wins / (wins + losses)), with its
    Wilson 95% CI; ties, both-bad and disagreements are counted beside it, not in it."""
    counts = Counter(verdicts)
    wins, losses = counts["second"], counts["first"]
    rate, lo, hi = wilson_ci(wins, wins + losses)
    return {
        "wins": wins,
        "losses": losses,
        "ties": counts["tie"],
        "both_bad": counts["both_bad"],
        "disagreements": counts["disagreement"],
        "n": len(verdicts),
        "win_rate": rate,
        "ci_low": lo,
        "ci_high": hi,
    }


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters over the same items: (observed - chance) / (1 - chance), chance
    from each rater's own category frequencies. None when chance agreement is 1 (one category)."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs paired verdicts, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    chance = sum(ca[c] * cb[c] for c in ca) / (n * n)
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def fleiss_kappa(table: list[list[int]]) -> float | None:
    """Fleiss' kappa from an items x categories table of counts (every row sums to the same number
    of raters, at least 2). None when chance agreement is 1 (every rating in one category)."""
    if not table:
        return None
    raters = sum(table[0])
    if raters < 2 or any(sum(row) != raters for row in table):
        raise ValueError("fleiss_kappa needs the same number (>= 2) of ratings for every item")
    n_items = len(table)
    p_item = [(sum(c * c for c in row) - raters) / (raters * (raters - 1)) for row in table]
    p_cat = [sum(row[j] for row in table) / (n_items * raters) for j in range(len(table[0]))]
    observed, chance = sum(p_item) / n_items, sum(p * p for p in p_cat)
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def agreement(ratings: list[dict]) -> dict | None:
    """Inter-rater agreement over the four verdicts: Cohen's kappa for two raters (the items both
    rated), Fleiss' kappa for more (the items every rater rated); None with fewer than two raters."""
    by_item: dict[str, dict[str, str]] = {}
    for r in ratings:
        by_item.setdefault(r["item"], {})[r["rater"]] = r["verdict"]
    raters = sorted({r["rater"] for r in ratings})
    if len(raters) < 2:
        return None
    shared = [v for v in by_item.values() if len(v) == len(raters)]
    if len(raters) == 2:
        a, b = raters
        kappa = cohen_kappa([v[a] for v in shared], [v[b] for v in shared])
        method = "cohen"
    else:
        table = [[Counter(v.values())[c] for c in VERDICTS] for v in shared]
        kappa, method = fleiss_kappa(table), "fleiss"
    return {"method": method, "kappa": kappa, "raters": raters, "items": len(shared)}


def ratings_report(ratings: list[dict]) -> dict:
    """The win rate of the pairs' decisions, the raters and their agreement, for one comparison."""
    decided = decisions(ratings)
    names = next(iter(decided.values()))[1] if decided else {}
    return {
        "first": names.get("first", {}).get("name"),
        "second": names.get("second", {}).get("name"),
        "ratings": len(ratings),
        "pairs": len(decided),
        "raters": dict(Counter(r["rater"] for r in ratings)),
        "human": win_rate([d for d, _ in decided.values()]),
        "agreement": agreement(ratings),
        "position": position_counts(ratings),
    }


def position_counts(ratings: list[dict]) -> dict[str, int]:
    """How often raters picked the reply shown as A and as B (position bias: far from even over many
    pairs, the order influenced them; the A/B coin flip keeps it out of the win rate)."""
    flip = {"A": "B", "B": "A"}
    sides = [
        r["first_shown_as"] if r["verdict"] == "first" else flip[r["first_shown_as"]]
        for r in ratings
        if r["verdict"] in ("first", "second") and r.get("first_shown_as") in flip
    ]
    return {"A": sides.count("A"), "B": sides.count("B")}


def describe_win_rate(w: dict, first: str, second: str) -> str:
    """One line: `finetuned beat base_few_shot in 7 of 9 decisive pairs: 0.778 [0.453, 0.937] (95%
    Wilson); 2 ties, 1 both bad, 0 split votes`."""
    if w["wins"] + w["losses"] == 0:
        head = f"no decisive pair between {first} and {second}"
    else:
        head = (
            f"{second} beat {first} in {w['wins']} of {w['wins'] + w['losses']} decisive pairs: "
            f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] (95% Wilson)"
        )
    return f"{head}; {w['ties']} ties, {w['both_bad']} both bad, {w['disagreements']} split votes"


def describe_agreement(a: dict | None) -> str:
    """One line on inter-rater agreement, or why there is none."""
    if a is None:
        return "inter-rater agreement: one rater only"
    name = "Cohen's" if a["method"] == "cohen" else "Fleiss'"
    kappa = "undefined (every verdict the same)" if a["kappa"] is None else f"{a['kappa']:.3f}"
    return f"inter-rater agreement: {name} kappa {kappa} over {a['items']} pairs rated by all of {', '.join(a['raters'])}"


def write_pairs(path: str | Path, rows: list[dict]) -> None:
    """The preference rows as JSONL, written atomically."""
    from tunekit.io import atomic_write_jsonl

    atomic_write_jsonl(path, rows)


def export_ratings(ratings: list[dict], comparison: str | None, out: str | Path | None, run: str) -> dict:
    """The report of one comparison's ratings (the only one rated when `comparison` is None), and
    its preference rows written to `out`; `run` names the run in messages."""
    from tunekit.errors import TunekitError

    rated = list(dict.fromkeys(r["comparison"] for r in ratings))
    if not rated:
        raise TunekitError(
            f"run {run} has no ratings yet: rate its replies in `tunekit ui` (Rate the replies)"
        )
    if comparison is None and len(rated) > 1:
        raise TunekitError(
            f"run {run} has ratings of {len(rated)} comparisons; choose one with --comparison: {', '.join(rated)}"
        )
    comparison = comparison or rated[0]
    if comparison not in rated:
        raise TunekitError(f"run {run} has no ratings of {comparison!r}; rated: {', '.join(rated)}")
    chosen = [r for r in ratings if r["comparison"] == comparison]
    rows, counts = preference_rows(chosen)
    if out is not None:
        write_pairs(out, rows)
    return ratings_report(chosen) | {
        "comparison": comparison,
        "exported": len(rows),
        "left_out": {k: counts[k] for k in ("tie", "both_bad", "disagreement")},
        "out": str(out) if out is not None else None,
    }


def print_ratings_report(report: dict) -> None:
    """What `tunekit data ratings` prints: counts, the human win rate, agreement, what was written."""
    from tunekit.console import out

    raters = ", ".join(f"{name} {n}" for name, n in report["raters"].items())
    out.print(f"{report['comparison']}: {report['ratings']} ratings of {report['pairs']} pairs by {raters}")
    out.print(describe_win_rate(report["human"], report["first"], report["second"]))
    out.print(describe_agreement(report["agreement"]))
    pos = report["position"]
    out.print(f"raters picked the reply shown as A {pos['A']} times, as B {pos['B']} times")
    left = report["left_out"]
    where = f" -> {report['out']}" if report["out"] else " (give --out FILE to write them)"
    out.print(
        f"preference pairs: {report['exported']}{where}; left out: {left['tie']} ties, "
        f"{left['both_bad']} both bad, {left['disagreement']} split votes"
    )
