"""OpenAI's legacy `POST /v1/completions` on the served models: raw text in (no chat template),
with `logprobs` and `echo`, so a served fine-tune can be scored by log-likelihood (lm-eval-harness's
`local-completions` model sends `prompt` as token ids with `echo: true, logprobs: 1, max_tokens: 1`
and sums the prompt's continuation tokens' logprobs).

A prompt is text (tokenized as the tokenizer does by default: with its BOS token if it adds one) or
a list of token ids, taken as they are; a list of them is a batch, answered one choice each in
order. Generation is batched with the chat requests' (ship/batching.py: stop strings, seeds,
sampling); the logprobs come from one forward pass over prompt + completion, in a turn of its own on
the model, so they are the model's own (not the sampler's) log-probabilities. `top_logprobs` keys are each token
decoded on its own; the first prompt token has no logprob (null), as OpenAI's. Not streamed.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Annotated

import torch
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunekit.ship.api import (
    SEED_MAX,
    SEED_MIN,
    APIError,
    Number,
    Text,
    _find,
    _invalid,
)

BAD = "invalid_request_error"
MAX_TOP_LOGPROBS = 5  # OpenAI's limit for completions
TokenIds = Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1)]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text
    prompt: (
        Text
        | TokenIds
        | Annotated[list[Text], Field(min_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: int = Field(16, strict=True, ge=0, le=2**31 - 1)
    temperature: Number = Field(1.0, ge=0.0, le=2.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, strict=True, ge=1, le=1)
    stream: bool = Field(False, strict=True)
    logprobs: int | None = Field(None, strict=True, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = Field(False, strict=True)
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: int | None = Field(None, strict=True, ge=SEED_MIN, le=SEED_MAX)


def prompts(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        return [p]
    return list(p)


def prompt_ids(tokenizer, prompt: str | list[int], vocab: int) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    bad = [t for t in prompt if t >= vocab]
    if bad:
        raise APIError(
            400, f"prompt: token id {bad[0]} is outside the vocabulary (0 .. {vocab - 1})", BAD, "prompt"
        )
    return prompt


def score(model, tokenizer, ids: list[int], top: int) -> dict:
    """OpenAI's `logprobs` object for `ids`: each token's log-probability given those before it."""
    from tunekit.models.device import autocast, model_device

    device = model_device(model)
    with torch.no_grad(), autocast(device):
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(ids[1:], device=logp.device)
    token_lp = [None] + logp[:-1].gather(1, target[:, None])[:, 0].tolist()
    top_lp: list = [None]
    if top > 0:
        values, indices = logp[:-1].topk(top, dim=-1)
        for vals, idx in zip(values.tolist(), indices.tolist(), strict=True):
            top_lp.append({tokenizer.decode([i]): v for i, v in zip(idx, vals, strict=True)})
    else:
        top_lp += [{} for _ in ids[1:]]
    pieces = [tokenizer.decode([i]) for i in ids]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": token_lp, "top_logprobs": top_lp, "text_offset": offsets}


class InTurn:
    """A forward pass run on a thread once it is this request's turn on the model; like a
    Generation, it calls `on_done` (the next request's turn) only when the model is free again."""

    def __init__(self, fn, on_done):
        self.done = asyncio.get_running_loop().create_future()
        loop = self.done.get_loop()

        def run():
            try:
                result, error = fn(), None
            except BaseException as e:
                result, error = None, e
            finally:
                on_done()
            loop.call_soon_threadsafe(self._settle, result, error)

        threading.Thread(target=run, daemon=True, name="tunekit-score").start()

    def _settle(self, result, error):
        if not self.done.done():
            self.done.set_exception(error) if error else self.done.set_result(result)

    def cancel(self) -> None:
        """A forward pass is short: it runs to its end."""


def add_routes(app, served: dict, limits: dict, turns, in_thread, start_reply) -> None:
    """`POST /v1/completions` on `app`: its replies batched with the chat requests' (`start_reply`,
    serve.py), its scoring passes taking turns on the models with them."""

    @app.post("/v1/completions")
    async def completions(request: Request):
        import json

        try:
            req = CompletionRequest.model_validate(json.loads(await request.body()))
        except ValidationError as e:
            raise _invalid(e) from None
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", BAD) from None
        if req.stream:
            raise APIError(
                400, "stream: /v1/completions does not stream here; send stream: false", BAD, "stream"
            )
        s = _find(served, req.model)
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        context = limits[s.name].context
        vocab = s.model.get_input_embeddings().weight.shape[0]
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, prompt in enumerate(prompts(req)):
            ids = await in_thread(prompt_ids, s.tokenizer, prompt, vocab)
            if context and len(ids) + req.max_tokens > context:
                raise APIError(
                    400,
                    f"prompt {index}: its {len(ids)} tokens plus max_tokens ({req.max_tokens}) exceed the model's "
                    f"context of {context} tokens",
                    BAD,
                    "prompt",
                    "context_length_exceeded",
                )
            text, finish, new_ids = "", "length", []
            if req.max_tokens > 0:
                text, finish, new_ids = await _generate(s, ids, req, stop, start_reply, in_thread)
            choice = {"text": (s.tokenizer.decode(ids) if req.echo else "") + text, "index": index}
            choice["logprobs"] = None
            if req.logprobs is not None:
                scored = ids + new_ids

                def begin(on_done, scored=scored):
                    if s.adapter is not None:
                        s.model.set_adapter(s.adapter)
                    return InTurn(lambda: score(s.model, s.tokenizer, scored, req.logprobs), on_done)

                lp = await (await turns.start(begin)).done
                if not req.echo:  # only the completion's tokens, offsets from the completion's start
                    start = lp["text_offset"][len(ids)] if new_ids else 0
                    lp = {k: v[len(ids) :] for k, v in lp.items()}
                    lp["text_offset"] = [o - start for o in lp["text_offset"]]
                choice["logprobs"] = lp
            choice["finish_reason"] = finish
            choices.append(choice)
            prompt_tokens, completion_tokens = prompt_tokens + len(ids), completion_tokens + len(new_ids)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": s.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


async def _generate(s, ids: list[int], req: CompletionRequest, stop, start_reply, in_thread):
    """(text, finish_reason, the completion's token ids) for one prompt, decoded in a batch."""
    gen = await start_reply(s, ids, req.max_tokens, req.temperature, req.top_p, stop, req.seed)
    try:
        text = await in_thread("".join, gen.pieces)
    except Exception as e:
        raise APIError(
            500, f"the model failed while generating: {type(e).__name__}: {e}", "server_error"
        ) from None
    finally:
        gen.cancel()
    if gen.reply.finish_reason == "cancelled":
        raise APIError(503, "the server is shutting down", "server_error", code="server_shutting_down")
    new_ids = s.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return text, gen.reply.finish_reason, new_ids
