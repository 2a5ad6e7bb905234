"""Switching a served name to a retrained run without a restart (ship/switch.py): only behind a
passing gate against the run served now (or forced, and said so), requests after the switch answer
from the new run, and `tunekit switch` drives it from the command line."""

import pytest

from conftest import running, train_old_and_new
from test_serve import request

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

QUESTION = "What is the code for item 30?"
SWITCH = "/tunekit/switch"


@pytest.fixture
def home(tmp_path, monkeypatch):
    from tunekit.runs import registry

    monkeypatch.setenv("TUNEKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registry, "_warned", False)


@pytest.fixture
def old_and_new(home, tiny_model_dir, chat_file, tmp_path):
    """OLD trained on the chat data; NEW retrained from it on new data (item codes)."""
    return train_old_and_new(tiny_model_dir, chat_file, tmp_path, None)


def alone(run_dir) -> str:
    """The run's own greedy reply to QUESTION, loaded by itself."""
    from tunekit.ship.generation import Generation
    from tunekit.train.setup import load_trained

    model, tokenizer, _ = load_trained(run_dir)
    return "".join(Generation(model, tokenizer, [{"role": "user", "content": QUESTION}], 6).pieces)


def test_a_served_name_switches_to_a_gated_retrain_without_a_restart(old_and_new):
    from typer.testing import CliRunner

    from tunekit.cli import app as cli
    from tunekit.eval.gate import gate
    from tunekit.ship.serve import create_app, load_models

    old, new = old_and_new
    served = load_models([old])
    name = old.name
    app = create_app(served, enable_switch=True)
    with running(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

        def reply() -> str:
            r = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0
            )
            return r.choices[0].message.content

        assert reply() == alone(old)

        # refused: no gate yet, a name not served, a folder that is not a run, the run served now
        status, body = request(base, SWITCH, {"model": name, "run": str(new)})
        assert status == 409 and body["error"]["code"] == "gate_missing", body
        assert f"tunekit eval --compare {old} {new} --gate" in body["error"]["message"]
        assert request(base, SWITCH, {"model": "nope", "run": str(new)})[0] == 404
        status, body = request(base, SWITCH, {"model": name, "run": str(new / "adapter")})
        assert status == 400 and "not a run directory" in body["error"]["message"]
        assert request(base, SWITCH, {"model": name, "run": str(old), "force": True})[0] == 400
        assert request(base, SWITCH, {"model": name, "run": str(new), "force": "yes"})[0] == 400

        result = gate(old, new, quiet=True)
        status, body = request(base, SWITCH, {"model": name, "run": str(new)})
        if result["fit"]:
            assert status == 200 and body["gate"] == result["reason"], body
        else:  # the gate said no: the switch says why, and only force overrides it
            assert status == 409 and body["error"]["code"] == "gate_failed", body
            assert result["reason"] in body["error"]["message"]
            status, body = request(base, SWITCH, {"model": name, "run": str(new), "force": True})
            assert status == 200 and body["gate"] == "not checked (force)", body
        assert body["previous_run"] == str(old) and body["run"] == str(new)

        # the same name now answers from NEW (its adapter joined the base already in memory)
        assert [m.id for m in client.models.list().data] == [name]
        assert reply() == alone(new)
        assert served[name].run_dir == new and served[name].model is not None

        # back again from the command line (forced: OLD has no gate against NEW)
        r = CliRunner().invoke(cli, ["switch", name, str(old), "--url", base])
        assert r.exit_code != 0 and "has no gate decision" in str(r.exception)
        r = CliRunner().invoke(cli, ["switch", name, str(old), "--url", base, "--force"])
        assert r.exit_code == 0, r.output
        assert "not checked (force)" in r.output.replace("\n", " ")
        assert reply() == alone(old)


def test_switching_is_off_unless_enabled(old_and_new, tmp_path):
    from typer.testing import CliRunner

    from conftest import free_port
    from tunekit.cli import app as cli
    from tunekit.ship.serve import create_app, load_models

    old, new = old_and_new
    with running(create_app(load_models([old]))) as base:
        status, body = request(base, SWITCH, {"model": old.name, "run": str(new), "force": True})
        assert status == 403 and "--enable-switch" in body["error"]["message"]
    url = f"http://127.0.0.1:{free_port()}"
    r = CliRunner().invoke(cli, ["switch", old.name, str(new), "--url", url])
    assert r.exit_code != 0 and f"no server at {url}" in str(r.exception)
