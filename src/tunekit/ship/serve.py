"""`tunekit serve RUN_DIR [RUN_DIR ...]`: an OpenAI-compatible server for fine-tunes.

    GET  /v1/models              the served fine-tunes (one per run directory, named after it)
    POST /v1/chat/completions    streaming (SSE) and not; temperature, top_p, max_tokens, stop, seed

Adapter runs on the same base share one copy of it in memory: each adapter is loaded under its
run's name and chosen per request by the `model` field. Replies that arrive together are decoded
together, one forward pass per token for all of them, adapters of one base mixed in one batch
(ship/batching.py); batches and log-likelihood scoring take turns on the models, in arrival order.
A request waits on the event loop, not on a thread, and leaves the line when its client hangs up.
Prompts go through each run's own tokenizer and chat template, and replies stop on the stop
tokens training taught (models/stops.py, the ones `tunekit eval` stops on too).

The model is handed on by the generation's worker thread once `model.generate` has returned
(ship/generation.py), so no path can keep it: a finished, failed or cancelled reply, a client
that hangs up mid-stream, a reader that is garbage collected. The request side only ever asks a
generation to stop.

Safe by default: binds to 127.0.0.1; with an API key (`--api-key` or `$TUNEKIT_API_KEY`) every
path needs `Authorization: Bearer KEY` (/openapi.json and unknown paths included). Bodies over
`max_body_bytes` get 413 before they are read; a prompt longer than the model's context gets 400
before the whole of it is tokenized. Every error is an OpenAI-style body: {"error": {"message",
"type", "param", "code"}}. SIGTERM or Ctrl-C stops the server within a few seconds whatever it is
doing: the running generation is cancelled, streams end with an error event, waiting requests get
503, and connections still open after `SHUTDOWN_GRACE_S` are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from tunekit.errors import TunekitError
from tunekit.ship.api import (
    SEED_MAX,
    SEED_MIN,
    APIError,
    Number,
    Served,
    Text,
    _error,
    _find,
    _invalid,
    _json,
    _Limits,
)
from tunekit.ship.batching import DEFAULT_MAX_BATCH, Batcher

DEFAULT_MAX_BODY_MB = 4.0
SHUTDOWN_GRACE_S = 2.0  # connections still open this long after SIGTERM are dropped
API_KEY_ENV = "TUNEKIT_API_KEY"


def load_models(run_dirs: list[str | Path]) -> dict[str, Served]:
    """Load every run; adapter runs on the same base (model and method) share one base model."""
    served: dict[str, Served] = {}
    for run_dir in map(Path, run_dirs):
        name = _unique(run_dir.resolve().name, served)
        served[name] = load_run(run_dir, name, served)
    if not served:
        raise TunekitError("tunekit serve: give at least one run directory")
    return served


def load_run(run_dir: Path, name: str, served: dict[str, Served]) -> Served:
    """One run, to be served as `name`, through train/setup.load_trained; except that an adapter
    on a base already in `served` is added to that model (under a name of its own) rather than
    loaded with a copy of the base."""
    from tunekit.models import load_tokenizer, resolve_model
    from tunekit.ship.export import check_generative
    from tunekit.train.setup import load_trained, trained_dir

    cfg = check_generative(run_dir)
    created = int((run_dir / "config.yaml").stat().st_mtime)
    path, is_adapter = trained_dir(run_dir)
    if not is_adapter:
        model, tokenizer, _ = load_trained(run_dir)
        return Served(name, run_dir, model, tokenizer, None, created)
    base = (str(resolve_model(cfg.model)), cfg.method)
    for other in served.values():
        if other.base == base:
            adapter = _unique(name, other.model.peft_config)
            other.model.load_adapter(path, adapter_name=adapter)
            return Served(name, run_dir, other.model, load_tokenizer(path), adapter, created, base)
    model, tokenizer, _ = load_trained(run_dir, adapter_name=name)
    return Served(name, run_dir, model, tokenizer, name, created, base)


def _unique(name: str, taken) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    return out


# --- request schema (OpenAI's, the fields this server honours; other fields are ignored) ---------
# Every field is checked here, before the request touches a model: strict types (no "1" for 1,
# no true for 1), finite numbers, seeds torch accepts, and text that is valid Unicode (JSON's
# "\ud800" escape decodes to a lone surrogate, which no tokenizer can encode).


def _text_or_list(value) -> str:
    return "<list>" if isinstance(value, list) else "<text>"


def _text_or(items) -> type:
    """A string or a list of `items` (OpenAI's "content" and "stop"): the value's own type picks
    the branch, so an error names what is wrong with it, not with the other branch."""
    text, many = Annotated[Text, Tag("<text>")], Annotated[items, Tag("<list>")]
    return Annotated[text | many, Discriminator(_text_or_list)]


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    tool_calls: list[dict] | None = None  # OpenAI's, on assistant turns (read by data/formats.py)
    tool_call_id: Text | None = None
    name: Text | None = None
    # Checked after the fields above: null only on an assistant turn that calls tools.
    content: _text_or(list[ContentPart]) | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_unless_calling(cls, v, info):
        if v is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("Field required (null only on an assistant turn with tool_calls)")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_dict(self) -> dict:
        """The message as the chat template gets it: role and text, and the tool fields it has."""
        extra = self.model_dump(include={"tool_calls", "tool_call_id", "name"}, exclude_none=True)
        return {"role": self.role, "content": self.text()} | extra


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict] | None = (
        None  # OpenAI's function definitions: rendered as training did (data/tokenize.py)
    )
    temperature: Number = Field(1.0, ge=0.0, le=2.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, strict=True, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, strict=True, ge=1, le=2**31 - 1)
    stop: _text_or(Annotated[list[Text], Field(max_length=4)]) | None = None
    stream: bool = Field(False, strict=True)
    n: int = Field(1, strict=True, ge=1, le=1)
    seed: int | None = Field(None, strict=True, ge=SEED_MIN, le=SEED_MAX)


class _ClientGone(Exception):
    """The client hung up before its answer was ready."""


def _parse(body: bytes) -> ChatRequest:
    """The request in `body`, or an APIError saying what is wrong with it (400)."""
    bad = "invalid_request_error"
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise APIError(
            400, f"the body is not valid UTF-8 (byte {e.start}): send JSON in UTF-8", bad
        ) from None
    except json.JSONDecodeError as e:
        raise APIError(
            400, f"the body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})", bad
        ) from None
    except RecursionError:
        raise APIError(400, "the body's JSON is nested too deeply", bad) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts (4300)
        raise APIError(400, f"the body is not valid JSON: {e}", bad) from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object (the chat completion request)", bad)
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        raise _invalid(e) from None


# --- the pieces between the socket and the model --------------------------------------------------


def _prompt(
    s: Served, limits: _Limits, messages: list[dict], max_tokens: int | None, default: int, tools=None
):
    """(prompt ids, max_tokens) for a request, or an APIError (400) when it cannot fit the context.

    A prompt of n characters is at least n / longest_token tokens for the tokenizers chat models
    use (byte-level BPE, SentencePiece): each token covers at most its own length. So only its
    first longest_token * (context + 1) characters are tokenized when it is longer: if those alone
    exceed the context, the whole cannot fit."""
    from tunekit.data.tokenize import render_request
    from tunekit.ship.generation import encode, render_prompt

    try:
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            text = render_request(s.tokenizer, messages, tools)  # tool use as training wrote it
        else:
            text = render_prompt(s.tokenizer, messages)
    except TunekitError as e:
        raise APIError(400, str(e), "invalid_request_error", "messages") from None
    limit = limits.context
    too_long = "context_length_exceeded"
    if limit and limits.longest_token and len(text) > limits.longest_token * (limit + 1):
        head = limits.longest_token * (limit + 1)
        n = encode(s.tokenizer, text[:head]).shape[1]
        if n > limit:
            raise APIError(
                400,
                f"the prompt is longer than the model's context of {limit} tokens (its first {head} "
                f"characters alone are {n} tokens); shorten the messages",
                "invalid_request_error",
                "messages",
                too_long,
            )
    ids = encode(s.tokenizer, text)
    n = ids.shape[1]
    if limit and n >= limit:
        raise APIError(
            400,
            f"the prompt ({n} tokens) leaves no room for a reply in the model's context of {limit} "
            "tokens; shorten the messages",
            "invalid_request_error",
            "messages",
            too_long,
        )
    if max_tokens is None:
        return ids, min(default, limit - n) if limit else default
    if limit and n + max_tokens > limit:
        raise APIError(
            400,
            f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceed the model's context of "
            f"{limit} tokens",
            "invalid_request_error",
            "max_tokens",
            too_long,
        )
    return ids, max_tokens


class _Turns:
    """Requests take turns on the models, one generation at a time, in arrival order.

    Waiting is an asyncio lock (a waiter holds no thread and leaves the line when its task is
    cancelled); the generation's worker thread hands the turn on when `model.generate` returns."""

    def __init__(self):
        self.lock = asyncio.Lock()
        self.current = None  # the Generation running now
        self.closing = False
        self.waiting = 0  # how many wait for their turn (a running batch takes no more rows then)

    async def start(self, begin):
        """`begin(on_done)` started with the model to itself: the Generation it returns."""
        loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        try:
            if self.closing:
                raise APIError(
                    503, "the server is shutting down", "server_error", code="server_shutting_down"
                )
            gen = begin(lambda: self._hand_on(loop))
        except BaseException:
            self.lock.release()
            raise
        self.current = gen
        return gen

    def _hand_on(self, loop) -> None:
        """On the worker thread, once its model.generate has returned: the next request's turn."""

        def release():
            self.current = None
            self.lock.release()

        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
            loop.call_soon_threadsafe(release)

    def close(self) -> None:
        """Shutting down: cancel the running generation; whoever waits gets 503."""
        self.closing = True
        if self.current is not None:
            self.current.cancel()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request, work):
    """Await `work`, unless the client hangs up first: then cancel it (its own cleanup runs)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise _ClientGone
    return task.result()


def _asgi_error(status: int, message: str, type: str, code: str | None = None):
    """A tiny ASGI app answering one OpenAI-style error (for the middlewares below)."""
    body = _json(_error(message, type, None, code))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class _RequireKey:
    """Every HTTP path needs the key (the OpenAPI schema and unknown paths too): 401 before anything."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, api_key.encode()
        self.refuse = _asgi_error(
            401,
            "Incorrect or missing API key: send `Authorization: Bearer KEY` with the key the server was started with.",
            "invalid_request_error",
            "invalid_api_key",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.expected):
                return await self.refuse(scope, receive, send)
        await self.app(scope, receive, send)


