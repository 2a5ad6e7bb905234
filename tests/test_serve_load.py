"""`tunekit serve` under load: 50 concurrent clients on loopback for about a minute against a real
server process (two tiny fine-tunes, the key from $TUNEKIT_API_KEY, a 1 MB body limit), mixing
normal, streaming, cancelled-mid-stream, oversized, malformed and hostile requests.

Afterwards: no request hung (each has its own deadline), every HTTP error body was OpenAI-shaped,
the server's memory stayed bounded, it logged no traceback, it still answers, and SIGTERM stops it
within seconds. The test stops by itself: the load lasts LOAD_SECONDS (default 60;
$TUNEKIT_LOAD_SECONDS changes it) and the whole run has a hard deadline.

run as: pytest tests/test_serve_load.py -s   (-s prints the figures the README quotes)
"""

import asyncio
import json
import os
import random
import signal
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from conftest import train_to_answer
from test_serve import HOSTILE_FIELDS, base_that_can_stop, chat, cli_server, request, train_endless

pytestmark = pytest.mark.slow

CLIENTS = 50
LOAD_SECONDS = float(os.environ.get("TUNEKIT_LOAD_SECONDS", "60"))
REQUEST_TIMEOUT = 120.0  # longer than this is a hung request (a normal one waits its turn behind ~50)
HARD_TIMEOUT = LOAD_SECONDS + 2 * REQUEST_TIMEOUT  # the whole load phase, whatever happens
KEY = "load-test-key"
AUTH = f"Authorization: Bearer {KEY}\r\n"
LIMIT_MB = 1


@pytest.fixture(scope="module")
def load_runs(tiny_model_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        folder = tmp_path_factory.mktemp("runs")
        ok = train_to_answer(base_that_can_stop(tiny_model_dir, folder), folder / "ok", "OK")
        yield [ok, train_endless(tiny_model_dir, folder)]


# --- a small HTTP/1.1 client on raw sockets: hostile clients need to send what no library would ---


async def _head(reader) -> tuple[int, dict]:
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed before a response")
    status = int(line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _chunks(reader, headers):
    """The body's pieces as they arrive."""
    if "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield await reader.readexactly(size)
            await reader.readline()
    else:
        yield await reader.read()


def _post(body: bytes | dict, auth: str = AUTH, path: str = "/v1/chat/completions", extra: str = "") -> bytes:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}{extra}"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data


async def _exchange(port, raw: bytes) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        status, headers = await _head(reader)
        body = b"".join([c async for c in _chunks(reader, headers)])
        return status, headers, body
    finally:
        writer.transport.abort()


def _events(text: str) -> list:
    return [
        e[6:] if e[6:] == "[DONE]" else json.loads(e[6:])
        for e in text.split("\n\n")
        if e.startswith("data: ")
    ]


def _is_openai_error(body) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and set(error) == {"message", "type", "param", "code"}
        and isinstance(error["message"], str)
        and bool(error["message"])
        and isinstance(error["type"], str)
    )


# --- the scenarios: each returns (outcome, status); outcome "ok" is what it expects -------------


def _expect(status, body: bytes, want: int, code: str | None = None) -> tuple[str, int]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return "not json", status
    if want >= 400 and not _is_openai_error(parsed):
        return "not openai-shaped", status
    if status != want or (code and parsed["error"]["code"] != code):
        return f"unexpected {status}", status
    return "ok", status


async def normal(port, rng):
    status, _, body = await _exchange(port, _post(chat(max_tokens=8)))
    if status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "OK":
        return "ok", status
    return _expect(status, body, 200)


async def sampled(port, rng):
    status, _, body = await _exchange(
        port, _post(chat(max_tokens=8, temperature=1.0, seed=rng.randrange(2**64)))
    )
    return _expect(status, body, 200)


async def streamed(port, rng):
    status, _, body = await _exchange(port, _post(chat(max_tokens=8, stream=True)))
    if status != 200:
        return _expect(status, body, 200)
    events = _events(body.decode())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if "choices" in e)
    return ("ok" if events[-1] == "[DONE]" and text == "OK" else f"bad stream {events[-2:]}"), status


async def long_stream(port, rng):
    """A reply of 64 tokens read to its end."""
    status, _, body = await _exchange(port, _post(chat("endless", max_tokens=64, stream=True)))
    if status != 200:
        return _expect(status, body, 200)
    events = _events(body.decode())
    finish = (
        events[-2]["choices"][0]["finish_reason"] if len(events) > 1 and "choices" in events[-2] else None
    )
    return ("ok" if events[-1] == "[DONE]" and finish == "length" else f"bad stream {events[-2:]}"), status


