"""Replies at inference time exactly as training shaped them: the run's chat template, its stop tokens.

Which ids end a reply, and how its text is cut there, come from models/stops.py, the one source
`tunekit eval` uses too: what serve and chat answer is what eval scored.

A reply is generated on a worker thread while its reader takes the text piece by piece
(`Generation`). The worker owns the end of it: whatever happens (the reply is complete, the model
fails, the reader stops early, hangs up, or is garbage collected, even on the worker thread
itself), the worker ends the text stream and then calls `on_done`, once, after `model.generate`
has returned. That is where a server hands the model to its next request; nothing else has to run
for the model to be freed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tunekit.errors import TunekitError
from tunekit.models.device import autocast, model_device
from tunekit.models.stops import reply_text, stop_token_ids


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The text of `messages` in the chat template, ending where the reply begins."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises its own errors for roles a template refuses
        raise TunekitError(f"messages: the model's chat template cannot render them ({e})") from None


def encode(tokenizer, text: str) -> torch.Tensor:
    """(1, T) token ids of a rendered prompt (the template wrote its special tokens already)."""
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> torch.Tensor:
    """(1, T) token ids of `messages` rendered with the chat template, ready for the reply."""
    return encode(tokenizer, render_prompt(tokenizer, messages))


@dataclass
class Reply:
    """The outcome of one generation: why it ended, and token counts for `usage`."""

    # "stop" (stop token or stop string), "length" (max_tokens), or "cancelled" (cancel() cut it short)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _StopWhen:
    """A StoppingCriteria: the reply's end contains a stop string, or generation was cancelled.

    Only the last tokens are decoded, enough to hold the longest stop string (a character is at
    most 4 byte-level tokens), so a long reply costs the same per step as a short one."""

    def __init__(self, tokenizer, stops: list[str], start: int, stop_ids: list[int]):
        self.tokenizer, self.stops, self.start, self.stop_ids = tokenizer, stops, start, stop_ids
        self.window = 4 * max((len(s) for s in stops), default=0) + 8
        self.cancelled = threading.Event()
        self.interrupted = False  # generation stopped because it was cancelled

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        stop = self.interrupted = self.cancelled.is_set()
        if self.stops and not stop:
            tail = input_ids[0, max(self.start, input_ids.shape[1] - self.window) :].tolist()
            text = reply_text(self.tokenizer, tail, self.stop_ids)
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


class _Text:
    """Reading a reply's text as it decodes, from a streamer that something else fills: a
    Generation's own worker, or a wave of batched replies (ship/batching.py).

    The producer sets `_new` (the reply's token ids), `_error` and `_interrupted`, then ends the
    streamer, and sets `_finished` once it is done with the model: the reader waits for that.
    """

    stops: list[str]
    stop_ids: list[int]
    reply: Reply

    def _start_reading(self, tokenizer, stop: list[str] | None, stop_ids: list[int], prompt_tokens: int):
        self.stops = [s for s in (stop or []) if s]
        self.stop_ids = stop_ids
        self._streamer = _reply_streamer(tokenizer, stop_ids)
        self.reply = Reply(prompt_tokens=prompt_tokens)
        self._new: list[int] = []
        self._error: BaseException | None = None
        self._interrupted = False
        self._producer: threading.Thread | None = None  # the thread that fills the streamer
        self._finished = threading.Event()
        self.pieces: Iterator[str] = self._pieces()

    def cancel(self) -> None:
        raise NotImplementedError

    def _pieces(self) -> Iterator[str]:
        stops, text, sent, cut = self.stops, "", 0, None
        hold = max((len(s) - 1 for s in stops), default=0)  # a tail that could still grow into a stop
        try:
            for piece in self._streamer:
                searched = len(text)
                text += piece
                cut = _first_stop(text, stops, max(0, searched - hold))
                safe = cut if cut is not None else len(text) - hold
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
                if cut is not None:
                    break
        finally:
            # Also when the reader stops early (a client hung up) or this generator is finalised by
            # the garbage collector, possibly on the producer's thread itself: stop generating, and
            # wait for the producer unless this is it.
            self.cancel()
            if threading.current_thread() is not self._producer:
                self._finished.wait()
        if self._error is not None:
            raise self._error
        end = cut if cut is not None else len(text)
        if end > sent:
            yield text[sent:end]
        self.reply.completion_tokens = len(self._new)
        ended_on_eos = bool(self._new) and self._new[-1] in self.stop_ids
        if ended_on_eos or cut is not None:
            self.reply.finish_reason = "stop"
        else:
            self.reply.finish_reason = "cancelled" if self._interrupted else "length"


class Generation(_Text):
    """One reply to `messages` (or to the prompt `input_ids`), generated on a worker thread.

    Iterate `pieces` for its text as it decodes (stop strings cut, OpenAI's way: not returned);
    `reply` is filled in once they are exhausted, and they raise what `model.generate` raised.
    `cancel()` ends the generation at its next token, from any thread. `on_done()` runs on the
    worker, once, after `model.generate` has returned, however the generation ended.
    """

    def __init__(
        self,
        model,
        tokenizer,
        messages: list[dict[str, str]] | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        on_done: Callable[[], None] | None = None,
    ):
        from transformers import StoppingCriteriaList

        device = model_device(model)
        ids = (prompt_ids(tokenizer, messages) if input_ids is None else input_ids).to(device)
        self._start_reading(tokenizer, stop, stop_token_ids(tokenizer, model), int(ids.shape[1]))
        self._criteria = _StopWhen(tokenizer, self.stops, ids.shape[1], self.stop_ids)
        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": max_tokens,
            "do_sample": temperature > 0,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.stop_ids[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
            "streamer": self._streamer,
            "stopping_criteria": StoppingCriteriaList([self._criteria]),
        }
        if temperature > 0:
            kwargs |= {"temperature": temperature, "top_p": top_p, "top_k": 0}
        self._producer = threading.Thread(
            target=self._run, args=(model, kwargs, seed, on_done), daemon=True, name="tunekit-generate"
        )
        self._producer.start()

    def cancel(self) -> None:
        """Stop generating at the next token (any thread; the reply then ends where it got to,
        with finish_reason "cancelled" unless it had ended already)."""
        self._criteria.cancelled.set()

    def _run(self, model, kwargs: dict, seed: int | None, on_done) -> None:
        try:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad(), autocast(model_device(model)):  # autocast is per thread: enter it here
                out = model.generate(**kwargs).cpu()
            self._new = out[0, self.reply.prompt_tokens :].tolist()
        except BaseException as e:  # raised to the reader, after the text it had
            self._error = e
        finally:
            # End the reader's stream whatever happened (generate ends it too when it returns; a
            # second end-of-stream is never read), then free the model.
            self._interrupted = self._criteria.interrupted
            self._streamer.text_queue.put(self._streamer.stop_signal)
            try:
                if on_done is not None:
                    on_done()
            finally:
                self._finished.set()


def stream_reply(
    model,
    tokenizer,
    messages: list[dict[str, str]],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    on_done: Callable[[], None] | None = None,
) -> tuple[Iterator[str], Reply]:
    """Generate a reply to `messages`, yielding text pieces as they decode.

    Returns (pieces, reply); `reply` is filled in once `pieces` is exhausted. temperature 0 is
    greedy; stop strings are cut from the text (OpenAI semantics: the stop string is not returned).
    """
    g = Generation(model, tokenizer, messages, max_tokens, temperature, top_p, stop, seed, on_done=on_done)
    return g.pieces, g.reply


def _first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Where the first stop string begins in `text` (none begins before `start`), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None
