"""The OpenAI-style HTTP pieces every route of `tunekit serve` shares: the served-model record, the
request field types, errors as OpenAI's error body, and the context limits of a served model.

They live below serve.py so that the routes kept in modules of their own (completions.py, the
fine-tuning API's files and jobs) import them without importing the server that mounts them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed accepts (negatives wrap modulo 2**64)
_BRANCHES = {"<text>", "<list>"}  # taken out of an error's location


@dataclass
class Served:
    """One servable fine-tune: the model it runs on and, for adapter runs, which adapter."""

    name: str
    run_dir: Path
    model: object
    tokenizer: object
    adapter: str | None
    created: int
    base: tuple[str, str] | None = None  # an adapter's (base model, method): adapters on one share it


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"not valid Unicode: a lone surrogate ({ascii(text[e.start])}) at character {e.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type: str, param: str | None = None, code: str | None = None
    ):
        self.status, self.body = status, _error(message, type, param, code)


def _error(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _json(body: dict) -> bytes:
    # ensure_ascii: any text (a name with an undecodable byte, a message quoting input) encodes.
    return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode()


def _invalid(e: ValidationError) -> APIError:
    first = e.errors(include_url=False)[0]
    param = ".".join(str(x) for x in first.get("loc", ()) if x not in _BRANCHES) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return APIError(400, message, "invalid_request_error", param)


class _Limits:
    """A served model's context and its tokenizer's longest token (in characters), to refuse a
    prompt that cannot fit before tokenizing all of it."""

    def __init__(self, s: Served):
        self.context = getattr(s.model.config, "max_position_embeddings", None)
        try:
            self.longest_token = max(map(len, s.tokenizer.get_vocab()))
        except Exception:  # a tokenizer without a vocabulary to read: tokenize the whole prompt
            self.longest_token = None


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