async def cancelled_mid_stream(port, rng):
    """A reply of minutes: read a few pieces, then hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_post(chat("endless", max_tokens=20_000, stream=True)))
        status, headers = await _head(reader)
        if status != 200:
            body = b"".join([c async for c in _chunks(reader, headers)])
            return _expect(status, body, 200)
        seen, want = b"", rng.randint(1, 5)
        async for piece in _chunks(reader, headers):
            seen += piece
            if seen.count(b'"content"') > want:
                return "ok", status
        return "ended early", status
    finally:
        writer.transport.abort()


async def gone_while_waiting(port, rng):
    """Send a long request and hang up before its answer (in line, or mid-generation)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post(chat("endless", max_tokens=2_000, stream=rng.random() < 0.5)))
    await writer.drain()
    await asyncio.sleep(rng.uniform(0, 0.5))
    writer.transport.abort()
    return "ok", 0


async def oversized_declared(port, rng):
    """A Content-Length over the limit: the 413 comes before any of the body is sent."""
    length = rng.choice([LIMIT_MB * 2**20 + 1, 50 * 2**20, 10**15])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: {length}\r\n\r\n".encode()
        )
        status, headers = await _head(reader)
        body = b"".join([c async for c in _chunks(reader, headers)])
        return _expect(status, body, 413, "request_too_large")
    finally:
        writer.transport.abort()


async def oversized_chunked(port, rng):
    """No Content-Length: chunks until just past the limit, then read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"x" * 65536
        for _ in range(LIMIT_MB * 16 + 2):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        status, headers = await _head(reader)
        body = b"".join([c async for c in _chunks(reader, headers)])
        return _expect(status, body, 413, "request_too_large")
    finally:
        writer.transport.abort()


async def too_long_prompt(port, rng):
    """Under the body limit, far over the context (one long message, or many short ones): 400."""
    if rng.random() < 0.5:
        body = chat(content="word " * rng.randint(2_000, 200_000))
    else:
        body = chat() | {"messages": [{"role": "user", "content": "hi"}] * rng.randint(500, 20_000)}
    status, _, body = await _exchange(port, _post(body))
    return _expect(status, body, 400, "context_length_exceeded")


MALFORMED = [b"{not json", b"", b"[]", b"null", b"[" * 50_000, b'{"model": "ok", "messages": [', b"\xff\xfe{}",
             b'{"model": "ok", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}']  # fmt: skip


async def malformed(port, rng):
    status, _, body = await _exchange(port, _post(rng.choice(MALFORMED)))
    return _expect(status, body, 400)


async def hostile_fields(port, rng):
    fields, _ = rng.choice(HOSTILE_FIELDS)
    status, _, body = await _exchange(port, _post(fields if isinstance(fields, bytes) else chat(**fields)))
    return _expect(status, body, 400)


async def bad_key(port, rng):
    auth = rng.choice(["", "Authorization: Bearer wrong\r\n", "Authorization: Basic eDp5\r\n"])
    if rng.random() < 0.5:
        raw = f"GET {rng.choice(['/openapi.json', '/docs', '/v1/models', '/nope'])} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
        status, _, body = await _exchange(port, raw.encode())
    else:
        status, _, body = await _exchange(port, _post(chat(), auth=auth))
    return _expect(status, body, 401, "invalid_api_key")


async def not_found(port, rng):
    which = rng.randrange(3)
    if which == 0:
        status, _, body = await _exchange(port, _post(chat("no-such-model")))
        return _expect(status, body, 404, "model_not_found")
    if which == 1:
        raw = f"GET /v2/anything HTTP/1.1\r\nHost: x\r\n{AUTH}Connection: close\r\n\r\n"
        status, _, body = await _exchange(port, raw.encode())
        return _expect(status, body, 404)
    raw = f"DELETE /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{AUTH}Connection: close\r\n\r\n"
    status, _, body = await _exchange(port, raw.encode())
    return _expect(status, body, 405)


async def slow_upload(port, rng):
    """Headers and a tenth of the body, a pause, then gone."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post(chat())[:-5])
    await writer.drain()
    await asyncio.sleep(rng.uniform(0.1, 1.0))
    writer.transport.abort()
    return "ok", 0


