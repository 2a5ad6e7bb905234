"""The retraining gate (`tunekit eval --compare OLD NEW --gate`): the decision against hand-made
paired results, and the whole path on tiny models."""

import json

import pytest

from conftest import train_old_and_new
from tunekit.eval.gate import better, gate_decision, non_inferior


def _d(diff: float, lo: float, hi: float, p: float) -> dict:
    return {"difference": diff, "ci_low": lo, "ci_high": hi, "p_value": p}


def test_non_inferiority_is_the_ci_above_minus_the_margin():
    assert non_inferior(_d(-0.01, -0.019, 0.0, 0.5), 0.02)
    assert not non_inferior(_d(-0.01, -0.02, 0.0, 0.5), 0.02)  # the lower end touches -margin
    assert not non_inferior(_d(0.0, -0.3, 0.3, 1.0), 0.02)  # too few examples to show it
    assert better(_d(0.1, 0.02, 0.18, 0.01), 0.05)
    assert not better(_d(0.1, -0.02, 0.22, 0.2), 0.05)
    assert not better(_d(-0.1, -0.2, -0.02, 0.01), 0.05)


def test_gate_decision_needs_every_check():
    ok_old, ok_new = _d(0.0, -0.01, 0.01, 1.0), _d(0.2, 0.1, 0.3, 0.001)
    probe = {"multiple_choice": _d(-0.005, -0.015, 0.005, 0.4)}
    r = gate_decision(ok_old, probe, ok_new, 0.02, 0.05)
    assert r["fit"] and r["checks"] == {
        "old_test_non_inferior": True,
        "probe_multiple_choice_non_inferior": True,
        "new_data_better": True,
    }
    assert r["reason"].startswith("NEW is fit to replace OLD") and "+0.200, p = 0.001" in r["reason"]
    forgot = {"multiple_choice": _d(-0.1, -0.15, -0.05, 0.001)}
    r = gate_decision(ok_old, forgot, ok_new, 0.02, 0.05)
    assert (
        not r["fit"]
        and r["reason"] == "NEW is not fit to replace OLD: failed probe_multiple_choice_non_inferior"
    )
    r = gate_decision(ok_old, None, _d(0.05, -0.05, 0.15, 0.3), 0.02, 0.05)
    assert not r["fit"] and "new_data_better" in r["reason"] and "probe_" not in str(r["checks"])
    assert "no probe" in gate_decision(ok_old, None, ok_new, 0.02, 0.05)["reason"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    from tunekit.runs import registry

    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registry, "_warned", False)


def test_gate_on_a_run_retrained_from_another(home, tiny_model_dir, chat_file, tmp_path):
    from typer.testing import CliRunner

    from tunekit.cli import app
    from tunekit.runs import registry

    probe = tmp_path / "probe.jsonl"
    probe.write_text(
        "".join(json.dumps({"question": f"Say {w}.", "answer": w}) + "\n" for w in ("yes", "no", "ok"))
    )
    old, new = train_old_and_new(tiny_model_dir, chat_file, tmp_path, str(probe))
    r = CliRunner().invoke(app, ["eval", "--compare", str(old), str(new), "--gate"])
    result = json.loads((new / "gate.json").read_text())
    assert r.exit_code == (0 if result["fit"] else 1), r.output
    assert result["fit"] == all(result["checks"].values())
    assert result["new_started_from"] == str(old) and result["margin"] == 0.02
    assert result["old_test"]["n"] == len((old / "data/test.jsonl").read_text().splitlines())
    assert result["new_test"]["n"] == len((new / "data/test.jsonl").read_text().splitlines())
    assert set(result["probe"]) == {"open_exact_match"} and result["probe_source"].endswith("probe.jsonl")
    assert "old test set: non-inferior" in r.output and result["reason"][:20] in r.output.replace("\n", " ")
    # the registry: NEW's config names the run it started from, and the gate is its artifact
    run = registry.get_run(str(new))
    assert run["config"]["train"]["init_from"] == str(old)
    assert [a["kind"] for a in run["artifacts"] if a["kind"] == "gate"] == ["gate"]


def test_gate_needs_compare(tmp_path):
    from typer.testing import CliRunner

    from tunekit.cli import app

    r = CliRunner().invoke(app, ["eval", str(tmp_path), "--gate"])
    assert r.exit_code != 0 and "--compare OLD NEW --gate" in str(r.exception)
