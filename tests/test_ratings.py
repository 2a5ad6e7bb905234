"""Human ratings: the statistics against hand-computed cases, the blind rating API over real HTTP
(verdicts mapped back to the comparison's order, kept across a server restart, writes guarded),
and `tunekit data ratings` turning them into preference pairs that tunekit reads."""

import json
import math
import urllib.error
import urllib.parse
import urllib.request

import pytest
from typer.testing import CliRunner

from conftest import running
from tunekit.cli import app
from tunekit.data.ratings import (
    agreement,
    cohen_kappa,
    decide,
    fleiss_kappa,
    preference_rows,
    wilson_ci,
    win_rate,
)
from tunekit.eval.pairs import build_pairs, first_shown_as
from tunekit.runs import registry

# ---------------------------------------------------------------------------------------------
# Statistics, each against a case worked by hand


def test_cohen_kappa_of_the_textbook_two_rater_table():
    """50 items: both yes 20, both no 15, A yes / B no 5, A no / B yes 10. Observed agreement 0.7;
    A says yes 25 times, B 30: chance 0.5*0.6 + 0.5*0.4 = 0.5; kappa (0.7-0.5)/(1-0.5) = 0.4."""
    a = ["yes"] * 20 + ["no"] * 15 + ["yes"] * 5 + ["no"] * 10
    b = ["yes"] * 20 + ["no"] * 15 + ["no"] * 5 + ["yes"] * 10
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(["tie"] * 4, ["tie"] * 4) is None  # chance agreement 1: undefined, not 0 or 1


def test_fleiss_kappa_of_the_textbook_fourteen_rater_table():
    """Fleiss (1971) as Wikipedia works it: 10 items, 14 raters, 5 categories; P-bar 0.378,
    P-bar-e 0.213, kappa 0.210."""
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]  # fmt: skip
    p_bar = (1 + 0.253 + 0.308 + 0.440 + 0.330 + 0.462 + 0.242 + 0.176 + 0.286 + 0.286) / 10
    p_e = 0.143**2 + 0.200**2 + 0.279**2 + 0.150**2 + 0.229**2
    assert fleiss_kappa(table) == pytest.approx((p_bar - p_e) / (1 - p_e), abs=2e-3)
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=1e-3)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[1, 1], [3, 0]])


def test_fleiss_kappa_of_two_raters_is_scotts_pi():
    """With two raters Fleiss' kappa is Scott's pi: chance from the pooled frequencies. Items
    (x,x), (x,y), (y,y), (y,y): observed 3/4; pooled x 3/8, y 5/8, chance 34/64; pi = 14/30."""
    assert fleiss_kappa([[2, 0], [1, 1], [0, 2], [0, 2]]) == pytest.approx((0.75 - 34 / 64) / (1 - 34 / 64))


def test_wilson_interval_by_hand():
    # 5 of 10: centre 0.5, half-width 1.96/(1+0.38415) * sqrt(0.025 + 0.0096) = 0.2634
    p, lo, hi = wilson_ci(5, 10)
    assert (p, lo, hi) == pytest.approx((0.5, 0.2366, 0.7634), abs=1e-4)
    # 0 of 10: the interval stays inside [0, 1] (the normal one would be [0, 0])
    assert wilson_ci(0, 10) == pytest.approx((0.0, 0.0, 0.2775), abs=1e-4)
    assert all(math.isnan(x) for x in wilson_ci(0, 0))


def test_win_rate_counts_ties_and_both_bad_beside_the_rate():
    w = win_rate(["second"] * 6 + ["first"] * 4 + ["tie"] * 3 + ["both_bad"] * 2 + ["disagreement"])
    assert (w["wins"], w["losses"], w["ties"], w["both_bad"], w["disagreements"], w["n"]) == (
        6,
        4,
        3,
        2,
        1,
        16,
    )
    assert (w["win_rate"], w["ci_low"], w["ci_high"]) == pytest.approx(wilson_ci(6, 10))


def test_majority_and_split_votes():
    assert decide(["first", "first", "second"]) == "first"
    assert decide(["tie"]) == "tie"
    assert decide(["first", "second"]) == "disagreement"
    assert decide(["first", "second", "tie", "tie"]) == "tie"


def _pair(i: int) -> dict:
    return {
        "prompt": f"q{i}",
        "first": {"name": "base_few_shot", "reply": f"base {i}"},
        "second": {"name": "finetuned", "reply": f"tuned {i}"},
    }


