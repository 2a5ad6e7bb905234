"""Replies at inference time exactly as training shaped them: the run's chat template, its stop tokens.

Which ids end a reply, and how its text is cut there, come from models/stops.py, the one source
`tunekit eval` uses too: what serve and chat answer is what eval scored.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tunekit.errors import TunekitError
from tunekit.models.device import autocast, model_device
from tunekit.models.stops import reply_text, stop_token_ids


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> torch.Tensor:
    """(1, T) token ids of `messages` rendered with the chat template, ready for the reply."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises its own errors for roles a template refuses
        raise TunekitError(f"messages: the model's chat template cannot render them ({e})") from None
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@dataclass
class Reply:
    """The outcome of one generation: why it ended, and token counts for `usage`."""

    finish_reason: str = "length"  # "stop" (stop token or stop string) or "length" (max_tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _StopWhen:
    """A StoppingCriteria: the decoded reply contains a stop string, or the reader went away."""

    def __init__(self, tokenizer, stops: list[str], start: int, stop_ids: list[int]):
        self.tokenizer, self.stops, self.start, self.stop_ids = tokenizer, stops, start, stop_ids
        self.cancelled = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        stop = self.cancelled.is_set()
        if self.stops and not stop:
            text = reply_text(self.tokenizer, input_ids[0, self.start :].tolist(), self.stop_ids)
            stop = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _reply_streamer(tokenizer, stop_ids: list[int]):
    """A TextIteratorStreamer of the reply's text that drops the stop tokens, as
    models/stops.reply_text does: an end-of-turn token that is not a special token would otherwise
    be streamed as text."""
    from transformers import TextIteratorStreamer

    class ReplyStreamer(TextIteratorStreamer):
        def put(self, value):
            if not self.next_tokens_are_prompt:  # the prompt comes first, whole, and is skipped
                value = value.reshape(-1)
                # Generation ends at the first stop id, so dropping them cuts the reply there.
                value = value[~torch.isin(value, torch.tensor(stop_ids, device=value.device))]
                if value.numel() == 0:
                    return
            super().put(value)

    return ReplyStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def stream_reply(
    model,
    tokenizer,
    messages: list[dict[str, str]],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
) -> tuple[Iterator[str], Reply]:
    """Generate a reply to `messages`, yielding text pieces as they decode.

    Returns (pieces, reply); `reply` is filled in once `pieces` is exhausted. temperature 0 is
    greedy; stop strings are cut from the text (OpenAI semantics: the stop string is not returned).
    """
    from transformers import StoppingCriteriaList

    device = model_device(model)
    ids = prompt_ids(tokenizer, messages).to(device)
    stops = [s for s in (stop or []) if s]
    eos = stop_token_ids(tokenizer, model)
    criteria = _StopWhen(tokenizer, stops, ids.shape[1], eos)
    streamer = _reply_streamer(tokenizer, eos)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": max_tokens,
        "do_sample": temperature > 0,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
        "streamer": streamer,
        "stopping_criteria": StoppingCriteriaList([criteria]),
    }
    if temperature > 0:
        kwargs |= {"temperature": temperature, "top_p": top_p, "top_k": 0}
    reply = Reply(prompt_tokens=int(ids.shape[1]))
    result: dict = {}

    def run():
        if seed is not None:
            torch.manual_seed(seed)
        try:
            with torch.no_grad(), autocast(device):  # autocast is per thread: enter it here
                result["out"] = model.generate(**kwargs).cpu()
        except BaseException as e:  # surface it in the caller's thread, after the streamer ends
            result["error"] = e
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()

    def pieces() -> Iterator[str]:
        text = ""
        sent = 0
        try:
            for piece in streamer:
                text += piece
                cut = _first_stop(text, stops)
                # Hold back a tail that could still grow into a stop string.
                safe = cut if cut is not None else len(text) - max((len(s) - 1 for s in stops), default=0)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
                if cut is not None:
                    break
        finally:
            # Also when the reader stops early (a client hung up): end the generation before the
            # caller releases the model to the next request.
            criteria.cancelled.set()
            worker.join()
        if "error" in result:
            raise result["error"]
        cut = _first_stop(text, stops)
        end = cut if cut is not None else len(text)
        if end > sent:
            yield text[sent:end]
        new = result["out"][0, ids.shape[1] :]
        reply.completion_tokens = int(new.shape[0])
        ended_on_eos = reply.completion_tokens > 0 and int(new[-1]) in eos
        reply.finish_reason = "stop" if (ended_on_eos or cut is not None) else "length"

    return pieces(), reply


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
