"""Splitting: deterministic, ratios respected, stratified, duplicates together, and the manifest."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tunekit.data import Example, Message, load_examples, split_examples, write_split
from tunekit.errors import TunekitError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLITS = ("train", "validation", "test")


def example(text: str, line: int, label: str | None = None) -> Example:
    answer = label if label is not None else f"answer to {text}"
    return Example(
        messages=(Message("user", text), Message("assistant", answer)),
        label=label,
        source="x.jsonl",
        line=line,
    )


def unlabeled(n: int) -> list[Example]:
    return [example(f"q{i}", i + 1) for i in range(n)]


def labeled(sizes: dict[str, int]) -> list[Example]:
    # Labels interleaved in source order (a0 b0 c0 a1 b1 ...), as in a real file.
    pairs = sorted((i, label) for label, n in sizes.items() for i in range(n))
    return [example(f"{label} #{i}", line, label) for line, (i, label) in enumerate(pairs, start=1)]


def lines(parts: dict[str, list[Example]]) -> dict[str, list[int]]:
    return {name: [e.line for e in parts[name]] for name in SPLITS}


def test_same_seed_same_split_different_seed_different():
    examples = unlabeled(200)
    assert lines(split_examples(examples, seed=1)) == lines(split_examples(examples, seed=1))
    assert lines(split_examples(examples, seed=1)) != lines(split_examples(examples, seed=2))


def test_does_not_touch_the_global_random_state():
    import random

    random.seed(0)
    expected = random.random()
    random.seed(0)
    split_examples(unlabeled(50))
    assert random.random() == expected


@pytest.mark.parametrize(
    ("n", "ratios", "counts"),
    [
        (1000, (0.8, 0.1, 0.1), [800, 100, 100]),
        (10, (0.5, 0.3, 0.2), [5, 3, 2]),
        (7, (0.8, 0.1, 0.1), [5, 1, 1]),  # 5.6, 0.7, 0.7: the leftovers go to the largest remainders
        (5, (0.8, 0.1, 0.1), [4, 1, 0]),  # 4, 0.5, 0.5: a tie goes to the earlier split
        (9, (1 / 3, 1 / 3, 1 / 3), [3, 3, 3]),
        (20, (0.9, 0.1, 0.0), [18, 2, 0]),
        (5, (1, 0, 0), [5, 0, 0]),
        (0, (0.8, 0.1, 0.1), [0, 0, 0]),
    ],
)
def test_counts_follow_the_ratios(n, ratios, counts):
    parts = split_examples(unlabeled(n), ratios=ratios)
    assert [len(parts[name]) for name in SPLITS] == counts


def test_every_example_once_and_in_source_order():
    examples = unlabeled(101)
    parts = split_examples(examples, seed=7)
    all_lines = [line for name in SPLITS for line in lines(parts)[name]]
    assert sorted(all_lines) == list(range(1, 102))
    assert all(lines(parts)[name] == sorted(lines(parts)[name]) for name in SPLITS)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_stratified_by_label_within_one_of_each_share(seed):
    sizes = {"a": 50, "b": 23, "c": 7, "d": 120, "e": 1, "f": 35}
    ratios = (0.7, 0.2, 0.1)
    parts = split_examples(labeled(sizes), ratios=ratios, seed=seed)
    for name, ratio in zip(SPLITS, ratios, strict=True):
        got = Counter(e.label for e in parts[name])
        for label, n in sizes.items():
            assert abs(got[label] - n * ratio) <= 1, (name, label, got[label], n * ratio)
        assert abs(len(parts[name]) - sum(sizes.values()) * ratio) <= 1


def test_not_stratified_when_some_example_has_no_label():
    examples = labeled({"a": 30, "b": 30})
    examples.append(example("no label", 61))
    parts = split_examples(examples)
    assert [len(parts[name]) for name in SPLITS] == [49, 6, 6]


def test_exact_duplicates_stay_in_one_split():
    examples = unlabeled(60)
    # Lines 61..69: three copies each of three texts that also appear at lines 1, 2, 3.
    examples += [example(f"q{i % 3}", 61 + i) for i in range(9)]
    for seed in range(20):
        parts = split_examples(examples, seed=seed)
        where = {e.line: name for name in SPLITS for e in parts[name]}
        for i in range(3):
            copies = [i + 1] + [61 + j for j in range(9) if j % 3 == i]
            assert len({where[line] for line in copies}) == 1, (seed, copies)
        assert sum(len(parts[name]) for name in SPLITS) == 69


def test_labeled_duplicates_stay_together_too():
    examples = labeled({"a": 20, "b": 20})
    examples += [example("a #0", 41, "a"), example("a #0", 42, "a")]
    for seed in range(10):
        parts = split_examples(examples, seed=seed)
        where = {e.line: name for name in SPLITS for e in parts[name]}
        first = next(e.line for e in examples if e.messages[0].content == "a #0")
        assert where[first] == where[41] == where[42]


@pytest.mark.parametrize(
    "ratios", [(0.5, 0.5), (0.8, 0.3, -0.1), (0.8, 0.1, 0.2), (0.8, 0.1, float("nan")), ("0.8", 0.1, 0.1)]
)
def test_bad_ratios_name_the_flag(ratios):
    with pytest.raises(TunekitError, match="--ratios"):
        split_examples(unlabeled(10), ratios=ratios)


def test_ratios_tolerate_float_rounding():
    parts = split_examples(unlabeled(10), ratios=(0.7, 0.2, 0.1 + 5e-7))
    assert [len(parts[name]) for name in SPLITS] == [7, 2, 1]


# ---- write_split --------------------------------------------------------------------------------


def test_write_split_files_and_manifest(tmp_path):
    rows = [{"text": f"message {i}", "category": ["card", "pin", "fee"][i % 3]} for i in range(30)]
    rows[5] = dict(rows[2])  # an exact duplicate of line 3 (file line 4: the header is line 1)
    source = tmp_path / "data.csv"
    source.write_text("text,category\n" + "".join(f"{r['text']},{r['category']}\n" for r in rows))
    out = tmp_path / "split"

    manifest = write_split(source, out, ratios=(0.6, 0.2, 0.2), seed=3, columns={"label": "category"})

    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == str(source) and manifest["format"] == "classification"
    assert (manifest["seed"], manifest["ratios"]) == (3, [0.6, 0.2, 0.2])
    assert sum(manifest["counts"].values()) == 30
    assert [row["line"] for row in manifest["rows"]] == list(range(2, 32))  # each source line exactly once
    split_of = {row["line"]: row["split"] for row in manifest["rows"]}
    assert split_of[4] == split_of[7]  # the duplicate pair
    for name in SPLITS:
        written = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(written) == manifest["counts"][name] == Counter(split_of.values())[name]
        assert all(set(r) == {"text", "category"} for r in written)  # the user's own schema
        reread = load_examples(out / f"{name}.jsonl", columns={"label": "category"}) if written else []
        assert [e.line for e in reread] == list(range(1, len(written) + 1))
        assert {e.format for e in reread} <= {"classification"}


def test_write_split_is_deterministic(tmp_path):
    source = tmp_path / "pc.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n" for i in range(40)))
    first = write_split(source, tmp_path / "a", seed=5)
    second = write_split(source, tmp_path / "b", seed=5)
    assert first["rows"] == second["rows"]
    assert (tmp_path / "a" / "test.jsonl").read_bytes() == (tmp_path / "b" / "test.jsonl").read_bytes()


# ---- real files ---------------------------------------------------------------------------------


def test_real_banking77_stratified_split():
    path = SHARED_DATA / "banking77" / "train.csv"
    if not path.is_file():
        pytest.skip(f"../shared/data not present: {path} is missing (real-data tests run where it exists)")
    examples = load_examples(path, columns={"label": "category"})
    sizes = Counter(e.label for e in examples)
    parts = split_examples(examples, seed=42)
    assert [len(parts[name]) for name in SPLITS] == [8003, 1000, 1000]
    for name, ratio in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        got = Counter(e.label for e in parts[name])
        assert all(abs(got[label] - n * ratio) <= 1 for label, n in sizes.items())
