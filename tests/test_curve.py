"""`tunekit data curve` (issue 26 item 3): nested subsets, the learning-curve fit and its bootstrap
CI, the test set's power, checked on hand-computed cases; then whole curves on the tiny model, one
for label data (a label head) and one for JSON replies, which resume without retraining."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from tunekit.cli import app
from tunekit.config import load_config
from tunekit.data.example import Example, Message
from tunekit.errors import TunekitError
from tunekit.iterate.curve import (
    analyse,
    fit_log_linear,
    guessed_fields,
    mde_paired,
    mde_unpaired,
    nested_order,
    parse_fractions,
    run_curve,
    slope_ci,
    subset_sizes,
)


def _labelled(labels: list[str]) -> list[Example]:
    return [Example((Message("user", f"text {i}"),), label=lab) for i, lab in enumerate(labels)]


def test_every_prefix_keeps_the_label_mix_and_the_order_is_reproducible():
    examples = _labelled(["a"] * 60 + ["b"] * 20)
    order = nested_order(examples, seed=3)
    assert sorted(order) == list(range(80)) and order == nested_order(examples, seed=3)
    assert order != nested_order(examples, seed=4)
    for n, want_b in ((4, 1), (20, 5), (40, 10)):
        assert Counter(examples[i].label for i in order[:n])["b"] == want_b
    assert subset_sizes(80, [0.125, 0.25, 0.5, 1.0]) == [10, 20, 40, 80]
    assert subset_sizes(3, [0.1, 0.2, 1.0]) == [1, 3]  # at least one row; equal sizes merge


def test_the_log_linear_fit_and_its_slope_per_doubling():
    a, b = fit_log_linear([1, 2, 4], [0.2, 0.4, 0.6])  # y = 0.2 + 0.2 log2(n)
    assert (a, b) == (pytest.approx(0.2), pytest.approx(0.2))
    # x = 0, 1, 3 (log2 of 1, 2, 8); y = 0, 3, 3: slope = sum(dx dy) / sum(dx^2) = 4.0 / 4.667
    assert fit_log_linear([1, 2, 8], [0, 3, 3])[1] == pytest.approx(6 / 7)
    assert fit_log_linear([0, 4, 4], [0.1, 0.5, 0.7]) is None  # n = 0 is left out; one distinct n left


def test_the_slope_ci_is_a_paired_bootstrap_over_the_test_examples():
    rising = [[0] * 80 + [1] * 20, [0] * 50 + [1] * 50, [0] * 20 + [1] * 80]  # 0.2, 0.5, 0.8
    slope, lo, hi = slope_ci([10, 20, 40], rising)
    assert slope == pytest.approx(0.3) and 0.2 < lo < 0.3 < hi < 0.4
    # The same examples right at every size: no slope and no spread at all.
    flat = [[0, 1] * 10] * 3
    assert slope_ci([10, 20, 40], flat) == (pytest.approx(0.0), pytest.approx(0.0), pytest.approx(0.0))
    # Different examples right, same share: slope 0, but the bootstrap sees the noise.
    noisy = [[0, 1] * 10, [1, 0] * 10, [0, 1] * 10]
    slope, lo, hi = slope_ci([10, 20, 40], noisy)
    assert slope == pytest.approx(0.0) and lo < 0 < hi


def test_the_smallest_detectable_difference():
    # (1.96 + 0.8416) * sqrt(2 * 0.5 * 0.5 / 100) = 2.8016 * 0.07071
    assert mde_unpaired(0.5, 100) == pytest.approx(0.19810, abs=1e-4)
    assert mde_unpaired(1.0, 100) == mde_unpaired(0.995, 100)  # a perfect score still has noise
    # Connor: psi = 0.1, d = 0.05 needs (1.96 sqrt(.1) + 0.8416 sqrt(.0975))^2 / .0025 = 311.6 examples.
    assert mde_paired(0.1, 312) == pytest.approx(0.05, abs=2e-4)
    assert mde_paired(0.1, 1000) < mde_paired(0.1, 312) < mde_paired(0.1, 100)
    assert mde_paired(0.0, 100) is None
    assert mde_paired(0.01, 5) is None  # 5 examples cannot detect anything the disagreement allows


def _rows(correct: list[int], labels: list[str]) -> list[dict]:
    return [
        {"reference": lab, "label": lab, "correct": float(c), "score": float(c)}
        for c, lab in zip(correct, labels, strict=True)
    ]


def test_analyse_ranks_the_groups_by_what_a_doubling_gives_the_test_set():
    labels = ["up"] * 40 + ["flat"] * 40
    results = [  # "up" rises 0.25 a doubling, "flat" stays at 0.5
        _rows([1] * 10 + [0] * 30 + [0, 1] * 20, labels),
        _rows([1] * 20 + [0] * 20 + [0, 1] * 20, labels),
        _rows([1] * 30 + [0] * 10 + [0, 1] * 20, labels),
    ]
    counts = [Counter(up=n, flat=n) for n in (5, 10, 20)]
    a = analyse([10, 20, 40], results, counts, "accuracy")
    assert [p["accuracy"] for p in a["curve"]["points"]] == [0.375, 0.5, 0.625]
    assert a["curve"]["gain_per_doubling"] == pytest.approx(0.125)
    up, flat = a["groups"]
    assert up["group"] == "up" and up["gain_per_doubling"] == pytest.approx(0.25) and up["gain_ci_low"] > 0
    assert up["predicted_gain"] == pytest.approx(0.25) and up["test_set_gain"] == pytest.approx(0.125)
    assert "about 20 more examples of `up` for +0.25" in up["advice"]
    assert flat["gain_per_doubling"] == pytest.approx(0.0) and "not significant" in flat["advice"]
    assert a["targets"] == ["up"]
    # The two largest runs disagree on 10 of 80 examples (the "up" ones that became right).
    assert a["power"]["discordant_share"] == pytest.approx(10 / 80)
    assert a["power"]["mde_paired"] == pytest.approx(mde_paired(0.125, 80))
    # A doubling cannot promise more than the room left to 100%.
    top = analyse(
        [10, 20],
        [_rows([1, 0], ["g", "g"]), _rows([1, 1], ["g", "g"])],
        [Counter(g=1), Counter(g=2)],
        "accuracy",
    )
    assert (
        top["groups"][0]["gain_per_doubling"] == pytest.approx(0.5)
        and top["groups"][0]["predicted_gain"] == 0.0
    )


def _records(intents: list[str], priorities: list[str], said: list[tuple[str, str]]) -> list[dict]:
    rows = []
    for intent, prio, (i2, p2) in zip(intents, priorities, said, strict=True):
        ref = json.dumps({"intent": intent, "priority": prio})
        pred = json.dumps({"intent": i2, "priority": p2})
        rows.append({"reference": ref, "label": None, "correct": float(ref == pred), "score": 0.0,
                     "prediction": pred})  # fmt: skip
    return rows


def test_a_field_answered_with_one_value_gets_no_advice():
    """A model that writes the same priority whatever the ticket (a plateau) is right on that value's
    tickets only; which value it guesses moves between sizes, so the per-value slopes would point the
    user at the wrong groups: the field is reported as a guess, its groups get no advice."""
    intents = ["a", "b"] * 10
    prios = ["P1"] * 7 + ["P2"] * 7 + ["P3"] * 6  # the most common reference value: 35%
    sizes = [10, 20, 40]
    results = []
    for k, guess in enumerate(["P3", "P1", "P2"]):
        # intent "a" is learned as the data grows (right on 4, 7, 10 of its 10), intent "b" always;
        # the priority is `guess` on 15 of 20 tickets and the truth (P3) on the other 5.
        said = [
            (intent if (i % 2 == 1 or i // 2 < 4 + 3 * k) else "x", guess if i < 15 else prios[i])
            for i, intent in enumerate(intents)
        ]
        results.append(_records(intents, prios, said))
    counts = [Counter({"intent=a": n, "intent=b": n, "priority=P1": n, "priority=P2": n,
                       "priority=P3": n}) for n in sizes]  # fmt: skip
    a = analyse(sizes, results, counts, "exact_match")
    (g,) = a["guessed"]
    assert g["field"] == "priority" and [s["value"] for s in g["sizes"]] == ["P3", "P1", "P2"]
    assert [s["share"] for s in g["sizes"]] == [1.0, 0.75, 0.75]  # the last 5 are P3 too
    assert "mostly one guess" in g["advice"] and "more than 35%" in g["advice"]
    by_name = {e["group"]: e for e in a["groups"]}
    assert all("advice" not in by_name[f"priority={v}"] for v in ("P1", "P2", "P3"))
    assert "one guess" in by_name["priority=P1"]["note"]
    assert all(not t.startswith("priority=") for t in a["targets"])
    assert "advice" in by_name["intent=a"]  # the field the model does read keeps its advice

    # A spread of predictions as wide as the references' is no guess; neither is a field whose
    # references are mostly one value (then answering it is what a good model does).
    assert (
        guessed_fields(_records(intents, prios, list(zip(intents, prios, strict=True))), "prediction") == {}
    )
    skewed = ["P2"] * 16 + ["P1"] * 4
    assert guessed_fields(_records(intents, skewed, [(i, "P2") for i in intents]), "prediction") == {}
    # A classifier answering one label for most inputs is a guess too.
    labels = ["x", "y", "z", "w"] * 5
    rows = [{"reference": lab, "label": lab, "correct": float(lab == "x"), "score": 0.0,
             "prediction": "x"} for lab in labels]  # fmt: skip
    assert guessed_fields(rows, "prediction") == {"label": ("x", 1.0, 0.25)}


def test_fractions_are_checked():
    assert parse_fractions("1,0.25,0.5") == [0.25, 0.5, 1.0]
    for bad in ("1", "0,1", "0.5,1.5", "half,1"):
        with pytest.raises(TunekitError, match="--fractions"):
            parse_fractions(bad)


def _label_config(tmp_path, tiny_model_dir):
    lines = ["text,label"]
    words = {"refund": "money back please", "login": "cannot sign in", "ship": "parcel is late"}
    for i in range(72):
        lab = list(words)[i % 3]
        lines.append(f"{words[lab]} number {i},{lab}")
    data = tmp_path / "intents.csv"
    data.write_text("\n".join(lines) + "\n")
    raw = {
        "model": str(tiny_model_dir),
        "method": "lora",
        "data": {"train": str(data)},
        "train": {"epochs": 1, "batch_size": 8, "max_length": 32, "seed": 0},
        "output_dir": str(tmp_path / "unused"),
    }
    path = tmp_path / "curve.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_curve_on_label_data_trains_each_size_on_the_same_test_split_and_resumes(tmp_path, tiny_model_dir):
    cfg = load_config(_label_config(tmp_path, tiny_model_dir))
    out = tmp_path / "curve"
    a = run_curve(cfg, out, [0.25, 0.5, 1.0], quiet=True)
    sizes = [r["train_examples"] for r in a["runs"]]
    n_train = len((out / "data" / "train.jsonl").read_text().splitlines())
    assert sizes == subset_sizes(n_train, [0.25, 0.5, 1.0]) and sizes[-1] == n_train
    tests = {(out / f"n-{n:05d}" / "data" / "test.jsonl").read_text() for n in sizes}
    assert len(tests) == 1  # every size is scored on the same held-out examples
    trains = [set((out / f"n-{n:05d}" / "data" / "train.jsonl").read_text().splitlines()) for n in sizes]
    assert trains[0] < trains[1] < trains[2]  # nested
    assert yaml.safe_load((out / f"n-{sizes[0]:05d}" / "config.yaml").read_text())["task"] == "classify"
    saved = json.loads((out / "curve.json").read_text())
    assert saved["curve"]["metric"] == "accuracy" and len(saved["curve"]["points"]) == 3
    assert {g["group"] for g in saved["groups"]} == {"refund", "login", "ship"}
    assert saved["power"]["test_examples"] == 7 and saved["power"]["mde_unpaired"] > 0.3
    assert "| training examples | accuracy |" in (out / "curve.md").read_text()

    # Again: every size is read back, none trained again.
    stamps = {n: (out / f"n-{n:05d}" / "train_summary.json").stat().st_mtime_ns for n in sizes}
    again = run_curve(cfg, out, [0.25, 0.5, 1.0], quiet=True)
    assert again["curve"] == a["curve"]
    assert stamps == {n: (out / f"n-{n:05d}" / "train_summary.json").stat().st_mtime_ns for n in sizes}


def test_the_cli_curve_on_json_replies_groups_by_field(tmp_path, tiny_model_dir, capsys):
    from typer.testing import CliRunner

    rows = []
    for i in range(40):
        rec = {"kind": ["a", "b"][i % 2], "size": ["s", "m", "l"][i % 3]}
        rows.append(
            {"messages": [{"role": "user", "content": f"item {i} is {rec['kind']}"},
                          {"role": "assistant", "content": json.dumps(rec)}]}
        )  # fmt: skip
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "data": {"train": str(data)},
                "eval": {"max_new_tokens": 8},
                "train": {"epochs": 1, "batch_size": 8, "max_length": 64, "seed": 0},
            }
        )  # fmt: skip
    )
    out = tmp_path / "c"
    result = CliRunner().invoke(
        app, ["data", "curve", str(config), "--fractions", "0.5,1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "training examples:" in result.output and "test set: 4 examples detect" in result.output
    groups = {g["group"] for g in json.loads((out / "curve.json").read_text())["groups"]}
    assert groups <= {"kind=a", "kind=b", "size=s", "size=m", "size=l"} and groups
    bad = subprocess.run(
        [sys.executable, "-m", "tunekit", "data", "curve", str(config), "--fractions", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "--fractions '1': give two or more shares" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert math.isfinite(json.loads((out / "curve.json").read_text())["power"]["mde_unpaired"])
