"""The OpenAI-compatible server, driven by the official `openai` client against a real running server;
and `tunekit chat`. Two LoRA fine-tunes of one tiny base: one learned to answer "OK", the other "NO".

Then what a server must survive: hostile fields, failures inside generation, clients that hang up
(mid-stream, mid-generation, waiting in line), replies finalised on their own generation thread,
oversized bodies and prompts, invalid Unicode, the API key on every path, and SIGTERM or Ctrl-C in
the middle of a stream. tests/test_serve_load.py puts all of it under load at once."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.client import HTTPConnection
from pathlib import Path

import pytest

from conftest import free_port, running, train_to_answer
from tunekit.errors import TunekitError
from tunekit.ship.serve import SHUTDOWN_GRACE_S, create_app, load_models

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


def endless_base(tiny_model_dir, folder):
    """The tiny model with a 32k context whose end-of-turn token can never come: its (tied)
    embedding row is zero, so its logit is 0 whatever the input, below the largest of the others.
    A reply runs to max_tokens: minutes for the largest."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.eos_token_id] = 0
    model.config.max_position_embeddings = 32768
    out = folder / "endless-base"
    shutil.copytree(tiny_model_dir, out)
    model.save_pretrained(out)
    return out


def train_endless(tiny_model_dir, folder):
    """A run on `endless_base` (one training step: what it says does not matter, only that it
    never stops)."""
    steps = {"max_steps": 1, "learning_rate": 1e-4, "batch_size": 4, "max_length": 64, "seed": 0}
    return train_to_answer(endless_base(tiny_model_dir, folder), folder / "endless", "x", train=steps)


CHAT = "/v1/chat/completions"


def chat(model="ok", content="Is it ready?", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0} | fields


def request(base, path, body=None, headers=None, method=None, timeout=20) -> tuple[int, dict | str]:
    """A raw request (bytes sent as given, a dict as JSON): (status, the JSON body or its text)."""
    url = urllib.parse.urlsplit(base)
    conn = HTTPConnection(url.hostname, url.port, timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    method = method or ("GET" if data is None else "POST")
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} | (headers or {}))
    with conn.getresponse() as r:
        status, raw = r.status, r.read()
    conn.close()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def stream(base, body, headers=None, timeout=30) -> tuple[int, list]:
    """A streamed completion read to its end: (status, its events: parsed JSON, or "[DONE]")."""
    status, text = request(base, CHAT, body | {"stream": True}, headers, timeout=timeout)
    if not isinstance(text, str):
        return status, [text]
    events = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
    return status, [e if e == "[DONE]" else json.loads(e) for e in events]


def assert_openai_error(body) -> dict:
    """`body` is an OpenAI error body; returns its "error"."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error


def send_only(base, body: dict, headers: dict | None = None) -> socket.socket:
    """A socket that has sent a POST of `body` to the chat endpoint and reads nothing yet."""
    url = urllib.parse.urlsplit(base)
    data = json.dumps(body).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def open_stream(base, body: dict, headers: dict | None = None) -> socket.socket:
    """A streaming request whose first piece of text has arrived; the caller hangs up or reads on."""
    sock = send_only(base, body | {"stream": True}, headers)
    seen = b""
    while seen.count(b'"content"') < 2:  # the role chunk, then the first piece
        data = sock.recv(65536)
        assert data, f"the stream ended early: {seen[-500:]!r}"
        seen += data
    assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    return sock


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[bytes, bytes]:
    """(status line and headers, body) of a response with a Content-Length, read from `sock`."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"closed before a response: {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(h.split(b":")[1] for h in head.lower().split(b"\r\n") if h.startswith(b"content-length"))
    )
    while len(body) < length:
        more = sock.recv(65536)
        assert more, "closed in the middle of the body"
        body += more
    return head, body


