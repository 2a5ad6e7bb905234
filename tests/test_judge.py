"""The LLM judge: verdict parsing on crafted replies, the position swap, the figures against hand
counts, and real judges: a tiny model behind a real OpenAI-compatible endpoint (`tunekit serve`'s
app), one trained to always answer `[[B]]` (a purely positional judge, which the swap must turn
into ties), and a local model spec whose random replies must all be counted unparseable."""

import json

import pytest
from typer.testing import CliRunner

from conftest import running, train_to_answer
from tunekit.cli import app
from tunekit.data.ratings import cohen_kappa
from tunekit.errors import TunekitError
from tunekit.eval.judge import (
    DEFAULT_RUBRIC,
    EndpointJudge,
    combine,
    judge_prompt,
    judge_report,
    judge_run,
    load_rubric,
    parse_verdict,
)
from tunekit.eval.pairs import build_pairs
from tunekit.runs import registry


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Assistant A is more accurate. [[A]]", "A"),
        ("Final verdict: [[b]]", "B"),
        ("Both are equally good. [[C]]", "tie"),
        ("[[ tie ]]", "tie"),
        ("[[A]] because ... so again [[A]]", "A"),
        ("Assistant A is better.", None),  # no verdict in the asked-for format
        ("[[A]] no wait, [[B]]", None),  # contradicting itself: no verdict, not a guess
        ("[A]", None),
        ("", None),
    ],
)
def test_parse_verdict_on_crafted_replies(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_the_swap_maps_both_orders_back_and_cancels_a_positional_judge():
    assert combine("A", "B") == ("first", False)  # first shown as A wins, then as B wins
    assert combine("B", "A") == ("second", False)
    assert combine("tie", "tie") == ("tie", False)
    assert combine("A", "A") == ("tie", True)  # always the first position: order, not content
    assert combine("A", "tie") == ("tie", True)
    assert combine(None, "A") == ("unparseable", False)
    assert combine("B", None) == ("unparseable", False)


def test_judge_prompt_fills_the_rubric_and_leaves_other_braces_alone():
    pair = {
        "prompt": "2+2?",
        "reference": "4",
        "prompt_messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    }
    text = judge_prompt('Q: {prompt} R: {reference} A: {a} B: {b} JSON: {"verdict": "{x}"}', pair, "4", "5")
    assert text == 'Q: system: Be brief.\n2+2? R: 4 A: 4 B: 5 JSON: {"verdict": "{x}"}'
    assert "{a}" not in judge_prompt(DEFAULT_RUBRIC, {"prompt": "p"}, "{b}", "y")  # a reply may hold braces
    assert "[[A]]" in DEFAULT_RUBRIC and "position" in DEFAULT_RUBRIC


def test_rubric_file_errors_name_the_missing_placeholder(tmp_path):
    bad = tmp_path / "rubric.txt"
    bad.write_text("Judge {prompt} and {a}.")
    with pytest.raises(TunekitError, match=r"--rubric .*rubric.txt: has no \{b\}"):
        load_rubric(bad)
    with pytest.raises(TunekitError, match="cannot read"):
        load_rubric(tmp_path / "missing.txt")
    bad.write_text("Judge {prompt}: {a} or {b}? [[A]]/[[B]]/[[C]]")
    assert load_rubric(bad).startswith("Judge")


def _v(item: str, verdict: str, v1="A", v2="B", inconsistent=False) -> dict:
    return {
        "item": item,
        "prompt": item,
        "verdict": verdict,
        "inconsistent": inconsistent,
        "first_as_a": {"verdict": v1, "reply": "r1"},
        "second_as_a": {"verdict": v2, "reply": "r2"},
    }


def test_judge_figures_against_hand_counts():
    verdicts = [
        _v("0", "second", "B", "A"),
        _v("1", "second", "B", "A"),
        _v("2", "first", "A", "B"),
        _v("3", "tie", "A", "A", inconsistent=True),
        _v("4", "unparseable", None, "A"),
        _v("5", "second", "B", "A"),
    ]
    human = {"0": "second", "1": "first", "2": "first", "3": "both_bad", "4": "second", "6": "second"}
    got = judge_report(verdicts, human)
    assert (got["pairs"], got["unparseable"], got["unparseable_replies"], got["inconsistent"]) == (6, 1, 1, 1)
    assert got["position"] == {"A": 7, "B": 4, "tie": 0}
    assert (got["win"]["wins"], got["win"]["losses"], got["win"]["ties"]) == (3, 1, 1)
    h = got["human"]
    # shared and parsed: items 0..3 (4 unparseable, 5 unrated, 6 not judged); both_bad counts as a tie
    assert h["pairs"] == 4 and h["unparseable"] == 1
    assert h["kappa"] == pytest.approx(
        cohen_kappa(["second", "second", "first", "tie"], ["second", "first", "first", "tie"])
    )
    assert (h["decisive"], h["accuracy"]) == (3, pytest.approx(2 / 3))  # items 0 and 2 right, 1 wrong


# ---------------------------------------------------------------------------------------------
# Real judges on an evaluated run's pairs


@pytest.fixture
def evaluated(tmp_path, monkeypatch):
    """A registered run whose predictions.json holds 4 differing pairs, two of them rated by people."""
    from tunekit.config import config_from_dict

    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [
        {"source": f"t:{i}", "prompt": f"code of item {i}?", "reference": f"C-{i}", "base": "", "base_few_shot": f"maybe {i}", "finetuned": f"C-{i}"}
        for i in range(4)
    ]  # fmt: skip
    (run_dir / "predictions.json").write_text(json.dumps(rows))
    (run_dir / "report.json").write_text(
        json.dumps({"contenders": {"base": {}, "base_few_shot": {}, "finetuned": {}}})
    )
    (tmp_path / "d.jsonl").write_text("")
    cfg = config_from_dict(
        {"model": "m", "data": {"train": str(tmp_path / "d.jsonl")}, "output_dir": str(run_dir)}
    )
    registry.register_run(run_dir, cfg)
    run = registry.get_run("run")
    pairs, _ = build_pairs(run_dir, "base_few_shot|finetuned")
    for p, verdict in zip(pairs[:2], ["second", "first"], strict=True):
        registry.save_rating(run["id"], "base_few_shot|finetuned", p["item"], "ana", verdict, "A", "", p)
    return run_dir


@pytest.fixture(scope="module")
def b_sayer(tiny_family_dir, tmp_path_factory):
    """A tiny run trained to answer every judge prompt `[[B]]`: a judge that only ever picks the
    second position. (make_tiny's base, unlike make_tiny_llama's, can learn to stop.)"""
    folder = tmp_path_factory.mktemp("judge")
    question = "Which answer is better, code of item {i}? A: maybe {i} B: C-{i}"  # the judge's prompts
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEKIT_HOME", str(folder / "home"))
        steps = {"max_steps": 12, "learning_rate": 3e-2, "batch_size": 4, "max_length": 64, "seed": 0}
        return train_to_answer(
            tiny_family_dir("llama"), folder / "bsayer", "[[B]]", question=question, train=steps
        )


def test_a_positional_judge_behind_a_real_endpoint_is_cancelled_by_the_swap(
    evaluated, b_sayer, tmp_path, monkeypatch
):
    from tunekit.ship.serve import create_app, load_models

    monkeypatch.setenv("TUNEKIT_JUDGE_API_KEY", "k3y")
    rubric = tmp_path / "short.txt"
    rubric.write_text("Which answer is better, {prompt}? A: {a} B: {b}")
    with running(create_app(load_models([b_sayer]), api_key="k3y")) as url:
        r = CliRunner().invoke(
            app,
            [
                "eval",
                str(evaluated),
                "--judge",
                "bsayer",
                "--judge-url",
                f"{url}/v1",
                "--rubric",
                str(rubric),
                "--judge-max-tokens",
                "8",
            ],
        )
    assert r.exit_code == 0, r.output
    report = json.loads((evaluated / "judge.json").read_text())
    singles = [v[k]["verdict"] for v in report["verdicts"] for k in ("first_as_a", "second_as_a")]
    assert singles == ["B"] * 8, [v["first_as_a"]["reply"] for v in report["verdicts"]]
    assert report["inconsistent"] == 4 and report["unparseable"] == 0
    assert report["win"]["ties"] == 4 and report["win"]["wins"] == report["win"]["losses"] == 0
    assert report["human"]["pairs"] == 2 and report["human"]["accuracy"] == 0.0  # it called both even
    assert "inconsistent when swapped: 4" in r.output and "judge vs people on 2 rated pairs" in r.output


def test_a_random_local_model_as_judge_is_counted_unparseable_never_dropped(evaluated, tiny_model_dir):
    from tunekit.eval.judge import LocalJudge

    local = judge_run(evaluated, LocalJudge(str(tiny_model_dir), max_tokens=6))
    assert local["pairs"] == 4 and local["unparseable"] == 4 and local["unparseable_replies"] == 8
    assert local["win"]["n"] == 0 and local["human"]["pairs"] == 0 and local["human"]["unparseable"] == 2
    assert all(v["first_as_a"]["reply"] for v in local["verdicts"])  # the judge's own words are kept
    r = CliRunner().invoke(
        app, ["eval", str(evaluated), "--judge", str(tiny_model_dir), "--judge-max-tokens", "6"]
    )
    assert r.exit_code == 0, r.output
    assert "unparseable: 4 pairs (8 of 8 replies" in r.output and "unparseable on 'code of item" in r.output


def test_endpoint_errors_name_the_url_and_the_fix(evaluated, b_sayer):
    from tunekit.ship.serve import create_app, load_models

    with (
        running(create_app(load_models([b_sayer]), api_key="k3y")) as url,
        pytest.raises(TunekitError, match=r"HTTP 401 \(set \$TUNEKIT_JUDGE_API_KEY\)"),
    ):
        judge_run(evaluated, EndpointJudge(f"{url}/v1", "bsayer", 4))
    with pytest.raises(TunekitError, match="cannot reach it"):
        judge_run(evaluated, EndpointJudge(url + "/v1", "bsayer", 4, timeout=5))
    r = CliRunner().invoke(app, ["eval", str(evaluated), "--rubric", "x.txt"])
    assert "go with --judge MODEL" in str(r.exception)