def _r(item: int, rater: str, verdict: str) -> dict:
    return {"item": str(item), "rater": rater, "verdict": verdict, "pair": _pair(item), "comparison": "c"}


def test_preference_rows_leave_out_ties_both_bad_and_split_votes_and_count_them():
    ratings = [
        _r(0, "ana", "second"),
        _r(1, "ana", "first"),
        _r(2, "ana", "tie"),
        _r(3, "ana", "both_bad"),
        _r(4, "ana", "first"),
        _r(4, "bo", "second"),  # a split vote
        _r(5, "ana", "second"),
        _r(5, "bo", "second"),
        _r(5, "cy", "first"),  # majority: second
    ]
    rows, counts = preference_rows(ratings)
    assert rows == [
        {"prompt": "q0", "chosen": "tuned 0", "rejected": "base 0"},
        {"prompt": "q1", "chosen": "base 1", "rejected": "tuned 1"},
        {"prompt": "q5", "chosen": "tuned 5", "rejected": "base 5"},
    ]
    assert counts == {"second": 2, "first": 1, "tie": 1, "both_bad": 1, "disagreement": 1}
    assert sum(counts.values()) == 6  # every rated pair is exported or counted out


def test_a_pair_with_a_whole_prompt_exports_trl_message_lists():
    pair = _pair(0) | {
        "prompt_messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q0"}]
    }
    rows, _ = preference_rows([{"item": "0", "rater": "a", "verdict": "first", "pair": pair}])
    assert rows == [
        {
            "prompt": pair["prompt_messages"],
            "chosen": [{"role": "assistant", "content": "base 0"}],
            "rejected": [{"role": "assistant", "content": "tuned 0"}],
        }
    ]


def test_agreement_picks_cohen_for_two_raters_and_fleiss_for_more():
    two = [_r(i, "ana", v) for i, v in enumerate(["first", "second", "tie", "second"])]
    two += [_r(i, "bo", v) for i, v in enumerate(["first", "second", "second", "second"])]
    got = agreement(two)
    # observed 3/4; ana: first 1, second 2, tie 1; bo: first 1, second 3 -> chance (1 + 6)/16
    assert got == {
        "method": "cohen",
        "kappa": pytest.approx((0.75 - 7 / 16) / (1 - 7 / 16)),
        "raters": ["ana", "bo"],
        "items": 4,
    }
    three = two + [_r(i, "cy", v) for i, v in enumerate(["first", "second", "tie"])]  # cy skipped item 3
    got = agreement(three)
    assert got["method"] == "fleiss" and got["items"] == 3
    assert got["kappa"] == pytest.approx(fleiss_kappa([[3, 0, 0, 0], [0, 3, 0, 0], [0, 1, 2, 0]]))
    assert agreement(two[:4]) is None


# ---------------------------------------------------------------------------------------------
# The rating API over real HTTP, on a registered run with a written evaluation


@pytest.fixture
def rated_run(tmp_path, monkeypatch):
    """A registered run whose predictions.json holds 6 test prompts: 5 pairs differ, 1 is identical."""
    from tunekit.config import config_from_dict

    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [
        {"source": f"test.jsonl:{i + 1}", "prompt": f"question {i}?", "reference": f"R{i}",
         "base": "?", "base_few_shot": f"base {i}", "finetuned": f"tuned {i}" if i < 5 else f"base {i}"}
        for i in range(6)
    ]  # fmt: skip
    (run_dir / "predictions.json").write_text(json.dumps(rows))
    report = {
        "contenders": {"base": {}, "base_few_shot": {}, "finetuned": {}},
        "test_data": "elsewhere.jsonl",
    }
    (run_dir / "report.json").write_text(json.dumps(report))
    (tmp_path / "d.jsonl").write_text("")
    cfg = config_from_dict(
        {"model": "m", "data": {"train": str(tmp_path / "d.jsonl")}, "output_dir": str(run_dir)}
    )
    registry.register_run(run_dir, cfg)
    return registry.get_run("run")


def _post(url: str, body: dict, **headers) -> tuple[int, dict | str]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"} | headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_pairs_leave_out_identical_replies_and_have_stable_ids(rated_run):
    pairs, identical = build_pairs(rated_run["run_dir"], "base_few_shot|finetuned")
    assert identical == 1 and len(pairs) == 5
    assert [p["first"]["reply"] for p in pairs] == [f"base {i}" for i in range(5)]
    again, _ = build_pairs(rated_run["run_dir"], "base_few_shot|finetuned")
    assert [p["item"] for p in again] == [p["item"] for p in pairs]
    # both orders occur over the raters, and one rater always sees one pair the same way
    shown = {first_shown_as(f"r{k}", pairs[0]["item"]) for k in range(20)}
    assert shown == {"A", "B"}
    assert first_shown_as("ana", pairs[0]["item"]) == first_shown_as("ana", pairs[0]["item"])


