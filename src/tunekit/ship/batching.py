"""Batched serving: concurrent replies on one model decode together, one forward pass per token.

On a small model one token of one reply costs about what a token of eight replies costs (the
weights are read once per step either way), so requests that arrive together are decoded as one
batch: a *wave*. Requests queue per model while the model is busy; when it is their turn (the
server's turn-taking, shared with scoring), everything queued for that model, up to `max_batch`,
starts as the next wave. A reply leaves its wave as soon as it ends (stop token, stop string,
max_tokens, cancelled), and the rows left go on with a smaller batch.

Each row keeps everything a lone reply has: its own sampling (temperature, top_p, and a seed on a
generator of its own, so a seeded reply does not depend on what it was batched with), stop strings,
max_tokens, and streaming through the same text reader as a Generation (ship/generation.py).
Replies for different LoRA adapters of one base share a wave: each LoRA layer's update is computed
for all rows at once from the adapters' stacked weights (`_GatheredLora`; PEFT's `adapter_names`
batches where the layers are not plain LoRA Linear); adapters that cannot mix (DoRA) batch only with
their own.

Prompts are left-padded to one length, with the attention mask and position ids that make a padded
row compute what it would alone; the KV cache drops rows as they finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading

import torch

from tunekit.models.device import autocast, model_device
from tunekit.models.stops import reply_text, stop_token_ids
from tunekit.ship.api import APIError
from tunekit.ship.generation import _Text

DEFAULT_MAX_BATCH = 8


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", "server_error", code="server_shutting_down")


class Row(_Text):
    """One reply in a wave: read `pieces` and `reply` as from a Generation. `started` (a future on
    the event loop) is set when its wave begins, or fails with 503 if the server shuts down first."""

    def __init__(self, served, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                 stop: list[str] | None, seed: int | None):  # fmt: skip
        self.served, self.ids, self.max_tokens = served, ids, max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self._start_reading(served.tokenizer, stop, stop_token_ids(served.tokenizer, served.model), len(ids))
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 8  # as generation._StopWhen
        self.cancelled = threading.Event()
        self._loop = asyncio.get_running_loop()
        self.started = self._loop.create_future()

    def cancel(self) -> None:
        """Leave the wave at its next token (any thread); a row still queued never starts."""
        self.cancelled.set()

    def begin(self) -> None:
        """Taken into a wave (any thread): its waiter goes on."""
        self._settle(None)

    def refuse(self, error: BaseException, tell_waiter: bool = True) -> None:
        """Never started (the server is shutting down, or its client left): its reader gets
        `error`, and so does its waiter if it still waits (any thread)."""
        self._error = error
        self._streamer.text_queue.put(self._streamer.stop_signal)
        self._finished.set()
        self._settle(error if tell_waiter else asyncio.CancelledError())

    def _settle(self, error: BaseException | None) -> None:
        def settle():
            if self.started.done():
                return
            if error is None:
                self.started.set_result(None)
            elif isinstance(error, asyncio.CancelledError):
                self.started.cancel()
            else:
                self.started.set_exception(error)
                self.started.exception()  # marked retrieved: the waiter may have gone meanwhile

        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits
            self._loop.call_soon_threadsafe(settle)

    # --- on the wave's thread ---

    def _sampler(self) -> torch.Generator | None:
        if self.temperature <= 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed % 2**64)  # negatives wrap, as torch.manual_seed does
        return g

    def _choose(self, logits: torch.Tensor, generator) -> int:
        """The next token: greedy at temperature 0, else sampled as transformers samples
        (temperature, then the smallest set of tokens whose probability reaches top_p)."""
        if generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            probs, order = probs.sort(descending=True)
            probs[1:][(probs.cumsum(0) - probs)[1:] >= self.top_p] = 0  # the first token always stays
            return int(order[torch.multinomial(probs, 1, generator=generator)])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _ends_on_stop_string(self) -> bool:
        if not self.stops:
            return False
        text = reply_text(self.served.tokenizer, self._new[-self.window :], self.stop_ids)
        return any(s in text for s in self.stops)

    def _finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._error = error
        self._streamer.end()  # what the streamer held back, then the end of the stream
        self._finished.set()


class Wave:
    """Rows decoded together on a worker thread for as long as any is decoding. Rows queued for
    the model meanwhile join at the next token (`Batcher.take`), unless something else waits for
    the model: then the wave drains and hands the model on. `on_done()` runs after the last forward
    pass: the model is free then. `cancel()` ends every row at its next token."""

    def __init__(self, batcher: Batcher, rows: list[Row], on_done):
        self.batcher, self.rows = batcher, list(rows)  # every row that has been in the wave
        self._thread = threading.Thread(target=self._run, args=(on_done,), daemon=True, name="tunekit-batch")
        for row in rows:
            row._producer = self._thread
        self._thread.start()

    def cancel(self) -> None:
        for row in list(self.rows):
            row.cancel()

    def _run(self, on_done) -> None:
        batch = _Batch(self.batcher.model)
        try:
            with torch.no_grad(), autocast(batch.device):  # per thread: entered here
                self._decode(batch)
        except BaseException as e:  # every row not yet ended gets it, after the text it had
            for row in self.rows:
                if not row._finished.is_set():
                    row._finish(e)
        finally:
            batch.close()
            for row in self.rows:  # a row left unfinished by a bug still ends its reader's stream
                if not row._finished.is_set():
                    row._finish()
            self.batcher.largest = max(self.batcher.largest, batch.largest)
            on_done()

    def _decode(self, batch: _Batch) -> None:
        batch.admit(self.rows)
        while True:
            if batch.joinable:
                joining = self.batcher.take(len(batch.live), batch.live[0].served.adapter)
                if joining:
                    for row in joining:
                        row._producer = self._thread
                    self.rows += joining
                    batch.admit(joining)
            chosen, ended = [], []
            for i, row in enumerate(batch.live):
                if row.cancelled.is_set():
                    row._interrupted = True
                    ended.append(i)
                    chosen.append(None)
                    continue
                token = row._choose(batch.logits[i], batch.samplers[i])
                chosen.append(token)
                row._new.append(token)
                row._streamer.put(torch.tensor([token]))
                if token in row.stop_ids or len(row._new) >= row.max_tokens or row._ends_on_stop_string():
                    ended.append(i)
            if ended:
                for i in ended:
                    batch.live[i]._finish()
                keep = [i for i in range(len(batch.live)) if i not in set(ended)]
                if not keep:
                    return
                batch.keep(keep)
                chosen = [chosen[i] for i in keep]
            batch.forward(chosen)


class _Batch:
    """The rows of a wave and their state: the KV cache, the attention mask over it, each row's
    next position, and the logits of each row's next token."""

    def __init__(self, model):
        self.model, self.device = model, model_device(model)
        takes = _forward_parameters(model)
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        self.cache_key = "cache" if "cache" in takes else "past_key_values"  # renamed in transformers 5
        self.live: list[Row] = []
        self.samplers: list[torch.Generator | None] = []
        self.cache = self.mask = self.step = self.logits = None
        self.joinable = False
        self.largest = 0
        self._active = None  # the adapter set active on the model
        self._gathered: _GatheredLora | bool | None = None  # hooks for rows on different adapters

    def _adapters(self, rows: list[Row]) -> dict:
        """Set up the forward pass for the rows' adapters: one adapter for all rows (made active),
        else one per row (gathered LoRA weights, or PEFT's mixed-adapter batch); its arguments."""
        names = [row.served.adapter for row in rows]
        if names[0] is None:
            return {}
        mixed = len(set(names)) > 1
        if self._gathered is None and mixed:
            self._gathered = _GatheredLora.over(self.model) or False  # False: the layers cannot
        if self._gathered:
            self._gathered.use(names if mixed else None)
        if not mixed:
            if self._active != names[0]:
                self.model.set_adapter(names[0])
                self._active = names[0]
            return {}
        return {} if self._gathered else {"adapter_names": names}  # else PEFT's mixed-adapter batch

    def close(self) -> None:
        if self._gathered:
            self._gathered.remove()

    def admit(self, rows: list[Row]) -> None:
        """Prefill `rows` (left-padded: a padded row's positions start at 0 where its prompt
        starts) and add them to the batch, padding the older rows' cache or theirs on the left."""
        longest = max(len(row.ids) for row in rows)
        ids = torch.full((len(rows), longest), rows[0].stop_ids[0], dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, longest - len(row.ids) :] = torch.tensor(row.ids)
            mask[i, longest - len(row.ids) :] = 1
            row._streamer.put(torch.tensor(row.ids))  # the prompt: the streamer skips it
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
            **self.keep_last, **self._adapters(rows),
        )  # fmt: skip
        cache, logits = getattr(out, self.cache_key), out.logits[:, -1, :]
        if self.cache is None:
            self.cache, self.mask, self.step, self.logits = cache, mask, positions[:, -1:], logits
            self.joinable = _joinable(cache)
        else:  # only joinable caches get here
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
                old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
            self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
            self.step = torch.cat([self.step, positions[:, -1:]])
            self.logits = torch.cat([self.logits, logits])
        self.live += rows
        self.samplers += [row._sampler() for row in rows]
        self.largest = max(self.largest, len(self.live))

    def keep(self, keep: list[int]) -> None:
        """Only the rows at `keep` go on; cache columns no row attends to any more are dropped."""
        self.live[:] = [self.live[i] for i in keep]
        self.samplers = [self.samplers[i] for i in keep]
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.step = self.mask[index], self.step[index]
        if self.joinable:
            first = int(self.mask.any(0).int().argmax())  # the first column a row still attends to
            if first > 0:
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def forward(self, chosen: list[int]) -> None:
        """Feed each row its chosen token: the logits of the token after it."""
        self.step = self.step + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.live), 1))], dim=1)
        out = self.model(
            input_ids=torch.tensor(chosen, device=self.device)[:, None],
            attention_mask=self.mask,
            position_ids=self.step,
            use_cache=True,
            **{self.cache_key: self.cache},
            **self._adapters(self.live),
        )
        self.logits = out.logits[:, -1, :]