async def not_http(port, rng):
    """Bytes that are not HTTP: uvicorn's own 400 (plain text) or a closed connection; not counted
    among the HTTP errors that must be OpenAI-shaped."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            rng.choice(
                [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 10, b"GARBAGE\r\n\r\n", b"\x00" * 100]
            )
        )
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)
        return "ok", 0
    finally:
        writer.transport.abort()


SCENARIOS = {  # name: (coroutine, weight)
    "chat": (normal, 20), "chat, sampled with a seed": (sampled, 8), "stream": (streamed, 12),
    "stream of 64 tokens": (long_stream, 3), "stream cancelled mid-way": (cancelled_mid_stream, 10),
    "hang up before the answer": (gone_while_waiting, 5), "oversized (Content-Length)": (oversized_declared, 4),
    "oversized (chunked)": (oversized_chunked, 3), "prompt over the context": (too_long_prompt, 4),
    "malformed body": (malformed, 8), "hostile field": (hostile_fields, 10), "missing or wrong key": (bad_key, 5),
    "unknown model, path or method": (not_found, 4), "slow upload abandoned": (slow_upload, 2),
    "not HTTP": (not_http, 2),
}  # fmt: skip


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _load(port: int, pid: int) -> dict:
    results: dict[str, list] = defaultdict(list)  # name -> [(outcome, status, seconds)]
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()
    stop_at = t0 + LOAD_SECONDS
    names, weights = list(SCENARIOS), [w for _, w in SCENARIOS.values()]

    async def client(i: int):
        rng = random.Random(i)
        while time.monotonic() < stop_at:
            name = rng.choices(names, weights)[0]
            start = time.monotonic()
            try:
                outcome, status = await asyncio.wait_for(SCENARIOS[name][0](port, rng), REQUEST_TIMEOUT)
            except asyncio.TimeoutError:
                outcome, status = "hung", 0
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                outcome, status = f"connection error {type(e).__name__}", 0
            results[name].append((outcome, status, time.monotonic() - start))

    async def sample_memory():
        while time.monotonic() < stop_at:
            rss.append((time.monotonic() - t0, _rss_mb(pid)))
            await asyncio.sleep(1)

    await asyncio.gather(sample_memory(), *(client(i) for i in range(CLIENTS)))
    return {"results": results, "rss": rss, "seconds": time.monotonic() - t0}


def test_fifty_clients_mixing_good_and_hostile_requests(load_runs, tmp_path):
    log = tmp_path / "server.log"
    with cli_server(load_runs, log, KEY, "--max-body-mb", str(LIMIT_MB)) as (proc, base):
        port = int(base.rsplit(":", 1)[1])
        idle_mb = _rss_mb(proc.pid)
        run = asyncio.run(asyncio.wait_for(_load(port, proc.pid), HARD_TIMEOUT))
        # Afterwards it still answers, at once: the model was handed back each time.
        key = {"Authorization": f"Bearer {KEY}"}
        time.sleep(2)
        after_mb = _rss_mb(proc.pid)
        start = time.monotonic()
        status, reply = request(base, "/v1/chat/completions", chat(max_tokens=8), key, timeout=15)
        answer_s = time.monotonic() - start
        assert status == 200 and reply["choices"][0]["message"]["content"] == "OK", reply
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        stop_s = time.monotonic() - start

    results, rss = run["results"], run["rss"]
    outcomes = Counter((name, outcome) for name, rows in results.items() for outcome, _, _ in rows)
    total = sum(len(rows) for rows in results.values())
    warm = [mb for t, mb in rss if t >= 10] or [mb for _, mb in rss]
    figures = {
        "clients": CLIENTS,
        "load_seconds": round(run["seconds"], 1),
        "requests": total,
        "requests_per_s": round(total / run["seconds"], 1),
        "by_scenario": {name: dict(Counter(o for o, _, _ in rows)) for name, rows in sorted(results.items())},
        "statuses": {name: dict(Counter(s for _, s, _ in rows)) for name, rows in sorted(results.items())},
        "latency_s": {
            name: {
                "p50": round(statistics.median(t for _, _, t in results[name]), 2),
                "p95": round(sorted(t for _, _, t in results[name])[int(0.95 * (len(results[name]) - 1))], 2),
                "max": round(max(t for _, _, t in results[name]), 2),
            }
            for name in ("chat", "stream")
            if results.get(name)
        },
        "rss_mb": {
            "idle": round(idle_mb),
            "warm_first": round(warm[0]),
            "peak": round(max(mb for _, mb in rss)),
            "after": round(after_mb),
        },  # fmt: skip
        "answer_after_load_s": round(answer_s, 2),
        "sigterm_to_exit_s": round(stop_s, 2),
    }
    print("\nload test figures:", json.dumps(figures, indent=1))
    (tmp_path / "figures.json").write_text(json.dumps(figures, indent=1))

    bad = {k: n for k, n in outcomes.items() if k[1] != "ok"}
    assert not bad, f"unexpected outcomes: {bad}"
    assert all(len(results.get(name, [])) > 0 for name in SCENARIOS), "a scenario never ran"
    assert len(results["chat"]) >= 20, "too few normal requests were answered"
    # Memory: bounded, not growing with the number of requests served.
    assert after_mb - warm[0] < 300, figures["rss_mb"]
    assert code == -signal.SIGTERM and stop_s < 5, (code, stop_s)
    server_log = log.read_text()
    assert "Traceback" not in server_log, server_log[-3000:]