class _LimitBody:
    """413 for a body over `max_bytes`: at once from its Content-Length, or as soon as a chunked
    body passes the limit (the app then sees the client gone, and its own answer is dropped)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        mb = f"{max_bytes / 2**20:g} MB" if max_bytes >= 2**20 else f"{max_bytes} bytes"
        self.refuse = _asgi_error(
            413,
            f"the request body is over this server's limit of {mb}",
            "invalid_request_error",
            "request_too_large",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.refuse(scope, receive, send)
        read, refused = 0, False

        async def receive_limited():
            nonlocal read, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    refused = True
                    await self.refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, receive_limited, send_unless_refused)
        except Exception:
            if not refused:
                raise


# --- the app ----------------------------------------------------------------------------------------


def create_app(
    served: dict[str, Served],
    api_key: str | None = None,
    default_max_tokens: int = 256,
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20),
    fine_tuning=None,
    max_batch: int = DEFAULT_MAX_BATCH,
    enable_switch: bool = False,
):
    """The FastAPI app over loaded models (tests and `serve` both build it here).
    `app.state.turns.close()` begins a shutdown (serve does it on SIGTERM and Ctrl-C).
    `fine_tuning` (ship/ft_jobs.FineTuning) adds the files and fine-tuning jobs API and its worker."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    if api_key is not None and not api_key:
        raise TunekitError("the API key is empty: give a key, or none to serve without one")

    class JSON(JSONResponse):
        def render(self, content) -> bytes:
            return _json(content)

    turns = _Turns()
    limits = {name: _Limits(s) for name, s in served.items()}
    batchers: dict[object, Batcher] = {}  # one queue per model in memory (adapters share their base's)

    async def start_reply(s: Served, ids: list[int], max_tokens, temperature, top_p, stop, seed):
        """A reply to the prompt `ids` on `s`, decoded in a batch with whatever else is waiting for
        the same model (ship/batching.py); returns once it has started."""
        if s.model not in batchers:
            batchers[s.model] = Batcher(s.model, turns, max_batch)
        return await batchers[s.model].reply(s, ids, max_tokens, temperature, top_p, stop, seed)

    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tunekit-serve")

    async def in_thread(fn, *args):
        """fn(*args) on the pool: parsing, tokenizing and reading replies keep the event loop free.
        A cancelled caller abandons the call, which runs on to its end (soon: its generation is
        cancelled too) with nobody waiting for it."""
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if fine_tuning is not None:
            fine_tuning.start()
        yield
        turns.close()
        pool.shutdown(wait=False, cancel_futures=True)
        if fine_tuning is not None:  # the running job checkpoints, to resume when the server restarts
            await asyncio.to_thread(fine_tuning.stop)

    app = FastAPI(
        title="tunekit", docs_url=None, redoc_url=None, default_response_class=JSON, lifespan=lifespan
    )
    app.state.turns, app.state.batchers = turns, batchers
    # Added last = outermost: the key is checked first, then the body's size.
    app.add_middleware(_LimitBody, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(_RequireKey, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSON(exc.body, status_code=exc.status)

    @app.exception_handler(_ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _gone(request, exc):
        return Response(status_code=499)  # nobody is there to read it

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSON(_error(str(exc.detail), "invalid_request_error", None, code), exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return JSON(
            _error(f"internal error ({type(exc).__name__}); see the server's log", "server_error"), 500
        )

    def model_card(s: Served) -> dict:
        return {"id": s.name, "object": "model", "created": s.created, "owned_by": "tunekit"}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [model_card(s) for s in served.values()]}

    @app.get("/v1/models/{name}")
    def get_model(name: str):
        return model_card(_find(served, name))

    def failed(e: BaseException) -> APIError:
        if turns.closing:
            return APIError(503, "the server is shutting down", "server_error", code="server_shutting_down")
        return APIError(500, f"the model failed while generating: {type(e).__name__}: {e}", "server_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await in_thread(_parse, await request.body())
        s = _find(served, req.model)
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        messages = [m.as_dict() for m in req.messages]
        asked = req.max_completion_tokens or req.max_tokens
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        async def start():
            """Tokenize (off the event loop), then wait for a wave on the model to take the reply."""
            ids, max_tokens = await in_thread(
                _prompt, s, limits[s.name], messages, asked, default_max_tokens, req.tools
            )
            return await start_reply(
                s, ids[0].tolist(), max_tokens, req.temperature, req.top_p, stop, req.seed
            )

        if not req.stream:

            async def answer():
                from tunekit.data.tools import openai_reply

                gen = await start()
                try:
                    text = await in_thread("".join, gen.pieces)
                except Exception as e:
                    raise failed(e) from None
                finally:
                    gen.cancel()  # a no-op once finished; stops it when this request is cancelled
                if gen.reply.finish_reason == "cancelled":  # by a shutdown
                    raise failed(RuntimeError("the generation was cancelled"))
                message, finish = {"role": "assistant", "content": text}, gen.reply.finish_reason
                if req.tools:  # the reply's calls in OpenAI's shape (data/tools.py)
                    message, finish = openai_reply(text, finish)
                return {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": s.name,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": _usage(gen.reply),
                }

            return await _unless_gone(request, answer())

        # Streaming: the first piece is read before the response starts, so that a request that
        # fails before any text (a model error, a shutdown) gets a plain error status.
        gen = await _unless_gone(request, start())
        try:
            first = await _unless_gone(request, in_thread(next, gen.pieces, None))
        except BaseException as e:
            gen.cancel()
            if isinstance(e, Exception) and not isinstance(e, _ClientGone):
                raise failed(e) from None
            raise

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": s.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {_json(body).decode()}\n\n"

        async def events():
            from tunekit.data.tools import openai_reply

            yield chunk({"role": "assistant", "content": ""})
            piece, held = first, []  # with `tools`, the reply is held to send its calls as tool_calls
            try:
                while piece is not None:
                    if req.tools:
                        held.append(piece)
                    else:
                        yield chunk({"content": piece})
                    piece = await in_thread(next, gen.pieces, None)
                if gen.reply.finish_reason == "cancelled":  # by a shutdown
                    raise RuntimeError("the generation was cancelled")
            except Exception as e:  # the status is sent: say it in the stream, as OpenAI does
                yield f"data: {_json(failed(e).body).decode()}\n\n"
                return
            finish = gen.reply.finish_reason
            if req.tools:
                message, finish = openai_reply("".join(held), finish)
                if message["content"]:
                    yield chunk({"content": message["content"]})
                for i, call in enumerate(message.get("tool_calls", [])):
                    yield chunk({"tool_calls": [{"index": i} | call]})
            yield chunk({}, finish)
            yield "data: [DONE]\n\n"

        return _Stream(gen, events())

    class _Stream(StreamingResponse):
        """An SSE response that cancels its generation however the response ends (all sent, the
        client gone, the task cancelled at shutdown)."""

        def __init__(self, gen, content):
            super().__init__(content, media_type="text/event-stream")
            self.gen = gen

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.gen.cancel()

    def openapi() -> dict:
        """FastAPI's schema, with the chat request's (the endpoint parses its body itself)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            body = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                body.pop("$defs", {}), ChatRequest=body
            )
            ref = {"$ref": "#/components/schemas/ChatRequest"}
            schema["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref}},
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    from tunekit.ship import completions  # POST /v1/completions: raw prompts, logprobs, echo

    completions.add_routes(app, served, limits, turns, in_thread, start_reply)

    @app.post("/tunekit/switch")
    async def switch_model(request: Request):
        """Serve a name from a new run from now on (ship/switch.py), loaded in a turn of its own."""
        from tunekit.console import err
        from tunekit.ship import switch

        if not enable_switch:
            raise APIError(
                403, "switching is off: start the server with --enable-switch", "invalid_request_error",
                code="switch_disabled",
            )  # fmt: skip
        req = switch.parse(await request.body())
        old, new, gate = await in_thread(switch.check, served, req)

        def begin(on_done):
            return completions.InTurn(lambda: load_run(new, old.name, served), on_done)

        try:
            s = await (await turns.start(begin)).done
        except TunekitError as e:
            raise APIError(400, f"run: {e}", "invalid_request_error", "run") from None
        body = switch.commit(served, limits, s, old, gate)
        err.print(f"{s.name} now serves {new} (was {old.run_dir}; gate: {body['gate']})")
        return body

    if fine_tuning is not None:
        fine_tuning.attach(app, served, limits)
    return app


def _usage(reply) -> dict:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


def serve(
    run_dirs: list[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_body_mb: float | None = None,
    enable_fine_tuning: bool = False,
    fine_tune_config: Path | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    enable_switch: bool = False,
) -> None:
    """Load the runs and serve them until SIGTERM or Ctrl-C. `enable_fine_tuning` adds OpenAI's
    files and fine-tuning jobs API (ship/ft_jobs.py), its jobs trained with `fine_tune_config`'s keys.
    After Ctrl-C the exit status is 130;
    SIGTERM ends the process by that signal once the server has stopped, as uvicorn does."""
    import uvicorn

    from tunekit.console import err

    max_body_mb = DEFAULT_MAX_BODY_MB if max_body_mb is None else max_body_mb
    if not (max_body_mb > 0 and math.isfinite(max_body_mb)):
        raise TunekitError(f"--max-body-mb: {max_body_mb} is not a size; give megabytes, e.g. 4")
    if api_key is not None and not api_key:
        raise TunekitError(
            f"--api-key (or ${API_KEY_ENV}) is empty: give a key, or none to serve without one"
        )
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(
            f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it can use it"
        )

    class Server(uvicorn.Server):
        """uvicorn's, which also cancels the running generation as soon as a stop signal arrives
        (uvicorn alone waits for open streams to end, up to its grace period)."""

        loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig, frame):
            self.stopped_by = sig
            super().handle_exit(sig, frame)
            if self.loop is not None:  # a signal handler only schedules; the loop does the work
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(app.state.turns.close)

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

    try:
        fine_tuning = None
        if fine_tune_config is not None and not enable_fine_tuning:
            raise TunekitError("--fine-tune-config is for fine-tuning jobs: give --enable-fine-tuning too")
        if enable_fine_tuning:
            from tunekit.ship.ft_jobs import FineTuning, read_defaults

            fine_tuning = FineTuning(read_defaults(fine_tune_config))
        # With the jobs API on, a server may start with no model: it serves what its jobs train.
        served = load_models(run_dirs) if run_dirs or fine_tuning is None else {}
        app = create_app(
            served, api_key, max_body_bytes=int(max_body_mb * 2**20), fine_tuning=fine_tuning,
            max_batch=max_batch, enable_switch=enable_switch,
        )  # fmt: skip
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S
        )
        key = " (every request needs the API key)" if api_key else ""
        jobs = " and the fine-tuning API" if fine_tuning is not None else ""
        err.print(f"serving {', '.join(served) or 'no model yet'}{jobs} at http://{host}:{port}/v1{key}")
        server = Server(config)
        server.stopped_by = None
        server.run()
        # uvicorn re-raises the signal it caught once it has stopped; should that come out as a
        # plain return (it can, when the grace period ran out), Ctrl-C still exits with 130.
        if server.stopped_by == signal.SIGINT:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        err.print("stopped")
        raise SystemExit(130) from None