def test_blind_verdicts_are_stored_in_the_comparisons_order_and_survive_a_restart(rated_run):
    from tunekit.ui.app import create_ui_app

    api = f"/api/runs/{rated_run['id']}"
    with running(create_ui_app()) as url:
        status, view = _get(f"{url}{api}/rating?rater=ana")
        assert status == 200 and view["comparison"] == "base_few_shot|finetuned"
        assert len(view["pairs"]) == 5 and view["identical"] == 1 and view["rated"] == 0
        assert view["comparisons"] == ["base_few_shot|finetuned", "base|finetuned"]
        for p in view["pairs"]:  # ana always prefers the fine-tuned reply, wherever it is shown
            side = "A" if p["a"].startswith("tuned") else "B"
            assert "first" not in p and "name" not in json.dumps(p)  # blind: no model name reaches the page
            status, progress = _post(
                f"{url}{api}/ratings",
                {
                    "rater": "ana",
                    "comparison": view["comparison"],
                    "item": p["item"],
                    "verdict": side,
                    "comment": "ok",
                },
            )
            assert status == 200, progress
        assert progress == {"rated": 5, "total": 5}
        sides = {p["a"].startswith("tuned") for p in view["pairs"]}
        assert sides == {True, False}, "ana saw the fine-tuned reply on both sides"
    with running(create_ui_app()) as url:  # a new server over the same registry: nothing lost
        _, again = _get(f"{url}{api}/rating?rater=ana")
        assert again["rated"] == 5
        assert all(p["verdict"] == ("A" if p["a"].startswith("tuned") else "B") for p in again["pairs"])
        _, other = _get(f"{url}{api}/rating?rater=bo")
        assert other["rated"] == 0 and other["raters"] == ["ana"]
    stored = registry.get_ratings(rated_run["id"])
    assert {r["verdict"] for r in stored} == {"second"} and {r["comment"] for r in stored} == {"ok"}
    assert {r["first_shown_as"] for r in stored} == {"A", "B"}


def test_rating_mistakes_are_answered_with_their_fix(rated_run):
    from tunekit.ui.app import create_ui_app

    api = f"/api/runs/{rated_run['id']}"
    with running(create_ui_app()) as url:
        _, view = _get(f"{url}{api}/rating?rater=ana")
        item = view["pairs"][0]["item"]
        good = {"rater": "ana", "comparison": "base_few_shot|finetuned", "item": item, "verdict": "A"}
        for change, words in [
            ({"rater": "  "}, "your name"),
            ({"verdict": "C"}, "one of A, B, tie, both_bad"),
            ({"item": "nope"}, "reload the page"),
            ({"comparison": "x|y"}, "no comparison"),
        ]:
            status, body = _post(f"{url}{api}/ratings", good | change)
            assert status == 400 and words in body, (change, body)
        assert _get(f"{url}{api}/rating?rater=")[0] == 400
        assert _get(f"{url}/api/runs/999/rating?rater=a")[0] == 404
        assert registry.get_ratings(rated_run["id"]) == []


def test_writes_from_another_site_are_refused(rated_run):
    """Cross-site request forgery: a page elsewhere can POST a form or text to 127.0.0.1, and its
    browser names its site in Origin; only same-origin JSON is taken."""
    from tunekit.ui.app import create_ui_app

    api = f"/api/runs/{rated_run['id']}"
    with running(create_ui_app()) as url:
        _, view = _get(f"{url}{api}/rating?rater=ana")
        body = {
            "rater": "ana",
            "comparison": "base_few_shot|finetuned",
            "item": view["pairs"][0]["item"],
            "verdict": "A",
        }
        status, text = _post(f"{url}{api}/ratings", body, Origin="http://evil.example")
        assert status == 403 and "another site" in text
        status, text = _post(f"{url}{api}/ratings", body, **{"Content-Type": "text/plain"})
        assert status == 403 and "JSON only" in text
        assert registry.get_ratings(rated_run["id"]) == []
        assert _post(f"{url}{api}/ratings", body, Origin=url)[0] == 200


