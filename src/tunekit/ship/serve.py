"""`tunekit serve RUN_DIR [RUN_DIR ...]`: an OpenAI-compatible server for fine-tunes.

    GET  /v1/models              the served fine-tunes (one per run directory, named after it)
    POST /v1/chat/completions    streaming (SSE) and not; temperature, top_p, max_tokens, stop, seed

Adapter runs on the same base share one copy of it in memory: each adapter is loaded under its
run's name and switched per request by the `model` field (requests take turns on the model; a
lock keeps one adapter active per generation). Full fine-tunes are loaded as their own models.
Prompts go through each run's own tokenizer and chat template, and replies stop on the stop
tokens training taught (models/stops.py, the ones `tunekit eval` stops on too).

Safe by default: binds to 127.0.0.1; with `--api-key` every request needs `Authorization:
Bearer KEY`. Bad requests get OpenAI-style error bodies: {"error": {"message", "type", "param",
"code"}}.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from tunekit.errors import TunekitError


@dataclass
class Served:
    """One servable fine-tune: the model it runs on and, for adapter runs, which adapter."""

    name: str
    run_dir: Path
    model: object
    tokenizer: object
    adapter: str | None
    created: int


def load_models(run_dirs: list[str | Path]) -> dict[str, Served]:
    """Load every run; adapter runs on the same base (model and method) share one base model.

    Each run loads through train/setup.load_trained, except that a further adapter on a base
    already in memory is added to that model under its run's name rather than loaded with a copy
    of the base."""
    from tunekit.models import load_tokenizer, resolve_model
    from tunekit.ship.export import check_generative
    from tunekit.train.setup import load_trained, trained_dir

    served: dict[str, Served] = {}
    bases: dict[tuple[str, str], object] = {}  # (base model folder, method) -> its PeftModel
    for run_dir in map(Path, run_dirs):
        cfg = check_generative(run_dir)
        name = _unique(run_dir.resolve().name, served)
        created = int((run_dir / "config.yaml").stat().st_mtime)
        path, is_adapter = trained_dir(run_dir)
        if not is_adapter:
            model, tokenizer, _ = load_trained(run_dir)
            served[name] = Served(name, run_dir, model, tokenizer, None, created)
            continue
        key = (str(resolve_model(cfg.model)), cfg.method)
        if key not in bases:
            bases[key], tokenizer, _ = load_trained(run_dir, adapter_name=name)
        else:
            bases[key].load_adapter(path, adapter_name=name)
            tokenizer = load_tokenizer(path)
        served[name] = Served(name, run_dir, bases[key], tokenizer, name, created)
    if not served:
        raise TunekitError("tunekit serve: give at least one run directory")
    return served


def _unique(name: str, taken) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    return out


# --- request schema (OpenAI's, the fields this server honours; other fields are ignored) ---------


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type: str, param: str | None = None, code: str | None = None
    ):
        self.status, self.body = (
            status,
            {"error": {"message": message, "type": type, "param": param, "code": code}},
        )


def create_app(served: dict[str, Served], api_key: str | None = None, default_max_tokens: int = 256):
    """The FastAPI app over loaded models (tests and `serve` both build it here)."""
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tunekit", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one generation at a time: the shared base has one active adapter

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        body = APIError(400, message, "invalid_request_error", param).body
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            APIError(exc.status_code, str(exc.detail), "invalid_request_error", None, code).body,
            exc.status_code,
        )

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer KEY` with the key the server was started with.",
                "invalid_request_error",
                code="invalid_api_key",
            )

    def model_card(s: Served) -> dict:
        return {"id": s.name, "object": "model", "created": s.created, "owned_by": "tunekit"}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    def list_models():
        return {"object": "list", "data": [model_card(s) for s in served.values()]}

    @app.get("/v1/models/{name}", dependencies=[Depends(check_key)])
    def get_model(name: str):
        return model_card(_find(served, name))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    def chat_completions(req: ChatRequest):
        s = _find(served, req.model)
        max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stop) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", "invalid_request_error", "stop")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def start():
            """Take the model, switch to the run's adapter, start generating. Caller releases."""
            from tunekit.ship.generation import prompt_ids, stream_reply

            limit = getattr(s.model.config, "max_position_embeddings", None)
            try:
                n_prompt = prompt_ids(s.tokenizer, messages).shape[1]
            except TunekitError as e:
                raise APIError(400, str(e), "invalid_request_error", "messages") from None
            if limit and n_prompt + max_tokens > limit:
                raise APIError(
                    400,
                    f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                    f"context of {limit} tokens",
                    "invalid_request_error",
                    "messages",
                    "context_length_exceeded",
                )
            lock.acquire()
            try:
                if s.adapter is not None:
                    s.model.set_adapter(s.adapter)
                return stream_reply(
                    s.model, s.tokenizer, messages, max_tokens, req.temperature, req.top_p, stop, req.seed
                )
            except BaseException:
                lock.release()
                raise

        pieces, reply = start()
        if not req.stream:
            try:
                text = "".join(pieces)
            finally:
                lock.release()
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": s.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reply.finish_reason,
                    }
                ],
                "usage": _usage(reply),
            }

        def events():
            def chunk(delta: dict, finish: str | None = None) -> str:
                body = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": s.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                return f"data: {json.dumps(body)}\n\n"

            try:
                yield chunk({"role": "assistant", "content": ""})
                for piece in pieces:
                    yield chunk({"content": piece})
                yield chunk({}, reply.finish_reason)
                yield "data: [DONE]\n\n"
            finally:
                pieces.close()
                lock.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _find(served: dict[str, Served], name: str) -> Served:
    if name not in served:
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server has: {', '.join(served)}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    return served[name]


def _usage(reply) -> dict:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


def serve(
    run_dirs: list[str | Path], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None
) -> None:
    """Load the runs and serve them until interrupted."""
    import uvicorn

    from tunekit.console import err

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(
            f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it can use it"
        )
    served = load_models(run_dirs)
    err.print(f"serving {', '.join(served)} at http://{host}:{port}/v1")
    uvicorn.run(create_app(served, api_key), host=host, port=port, log_level="warning")
