"""The OpenAI-compatible server, driven by the official `openai` client against a real running server;
and `tunekit chat`. Two LoRA fine-tunes of one tiny base: one learned to answer "OK", the other "NO"."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import free_port, running, train_to_answer
from tunekit.ship.serve import create_app, load_models

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

ASK = [{"role": "user", "content": "Is it ready?"}]


def _train(tiny_model_dir, folder, answer: str):
    return train_to_answer(tiny_model_dir, folder / answer.lower(), answer)


def base_that_can_stop(tiny_model_dir, folder):
    """The tiny model, with a real embedding for the end-of-turn token.

    The shared tiny model pads with `<|im_end|>`, so its (tied) embedding row is nn.Embedding's
    all-zero padding row: its logit is 0 whatever the input, and no adapter could learn to stop."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        torch.manual_seed(1)
        emb[model.config.eos_token_id] = torch.randn(emb.shape[1]) * 0.2
    model.config.pad_token_id = None
    out = folder / "base"
    shutil.copytree(tiny_model_dir, out)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        folder = tmp_path_factory.mktemp("runs")
        base = base_that_can_stop(tiny_model_dir, folder)
        yield [_train(base, folder, "OK"), _train(base, folder, "NO")]


@pytest.fixture(scope="module")
def served(runs):
    return load_models(runs)


def http(url: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, dict]:
    """A raw request (no client library): (status, JSON body)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def base_url(served):
    with running(create_app(served)) as base:
        url = base + "/v1"
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def _ask(client, model, **kw):
    return client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=8, **kw)


def test_two_fine_tunes_share_one_base_and_switch_per_request(client, served):
    assert served["ok"].model is served["no"].model  # one base in memory, two adapters
    assert {m.id for m in client.models.list().data} == {"ok", "no"}
    for model, want in [("ok", "OK"), ("no", "NO"), ("ok", "OK"), ("no", "NO")]:
        r = _ask(client, model)
        # Trained with the chat template, the reply ends on the learned stop token: "stop", not "length".
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop"), model
        assert r.model == model and r.usage.completion_tokens >= 1


def test_streaming_matches_non_streaming(client):
    stream = client.chat.completions.create(
        model="no", messages=ASK, temperature=0, max_tokens=8, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == _ask(client, "no").choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_stop_and_sampling(client):
    r = _ask(client, "ok", stop=["K"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("O", "stop")
    r = client.chat.completions.create(model="ok", messages=ASK, max_tokens=1, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1
    a, b = (
        client.chat.completions.create(model="ok", messages=ASK, max_tokens=6, temperature=1.5, seed=7)
        for _ in range(2)
    )
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same sample


def test_bad_requests_get_openai_error_bodies(client, base_url):
    with pytest.raises(openai.NotFoundError) as e:
        _ask(client, "nope")
    assert e.value.body["code"] == "model_not_found" and "ok" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ok", messages=ASK, temperature=5)
    assert e.value.body["param"] == "temperature"
    body = json.dumps({"model": "ok", "messages": [{"role": "robot", "content": "hi"}]}).encode()
    status, err = http(f"{base_url}/chat/completions", body)
    assert status == 400 and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == "messages.0.role"
    status, err = http(f"{base_url}/chat/completions", b"{not json")
    assert status == 400 and err["error"]["message"]


def test_api_key_is_required_when_set(served):
    with running(create_app(served, api_key="s3cret")) as base:
        url = base + "/v1"
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert e.value.body["code"] == "invalid_api_key"
        status, err = http(f"{url}/models")
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert _ask(good, "ok").choices[0].message.content == "OK"


def _other_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_cli_serve_binds_loopback_by_default(runs):
    port = free_port()
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunekit", "serve", str(runs[0]), "--port", str(port), "--api-key", "k"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        deadline = time.time() + 180
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["ok"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "server did not start"
                time.sleep(0.5)
        other = _other_address()
        if other:
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(f"http://{other}:{port}/v1/models", timeout=5)
    finally:
        proc.terminate()
        proc.wait(30)


def test_chat_in_the_terminal(runs):
    import io

    from tunekit.ship.chat import chat

    out = io.StringIO()
    history = chat(runs[1], lines=["Is it ready?", "/reset", "", "And now?", "/exit", "never read"], out=out)
    assert [m["content"] for m in history] == ["And now?", "NO"]
    assert out.getvalue().splitlines() == ["NO", "(conversation reset)", "NO"]