def test_cli_exports_pairs_that_tunekit_reads_and_reports_agreement(rated_run, tmp_path):
    from tunekit.data import load_examples

    pairs, _ = build_pairs(rated_run["run_dir"], "base_few_shot|finetuned")
    verdicts = {
        "ana": ["second", "second", "first", "tie", "second"],
        "bo": ["second", "first", "first", "tie", "both_bad"],
    }
    for rater, vs in verdicts.items():
        for p, v in zip(pairs, vs, strict=True):
            shown = "A" if rater == "ana" else "B"  # bo saw every first reply on the right
            registry.save_rating(
                rated_run["id"], "base_few_shot|finetuned", p["item"], rater, v, shown, "", p
            )
    out = tmp_path / "pairs.jsonl"
    r = CliRunner().invoke(app, ["data", "ratings", "run", "--out", str(out)])
    assert r.exit_code == 0, r.output
    # decisions: second, split, first, tie, split -> 2 pairs exported, 1 tie and 2 split votes counted out
    assert "preference pairs: 2" in r.output and "1 ties, 0 both bad, 2 split votes" in r.output
    assert "finetuned beat base_few_shot in 1 of 2 decisive pairs" in r.output
    kappa = cohen_kappa(verdicts["ana"], verdicts["bo"])
    assert f"Cohen's kappa {kappa:.3f} over 5 pairs" in r.output
    # ana (first shown as A) picked second 3 times: B; first once: A. bo (first shown as B) picked
    # second once: A; first twice: B.
    assert "raters picked the reply shown as A 2 times, as B 5 times" in r.output
    examples = load_examples(out)
    assert [ex.format for ex in examples] == ["preference", "preference"]
    assert examples[0].target == "tuned 0" and examples[0].rejected[0].content == "base 0"
    assert examples[1].target == "base 2"


def test_cli_ratings_errors_name_the_fix(rated_run, tmp_path):
    r = CliRunner().invoke(app, ["data", "ratings", "run"])
    assert r.exit_code != 0 and "no ratings yet" in str(r.exception)
    r = CliRunner().invoke(app, ["data", "ratings", "nope"])
    assert "no such run" in str(r.exception)


def test_run_against_run_pairs_match_prompts_and_are_offered_on_the_page(rated_run, tmp_path):
    """`run:/dir/B`: this run's fine-tuned replies against another evaluated run's, on the prompts
    both were tested on (matched by prompt and reference, as `eval --compare` matches them)."""
    from tunekit.config import config_from_dict
    from tunekit.ui.app import create_ui_app

    other = tmp_path / "other"
    other.mkdir()
    rows = [
        {
            "source": "x",
            "prompt": f"question {i}?",
            "reference": f"R{i}",
            "base": "",
            "finetuned": f"other {i}",
        }
        for i in (1, 2, 3, 9)  # 9 was not in the first run's test set
    ]
    rows[0]["finetuned"] = "tuned 1"  # the same reply as the first run's: left out as identical
    (other / "predictions.json").write_text(json.dumps(rows))
    (other / "report.json").write_text(json.dumps({"contenders": {"base": {}, "finetuned": {}}}))
    cfg = config_from_dict(
        {"model": "m", "data": {"train": str(tmp_path / "d.jsonl")}, "output_dir": str(other)}
    )
    registry.register_run(other, cfg)
    comparison = "run:" + str(other.resolve())
    pairs, identical = build_pairs(rated_run["run_dir"], comparison)
    assert identical == 1
    assert [(p["first"]["reply"], p["second"]["reply"]) for p in pairs] == [
        ("tuned 2", "other 2"),
        ("tuned 3", "other 3"),
    ]
    assert [p["first"]["name"] for p in pairs] == ["run/finetuned"] * 2 and pairs[0]["second"][
        "name"
    ] == "other/finetuned"
    with running(create_ui_app()) as url:
        _, view = _get(f"{url}/api/runs/{rated_run['id']}/rating?rater=ana")
        assert comparison in view["comparisons"]
        _, view = _get(
            f"{url}/api/runs/{rated_run['id']}/rating?rater=ana&comparison={urllib.parse.quote(comparison)}"
        )
        assert len(view["pairs"]) == 2


def test_a_run_without_replies_is_refused_with_the_reason(tmp_path):
    from tunekit.errors import TunekitError

    with pytest.raises(TunekitError, match="run `tunekit eval"):
        build_pairs(tmp_path, "base|finetuned")
    (tmp_path / "report.json").write_text("{}")  # e.g. a reward run: evaluated, but no replies
    with pytest.raises(TunekitError, match=r"no replies \(predictions.json\): only runs that generate"):
        build_pairs(tmp_path, "base|finetuned")