class _GatheredLora:
    """Rows on different LoRA adapters in one forward pass, each LoRA layer's update computed for
    all rows at once: every adapter's A and B stacked (ranks zero-padded to the largest), each row's
    gathered by its adapter, two batched matmuls. PEFT's own mixed batch splits every layer's input
    by adapter and runs each part on its own, which costs about half a single-adapter step more at
    8 rows. Forward hooks add the update while the layers' own adapters are off; `use(None)` turns
    it off again. Only for plain LoRA Linear layers (`over` returns None otherwise)."""

    def __init__(self, layers):
        self.layers, self.names, self.index, self.stacks = layers, None, None, {}
        self.handles = [layer.register_forward_hook(self._add) for layer in layers]

    @classmethod
    def over(cls, model) -> _GatheredLora | None:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear

        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        plain = all(
            type(m) is Linear and not m.lora_variant and not m.fan_in_fan_out and not m.merged for m in layers
        )
        return cls(layers) if layers and plain else None

    def use(self, names: list[str] | None) -> None:
        """Per-row adapters `names` for the next forward passes (None: the layers' own adapter)."""
        self.names = names
        for layer in self.layers:
            layer._disable_adapters = names is not None
        if names is not None:
            slots = sorted(set(names))
            if tuple(slots) not in self.stacks:
                self.stacks = {tuple(slots): {id(m): _stack(m, slots) for m in self.layers}}
            self.slots = tuple(slots)
            device = self.layers[0].lora_A[names[0]].weight.device
            self.index = torch.tensor([slots.index(n) for n in names], device=device)

    def _add(self, layer, args, out):
        if self.names is None:
            return None
        a, b, scale = self.stacks[self.slots][id(layer)]
        x = args[0].to(a.dtype)
        x = x.reshape(len(self.index), -1, x.shape[-1])  # (rows, tokens, features)
        update = torch.bmm(torch.bmm(x, a[self.index]), b[self.index]) * scale[self.index].view(-1, 1, 1)
        return out + update.reshape(out.shape).to(out.dtype)

    def remove(self) -> None:
        self.use(None)
        for handle in self.handles:
            handle.remove()


