"""Split examples into train / validation / test: deterministic, stratified, duplicates kept together.

    split_examples(examples, ratios=(0.8, 0.1, 0.1), seed=42)
    -> {"train": [...], "validation": [...], "test": [...]}   # each in source order

Counts are whole examples: each label gets floor(n * ratio) per split, and its one or two leftover
examples go to the splits that are furthest behind their share over all labels so far, so each
label's count is within 1 of its share and the overall counts stay within about 1 of theirs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from tunekit.data.example import Example
from tunekit.data.formats import load_examples
from tunekit.errors import TunekitError
from tunekit.io import atomic_write_json, atomic_write_jsonl, check_output

SPLITS = ("train", "validation", "test")

Group = list[int]  # indices of examples with the same content hash, in source order


def split_examples(
    examples: Sequence[Example], ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 42
) -> dict[str, list[Example]]:
    """Split into train/validation/test by `ratios`, the same way every time for a given `seed`.

    Stratified by `Example.label` when every example has one (or by `Example.desirable`, KTO feedback). Examples with the same
    `content_hash()` go to the same split, so an exact duplicate never sits on both sides.
    """
    shares = _check_ratios(ratios)
    rng = random.Random(seed)  # never the global generator: the split must not depend on other code
    behind = [Fraction(0)] * len(SPLITS)  # per split: its exact share so far minus what it got
    chosen: dict[str, list[int]] = {name: [] for name in SPLITS}
    for groups in _strata(examples):
        targets = _allocate(sum(len(g) for g in groups), shares, behind)
        for group, name in _fill(groups, targets, rng):
            chosen[name] += group
    return {name: [examples[i] for i in sorted(chosen[name])] for name in SPLITS}


def _check_ratios(ratios: Sequence[float]) -> list[Fraction]:
    """The ratios as exact fractions (so 0.8 + 0.1 + 0.1 is exactly 1), or a `TunekitError`."""
    ok = (
        len(ratios) == 3
        and all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in ratios)
        and all(r >= 0 for r in ratios)
        and abs(sum(ratios) - 1) <= 1e-6
    )
    if not ok:
        raise TunekitError(
            f"--ratios: need 3 non-negative numbers for train, validation, test that sum to 1, "
            f"e.g. 0.8,0.1,0.1; got {list(ratios)}"
        )
    exact = [Fraction(r).limit_denominator(10**6) for r in ratios]
    return [r / sum(exact) for r in exact]


def _strata(examples: Sequence[Example]) -> list[list[Group]]:
    """Groups of equal content, per label (sorted by label) when every example has one (KTO feedback:
    per desirable/undesirable, so each split gets its share of both), else one stratum."""
    by_label = bool(examples) and all(e.label is not None for e in examples)
    by_feedback = bool(examples) and all(e.desirable is not None for e in examples)
    strata: dict[str, dict[str, Group]] = {}
    for i, example in enumerate(examples):
        key = example.label if by_label else str(example.desirable) if by_feedback else ""
        strata.setdefault(key, {}).setdefault(example.content_hash(), []).append(i)
    return [list(strata[key].values()) for key in sorted(strata)]


def _allocate(n: int, shares: list[Fraction], behind: list[Fraction]) -> list[int]:
    """Split `n` examples by `shares`; leftovers go to the splits furthest behind overall."""
    exact = [n * s for s in shares]
    counts = [math.floor(x) for x in exact]
    for i in range(len(counts)):
        behind[i] += exact[i] - counts[i]
    # Only splits whose share was rounded down may take one more, so each count stays within 1 of
    # its share; sorted() is stable, so ties go to the earlier split (plain largest remainder).
    rounded_down = [i for i in range(len(counts)) if exact[i] != counts[i]]
    for i in sorted(rounded_down, key=lambda i: -behind[i])[: n - sum(counts)]:
        counts[i] += 1
        behind[i] -= 1
    return counts


def _fill(groups: list[Group], targets: list[int], rng: random.Random) -> list[tuple[Group, str]]:
    """Deal the shuffled groups to the splits, each to the split that still needs the most examples."""
    order = list(groups)
    rng.shuffle(order)
    # Bigger duplicate groups first (stable sort keeps the shuffle among equal sizes): the single
    # examples dealt last then even out the counts. With no duplicates the counts are exact.
    order.sort(key=len, reverse=True)
    need = list(targets)
    dealt = []
    for group in order:
        i = max(range(len(need)), key=lambda i: need[i])
        need[i] -= len(group)
        dealt.append((group, SPLITS[i]))
    return dealt


def write_split(
    path: str | Path,
    out_dir: str | Path,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 42,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Load `path`, split it, and write train/validation/test.jsonl and manifest.json into `out_dir`.

    Each output line is the original record, so the files keep the user's schema and read back with the
    same format (and `columns`). Returns the manifest. Refuses (`TunekitError`), before reading, an
    `out_dir` that is a file or under one, and one where an output would replace `path` itself
    (`data split data/train.jsonl --out data`).
    """
    out = check_output(out_dir, "--out", folder=True)
    for name in (*(f"{s}.jsonl" for s in SPLITS), "manifest.json"):
        check_output(out / name, "--out", inputs=[path])
    examples = load_examples(path, format=format, columns=columns)
    splits = split_examples(examples, ratios=ratios, seed=seed)
    for name in SPLITS:
        atomic_write_jsonl(out / f"{name}.jsonl", [e.raw for e in splits[name]])
    rows = [
        {"line": e.line, "split": name, "hash": e.content_hash()} for name in SPLITS for e in splits[name]
    ]
    manifest = {
        "source": str(path),
        "format": examples[0].format,
        "seed": seed,
        "ratios": [float(r) for r in ratios],
        "counts": {name: len(splits[name]) for name in SPLITS},
        "rows": sorted(rows, key=lambda row: row["line"]),
    }
    # Written last: a manifest present means the three split files beside it are complete.
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