def read_to_end(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while data := sock.recv(65536):
        out += data
    return out


@contextmanager
def hooked(module, hook):
    """`hook` as a forward hook of `module` (it runs on the generation thread, once a token)."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def endless(s, delay: float = 0.0):
    """While inside: the served model never ends a reply (its stop tokens' logits are -inf) and
    takes `delay` seconds more a token. A reply then runs to max_tokens, slowly."""
    from tunekit.models.stops import stop_token_ids

    ids = stop_token_ids(s.tokenizer, s.model)

    def hook(module, args, out):
        time.sleep(delay)
        out[..., ids] = float("-inf")
        return out

    with hooked(s.model.get_output_embeddings(), hook):
        yield


def until(condition, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def model_is_free(app) -> bool:
    return until(lambda: app.state.turns.current is None and not app.state.turns.lock.locked())


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


HOSTILE_FIELDS = [
    # (fields merged into a good request, or raw bytes; the param the 400 names)
    ({"seed": 2**70}, "seed"),  # torch.manual_seed refuses it: the generation thread died, the model stayed locked
    ({"seed": -(2**64)}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": True}, "seed"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),  # more than the context of 1024 leaves
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [1]}, "stop.0"),
    ({"stop": ["ok", "\ud800"]}, "stop.1"),
    ({"n": 2}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"model": "\udfff"}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "bad \ud800 text"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    (b'{"model": "ok", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b'{"model": "ok", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "top_p"),
    (b'{"model": "ok", "messages": [{"role": "user", "content": "hi"}], "seed": 1e999}', "seed"),
    (b'{"model": "ok", "messages": [{"role": "user", "content": "caf\xe9"}]}', None),  # Latin-1, not UTF-8
    (b'{"model": "ok", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', None),  # UTF-8 of a surrogate
    (b"[" * 100_000, None),
    (b'{"model": "ok", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}", None),
    (b'{"model": "ok", "messages": [', None),
    (b"", None),
    (b"[]", None),
    (b"null", None),
]  # fmt: skip


def test_hostile_fields_get_openai_400s_and_the_model_stays_free(served):
    app = create_app(served)
    with running(app) as base:
        for fields, param in HOSTILE_FIELDS:
            body = fields if isinstance(fields, bytes) else chat(**fields)
            status, reply = request(base, CHAT, body, timeout=10)
            assert status == 400, (fields, reply)
            assert assert_openai_error(reply)["param"] == param, (fields, reply)
            assert reply["error"]["type"] == "invalid_request_error"
        status, reply = request(base, CHAT, chat(max_tokens=8, seed=2**64 - 1, temperature=1.0), timeout=10)
        assert status == 200, reply  # the largest seed torch takes is fine
        assert model_is_free(app)


def test_a_failure_inside_generation_is_an_openai_500_and_frees_the_model(served):
    s, app = served["ok"], create_app(served)
    with running(app) as base:

        def refuse(module, args, out):
            raise RuntimeError("no logits today")

        # fails on the generation thread, in the prompt's forward pass, before the first token
        with hooked(s.model.get_output_embeddings(), refuse):
            for streamed in (False, True):
                status, reply = request(base, CHAT, chat(seed=3, stream=streamed), timeout=10)
                assert status == 500, reply
                error = assert_openai_error(reply)
                assert error["type"] == "server_error" and "no logits today" in error["message"]

        calls = {"n": 0}

        def fail_later(module, args, out):
            calls["n"] += 1
            if calls["n"] > 4:
                raise RuntimeError("the device fell over")

        with endless(s), hooked(s.model.get_output_embeddings(), fail_later):
            status, events = stream(base, chat(max_tokens=50))
        assert status == 200 and events[1]["choices"][0]["delta"]["content"]  # text came first
        assert "the device fell over" in assert_openai_error(events[-1])["message"]
        assert "[DONE]" not in events
        assert request(base, CHAT, chat(max_tokens=8))[1]["choices"][0]["message"]["content"] == "OK"
        assert model_is_free(app)


def test_hanging_up_frees_the_model_for_the_next_request(served):
    """Each client below would hold the model for about 15 s if its generation ran on."""
    app, long, short = create_app(served), chat(max_tokens=900), chat(max_tokens=3)
    with running(app) as base, endless(served["ok"], delay=0.01), ThreadPoolExecutor(2) as pool:
        # mid-stream, while another request waits its turn
        first = open_stream(base, long)
        waiting = pool.submit(request, base, CHAT, short)
        time.sleep(0.5)
        first.close()
        status, reply = waiting.result(timeout=8)
        assert status == 200 and reply["usage"]["completion_tokens"] == 3

        # a non-streaming request whose client leaves mid-generation
        sock = send_only(base, long)
        time.sleep(0.5)
        sock.close()
        assert request(base, CHAT, short, timeout=8)[0] == 200

        # a client that leaves while waiting in line, behind a stream that then hangs up too
        first = open_stream(base, long)
        sock = send_only(base, long)
        time.sleep(0.3)
        sock.close()
        time.sleep(0.3)
        first.close()
        assert request(base, CHAT, short, timeout=8)[0] == 200
        assert model_is_free(app)


def test_a_reply_finalised_on_its_own_generation_thread_still_frees_the_model(served):
    """What the garbage collector does to an abandoned stream when it runs on the generation
    thread: close the reply's generator there (it used to join its own thread and raise)."""
    from tunekit.ship.generation import stream_reply

    s = served["ok"]
    s.model.set_adapter("ok")
    first, done, outcome, holder = threading.Event(), threading.Event(), {}, {}

    def close_here(module, args, out):
        if first.is_set() and "closed" not in outcome:
            outcome["closed"] = threading.current_thread().name
            try:
                holder["pieces"].close()
            except BaseException as e:
                outcome["error"] = repr(e)

    with endless(s), hooked(s.model.get_output_embeddings(), close_here):
        pieces, _ = stream_reply(s.model, s.tokenizer, ASK, max_tokens=200, on_done=done.set)
        holder["pieces"] = pieces
        next(pieces)
        first.set()
        assert done.wait(20), "the generation never ended"
    assert outcome == {"closed": "tunekit-generate"}


def test_stop_strings_cut_long_replies_exactly(served):
    """A stop string deep in a long reply ends it right there (the stop check looks only at the
    reply's tail, the text search only at what is new: both must still find it)."""
    from tunekit.ship.generation import stream_reply

    s = served["ok"]
    s.model.set_adapter("ok")
    with endless(s):
        pieces, reply = stream_reply(s.model, s.tokenizer, ASK, max_tokens=300)
        full = "".join(pieces)
        assert reply.finish_reason == "length" and len(full) > 400
        for start, size in [(200, 1), (300, 7), (len(full) - 20, 12)]:
            stop = full[start : start + size]
            pieces, reply = stream_reply(s.model, s.tokenizer, ASK, max_tokens=300, stop=["\x00", stop])
            assert ("".join(pieces), reply.finish_reason) == (full[: full.find(stop)], "stop"), stop


class SpyTokenizer:
    """A served tokenizer that records the length of every text it tokenizes."""

    def __init__(self, tokenizer):
        self._tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def spied(served) -> tuple[dict, SpyTokenizer]:
    spy = SpyTokenizer(served["ok"].tokenizer)
    return {"ok": dataclasses.replace(served["ok"], tokenizer=spy)}, spy


def test_bodies_over_the_limit_get_413_before_they_are_read(served):
    one, spy = spied(served)
    url = None
    with running(create_app(one, max_body_bytes=100_000)) as base:
        url = urllib.parse.urlsplit(base)
        # A Content-Length over the limit is answered before a byte of the body is sent.
        for length in (100_001, 10**12):
            sock = socket.create_connection((url.hostname, url.port), timeout=10)
            sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
            head, body = read_response(sock)
            sock.close()
            assert head.startswith(b"HTTP/1.1 413"), head
            assert assert_openai_error(json.loads(body))["code"] == "request_too_large"
        # Chunked (no length said): refused as soon as the limit is passed.
        sock = socket.create_connection((url.hostname, url.port), timeout=10)
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"x" * 30_000
        for _ in range(4):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        head, body = read_response(sock)
        sock.close()
        assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["error"]["code"] == "request_too_large"
        # Just under the limit is read, and answered on its merits.
        status, reply = request(base, CHAT, chat(content="word " * 19_900))
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
        assert spy.lengths and max(spy.lengths) < 100_000
    with running(create_app(one)) as base:  # the default limit: 4 MB
        status, reply = request(base, CHAT, b"x" * (4 * 2**20 + 1))
        assert status == 413 and "4 MB" in assert_openai_error(reply)["message"]


def test_a_prompt_over_the_context_gets_400_naming_the_limit_without_tokenizing_it_all(served):
    one, spy = spied(served)
    with running(create_app(one)) as base:
        text = "word " * 600_000  # 3 MB, about 600k tokens
        status, reply = request(base, CHAT, chat(content=text), timeout=60)
        assert status == 400, reply
        error = assert_openai_error(reply)
        assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
        assert "1024 tokens" in error["message"]
        assert max(spy.lengths) < len(text) / 10  # only its head was tokenized

        status, reply = request(base, CHAT, chat(content="word " * 1100))  # just over: tokenized, refused
        assert status == 400 and "1024 tokens" in reply["error"]["message"]
        # A prompt that fits gets the rest of the context when max_tokens is not given...
        status, reply = request(base, CHAT, chat(content="word " * 900))
        assert status == 200, reply
        # ...and a 400 naming the limit when the max_tokens it asks for does not fit.
        status, reply = request(base, CHAT, chat(content="word " * 900, max_tokens=200))
        assert status == 400 and reply["error"]["param"] == "max_tokens"
        assert "1024 tokens" in reply["error"]["message"]


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
        # Every path: the schema, the docs, paths that do not exist, any method.
        for method, path in [
            ("GET", "/openapi.json"),
            ("GET", "/docs"),
            ("GET", "/nope"),
            ("DELETE", "/v1/models"),
        ]:
            status, err = request(base, path, method=method)
            assert status == 401 and assert_openai_error(err)["code"] == "invalid_api_key", path
        key = {"Authorization": "Bearer s3cret"}
        status, schema = request(base, "/openapi.json", headers=key)
        assert status == 200 and "ChatRequest" in schema["components"]["schemas"]
        status, err = request(base, "/docs", headers=key)  # not served (it would load scripts from a CDN)
        assert status == 404 and assert_openai_error(err)["code"] == "not_found"
    with pytest.raises(TunekitError):
        create_app(served, api_key="")


def _other_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


@pytest.fixture(scope="module")
def endless_run(tiny_model_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield train_endless(tiny_model_dir, tmp_path_factory.mktemp("endless"))


@contextmanager
def cli_server(runs, log, key="s3cret", *args):
    """`tunekit serve RUNS` in its own process, the key in $TUNEKIT_API_KEY; yields (proc, base URL)."""
    port = free_port()
    env = os.environ | {"PYTHONUNBUFFERED": "1", "TUNEKIT_API_KEY": key}
    cmd = [sys.executable, "-m", "tunekit", "serve", *map(str, runs), "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if (
                    request(base, "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)[0]
                    == 200
                ):
                    break
            except OSError:
                pass
            assert proc.poll() is None, Path(log).read_text()
            assert time.time() < deadline, "server did not start"
            time.sleep(0.5)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_cli_serve_stops_within_seconds_in_the_middle_of_a_stream(signum, endless_run, tmp_path):
    """Loopback by default, the key from the environment (not in `ps`), and a stop signal while a
    reply of minutes streams, another request waits its turn and a third has stalled halfway
    through its body: the stream ends with an error event, the waiting request gets 503, the
    stalled one is dropped after the grace period, and the process is gone within a few seconds."""
    key = {"Authorization": "Bearer s3cret"}
    # --max-batch 1: the second request waits for its turn (it would otherwise join the stream's batch)
    server = cli_server([endless_run], tmp_path / "log", "s3cret", "--max-batch", "1")
    with server as (proc, base), ThreadPoolExecutor(1) as pool:
        assert b"s3cret" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        other = _other_address()
        if other:
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(
                    f"http://{other}:{urllib.parse.urlsplit(base).port}/v1/models", timeout=5
                )
        sock = open_stream(base, chat("endless", max_tokens=30_000), key)
        waiting = pool.submit(request, base, CHAT, chat("endless", max_tokens=5), key, None, 30)
        stalled = socket.create_connection(("127.0.0.1", urllib.parse.urlsplit(base).port))
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Length: 1000\r\n\r\n"
        )
        stalled.sendall(head.encode() + b'{"model": "endless", ')
        time.sleep(1)
        start = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(15)
        took = time.monotonic() - start
        rest = read_to_end(sock)
        status, reply = waiting.result(timeout=5)
        stalled.close()
    assert took < SHUTDOWN_GRACE_S + 3, f"stopping took {took:.1f} s"
    assert code == (-signal.SIGTERM if signum == signal.SIGTERM else 130), (tmp_path / "log").read_text()
    last = json.loads(rest.rstrip().rsplit(b"data: ", 1)[1].split(b"\r\n")[0])
    assert assert_openai_error(last)["code"] == "server_shutting_down"
    assert status == 503 and assert_openai_error(reply)["code"] == "server_shutting_down"


def test_cli_serve_refuses_an_empty_key(tmp_path):
    from tunekit.ship.serve import serve

    with pytest.raises(TunekitError, match="empty"):  # before any model loads
        serve([tmp_path / "no-such-run"], api_key="")
    # An empty $TUNEKIT_API_KEY (a variable that was meant to hold the key) is refused too, not
    # taken for "no key".
    env = os.environ | {"TUNEKIT_API_KEY": ""}
    cmd = [sys.executable, "-m", "tunekit", "serve", str(tmp_path / "no-such-run")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "empty" in done.stderr, done.stderr


def test_chat_in_the_terminal(runs):
    import io

    from tunekit.ship.chat import chat

    out = io.StringIO()
    history = chat(runs[1], lines=["Is it ready?", "/reset", "", "And now?", "/exit", "never read"], out=out)
    assert [m["content"] for m in history] == ["And now?", "NO"]
    assert out.getvalue().splitlines() == ["NO", "(conversation reset)", "NO"]