def _stack(layer, slots: list[str]):
    """(A: adapters x in x r, B: adapters x r x out, scaling: adapters) of a LoRA Linear layer;
    an adapter that does not reach this layer contributes zeros."""
    ranks = [layer.lora_A[s].weight.shape[0] for s in slots if s in layer.lora_A]
    r = max(ranks, default=1)
    base = layer.get_base_layer()
    dtype, device = base.weight.dtype, base.weight.device
    a = torch.zeros(len(slots), base.in_features, r, dtype=dtype, device=device)
    b = torch.zeros(len(slots), r, base.out_features, dtype=dtype, device=device)
    scale = torch.zeros(len(slots), dtype=dtype, device=device)
    for i, s in enumerate(slots):
        if s in layer.lora_A:
            wa, wb = layer.lora_A[s].weight, layer.lora_B[s].weight  # (r, in), (out, r)
            a[i, :, : wa.shape[0]] = wa.t()
            b[i, : wb.shape[1], :] = wb.t()
            scale[i] = layer.scaling[s]
    return a, b, scale


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` with zeros before it along `dim` (-1 or -2), to `width`."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    return torch.nn.functional.pad(t, (missing, 0) if dim == -1 else (0, 0, missing, 0))


def _joinable(cache) -> bool:
    """Rows can join a running batch when every cache layer is a plain growing one: keys and values
    of the whole sequence, which padding on the left keeps aligned. Sliding-window and other
    layers keep their own offsets: their waves take only the rows queued when they start."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(x) is DynamicLayer and x.is_initialized for x in layers)


def _forward_parameters(model) -> set[str]:
    """What the causal LM's forward takes. Most transformers models compute logits for the last
    position only when asked (`logits_to_keep`): the prompt's other positions need none, and at a
    50k vocabulary they are most of a long prompt's prefill."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _can_mix_adapters(model) -> bool:
    """PEFT batches rows for different LoRA adapters in one forward pass, but not DoRA ones."""
    configs = getattr(model, "peft_config", {})
    return all(getattr(c, "peft_type", None) == "LORA" and not getattr(c, "use_dora", False)
               for c in configs.values())  # fmt: skip


class Batcher:
    """The queue of replies for one model (a base shared by adapters is one model). Requests queue
    on the event loop; a wave starts in the server's turn-taking (serve._Turns) with what is queued,
    and takes more as they come while nothing else waits for a turn."""

    def __init__(self, model, turns, max_batch: int = DEFAULT_MAX_BATCH):
        self.model, self.turns, self.max_batch = model, turns, max_batch
        self.mix = _can_mix_adapters(model)
        self.queued: list[Row] = []
        self.lock = threading.Lock()  # the queue is taken from on the wave's thread too
        self.waiting = False  # a wave is waiting for its turn: it will take what is queued
        self.waves: list[int] = []  # rows each wave started with (for the benchmark and tests)
        self.joined = 0  # rows that joined a running wave
        self.largest = 0  # the most rows decoded together

    async def reply(self, served, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                    stop: list[str] | None, seed: int | None) -> Row:  # fmt: skip
        """Queue a reply and wait for a wave to take it; a cancelled waiter leaves the queue."""
        if self.turns.closing:
            raise _shutting_down()
        row = Row(served, ids, max_tokens, temperature, top_p, stop, seed)
        with self.lock:
            self.queued.append(row)
        if not self.waiting:
            self.waiting = True
            asyncio.ensure_future(self._wave())
        try:
            await asyncio.shield(row.started)
        except BaseException:
            row.cancel()
            raise
        return row

    async def _wave(self) -> None:
        try:
            await self.turns.start(self._begin)
        except APIError as e:  # shutting down: nobody queued will start
            self.waiting = False
            with self.lock:
                queued, self.queued = self.queued, []
            for row in queued:
                row.refuse(e)

    def _begin(self, on_done):
        """In the model's turn (on the event loop): a wave of what is queued, if anyone still is."""
        self.waiting = False
        with self.lock:
            rows = self._take(0, None)
        if self.queued:  # more than one wave takes, or adapters that cannot share it
            self.waiting = True
            asyncio.ensure_future(self._wave())
        if not rows:
            return _Nothing(on_done)
        self.waves.append(len(rows))
        return Wave(self, rows, on_done)

    def take(self, decoding: int, adapter: str | None) -> list[Row]:
        """On the wave's thread, between two tokens: queued rows that can join a wave of
        `decoding` rows on `adapter`; none while another request waits for the model's turn."""
        others = self.turns.waiting - (1 if self.waiting else 0)
        if not self.queued or others > 0 or self.turns.closing:
            return []
        with self.lock:
            rows = self._take(decoding, adapter)
        self.joined += len(rows)
        return rows

    def _take(self, decoding: int, adapter: str | None) -> list[Row]:
        """Up to max_batch - `decoding` queued rows (the lock held): the first one's adapter (or
        `adapter`, that of the rows decoding), or any adapter where PEFT mixes them."""
        rows, left = [], []
        for row in self.queued:
            if row.cancelled.is_set():  # its waiter has gone: end the reader nobody will read
                row.refuse(_shutting_down(), tell_waiter=False)
                continue
            if adapter is None and not rows and not decoding:
                adapter = row.served.adapter
            fits = self.mix or row.served.adapter == adapter
            (rows if fits and decoding + len(rows) < self.max_batch else left).append(row)
        self.queued = left
        for row in rows:
            row.begin()
        return rows


class _Nothing:
    """A turn nobody needed after all (everyone queued hung up): handed straight on."""

    def __init__(self, on_done):
        on_done()

    def cancel(self) -> None:
        pass
