"""Label scoring: the most likely label of a closed label set, in place of free generation.

When every reference of a test set is one of a known set of labels (`data.labels`, or the labels
seen in training), `tunekit eval` does not let the model write a reply and hope it is a label: it
scores each candidate label as the assistant's reply to the prompt and predicts the most likely one.
Every prediction is then a valid label, and the cost is about one forward pass per example.

A candidate's score is the sum of the log-probabilities of its reply tokens through the chat
template's end-of-turn token (`card_arrival<|im_end|>`): the log-probability that the model's whole
reply is that label. The end-of-turn token separates a label from a longer one it is a prefix of
(`card` from `card_arrival`). Sum, not the mean per token: the mean is what the forgetting probe
uses for multiple-choice options of unrelated wording, but here it would favour long labels whose
later tokens are near-certain once begun (`card_arrival` after `card_arr`) over a short label the
model actually prefers; the sum is the probability of the reply greedy decoding approximates (both
are measured in bench/eval_speed.py --normalisation). The sum also allows an exact search:

The labels' token sequences form a trie. A node's score (the sum over its path) can only fall as
the path grows, since every log-probability is <= 0, so a best-first search that expands the most
likely unexpanded node and stops when the best item is a complete label has found the argmax over
all labels, without scoring most of them. The reference's own path is computed with the prompt in
the same forward (it gives the test loss too, so no second pass), and a confident model's search
then ends at once; an unsure one would open most of the trie, so past SEARCH_BUDGET nodes the
search settles for a greedy descent (the report counts the exact searches). Each example's prompt is encoded once, its shared prefix (system prompt, few-shot
shots) once for all examples (eval/generate.py `SharedPrefix`); a search step feeds only each
expanded node's tokens after the part of its path that the reference path already put in the cache.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tunekit.data.example import Example, Message
from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_example
from tunekit.eval.generate import SharedPrefix, cache_kwarg, prefix_cache_supported
from tunekit.models.device import autocast, model_device

Path = tuple[int, ...]
EXPAND_PER_STEP = 4  # nodes an example expands per search step: fewer forwards vs. wasted expansions
# Trie nodes an example's search may open before it settles for a greedy descent. A model that
# knows the task finishes the exact search at once; an untrained one spreads its probability over
# the labels and would open most of the trie (77 banking77 labels: 380 nodes, about 10x the cost of
# the prompt), so past this the prediction is the best label the descent finds (`exact` says which).
SEARCH_BUDGET = 16


@dataclass
class Candidates:
    """The label set as token sequences (each label's reply through the end-of-turn token) and
    their trie: `children[path]` the next tokens after a path, `complete[path]` the label a full
    sequence spells."""

    labels: list[str]
    seqs: list[Path]
    children: dict[Path, list[int]] = field(default_factory=dict)
    complete: dict[Path, int] = field(default_factory=dict)

    @classmethod
    def build(cls, tokenizer, example: Example, labels: list[str], stop_ids: list[int]) -> Candidates:
        """Each label tokenized as the reply to `example`'s prompt, as training tokenizes it."""
        seqs = [_reply_tokens(tokenizer, example, label, stop_ids) for label in labels]
        out = cls(list(labels), seqs)
        for k, seq in enumerate(seqs):
            out.complete[seq] = k
            for d in range(len(seq)):
                nxt = out.children.setdefault(seq[:d], [])
                if seq[d] not in nxt:
                    nxt.append(seq[d])
        return out

    @property
    def n_nodes(self) -> int:
        """Distinct token positions of the trie: what scoring every label in one tree would feed."""
        return len({s[: d + 1] for s in self.seqs for d in range(len(s))})


def _reply_tokens(tokenizer, example: Example, label: str, stop_ids: list[int]) -> Path:
    """`label`'s target tokens as the reply to `example`'s prompt, cut after the first stop token
    (the end-of-turn token; what follows it, ChatML's newline, is the same for every label)."""
    ex = Example(messages=(*example.prompt, Message("assistant", label)))
    item = tokenize_example(tokenizer, ex, 1 << 20)
    target = [t for t, lab in zip(item.input_ids, item.labels, strict=True) if lab != IGNORE_INDEX]
    stops = set(stop_ids)
    end = next((i + 1 for i, t in enumerate(target) if t in stops), len(target))
    return tuple(target[:end])


def split_item(item: TokenizedExample) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reply ids) of a tokenized example whose target tokens are one span at its end;
    None otherwise (several assistant turns, a cut reply): such an example cannot be label-scored."""
    starts = [i for i, lab in enumerate(item.labels) if lab != IGNORE_INDEX]
    if not starts or item.truncated or starts != list(range(starts[0], len(item.labels))):
        return None
    return item.input_ids[: starts[0]], item.input_ids[starts[0] :]


@dataclass
class LabelScores:
    """Per example: the predicted label, the reference's (sum of log-probs, token count) over its
    whole reply as `probe.target_logprobs` counts it, and the nodes its search expanded beyond the
    reference's path. `all_scores`: every label's (sum, count), only from `exhaustive` scoring."""

    predictions: list[str]
    reference_logprobs: list[tuple[float, int]]
    expanded: list[int]
    exact: list[bool]  # the search finished within its budget: the prediction is the exact argmax
    all_scores: list[list[tuple[float, int]]] | None = None


@dataclass
class _Search:
    """One example's best-first search over the trie. It runs as if it did not know the reference:
    the reference's path, computed at step 0, is only read when the search reaches it, so the
    prediction never depends on which label is right."""

    prompt: list[int]
    reply: list[int]  # the reference's reply tokens (through ChatML's trailing newline)
    budget: int | None  # nodes it may open before it settles for a greedy descent; None: exact
    score: dict[Path, float] = field(default_factory=dict)  # the sum of log-probs along each path
    opened: set[Path] = field(default_factory=set)  # paths whose children are scored
    known: dict[Path, list[float]] = field(default_factory=dict)  # the reference path's children, from step 0
    heap: list[tuple[float, int, Path]] = field(default_factory=list)  # (-score, 0 complete | 1 not, path)
    ref_logp: tuple[float, int] = (0.0, 0)
    n_opened: int = 0
    expanded: int = 0  # nodes opened by a forward of their own (what the search cost)
    dive: Path | None = None  # past the budget: the node the greedy descent is at
    exact: bool = True

    def open(self, path: Path, child_logps: list[float], cands: Candidates) -> None:
        """Score `path`'s children from their log-probs after it (in `cands.children[path]` order)."""
        self.opened.add(path)
        self.n_opened += 1
        base = self.score.get(path, 0.0)
        for t, lp in zip(cands.children[path], child_logps, strict=True):
            child = (*path, t)
            self.score[child] = base + lp
            if child in cands.complete:
                heapq.heappush(self.heap, (-(base + lp), 0, child))
            if child in cands.children:
                heapq.heappush(self.heap, (-(base + lp), 1, child))

    def to_open(self, cands: Candidates, exhaustive: bool) -> tuple[list[Path], bool]:
        """One round of the search: (the paths it opens that need a forward, whether it is done).
        Best-first: the best EXPAND_PER_STEP unopened paths while no complete label beats them all,
        which makes the first complete label on top the exact argmax. Past the budget: a greedy
        descent from the best unopened path (each round its best child) to a complete label.
        `exhaustive`: every unopened path. The reference path's nodes open without a forward, but
        count as any other, so the rounds are the same whatever the reference."""
        if exhaustive:
            pending = [p for _, more, p in self.heap if more and p not in self.opened]
            self.heap = [item for item in self.heap if not item[1]]
            heapq.heapify(self.heap)
        elif self.dive is not None:
            pending = self._descend(cands)
        else:
            pending = self._best_unopened()
        for p in pending:
            if p in self.known:
                self.open(p, self.known.pop(p), cands)
        return [p for p in pending if p not in self.opened], not pending

    def _best_unopened(self) -> list[Path]:
        out: list[Path] = []
        while self.heap and self.heap[0][1] and len(out) < EXPAND_PER_STEP:
            if self.budget is not None and self.n_opened + len(out) >= self.budget:
                if not out:  # settle: descend greedily from the best unopened path
                    self.exact = False
                    self.dive = heapq.heappop(self.heap)[2]
                    return [self.dive]
                break
            path = heapq.heappop(self.heap)[2]
            if path not in self.opened:
                out.append(path)
        return out

    def _descend(self, cands: Candidates) -> list[Path]:
        """The descent's next node: the best child of the node it is at, [] once that is a label."""
        if self.dive not in self.opened:
            return [self.dive]
        best = max(((*self.dive, t) for t in cands.children[self.dive]), key=self.score.__getitem__)
        if best in cands.complete:
            return []
        self.dive = best
        return [best]

    def best(self, cands: Candidates) -> str:
        """The best complete label scored (once the exact search is done, the heap's top)."""
        return cands.labels[cands.complete[min(item for item in self.heap if not item[1])[2]]]


@torch.no_grad()
def score_labels(
    model,
    items: list[TokenizedExample],
    cands: Candidates,
    pad_id: int,
    batch_size: int = 16,
    exhaustive: bool = False,
    budget: int | None = None,
) -> LabelScores:
    """The most likely label of `cands` for each untruncated tokenized example (its prompt, then the
    reference's reply, as `split_item` reads it), by the best-first search in the module's
    docstring: exact, or with `budget`, exact where it opens at most that many trie nodes, else the
    best label a greedy descent finds. `exhaustive`: every label's score too (the whole trie).
    Check `label_scoring_unsupported` first."""
    was_training = model.training
    model.eval()
    searches = [_Search(*split_item(it), budget=budget) for it in items]
    longest = max(len(s.prompt) + len(s.reply) for s in searches) + max(map(len, cands.seqs))
    prefix = SharedPrefix.build(model, [s.prompt for s in searches], longest)
    order = sorted(range(len(items)), key=lambda i: len(searches[i].prompt))
    for start in range(0, len(order), batch_size):
        batch = [searches[i] for i in order[start : start + batch_size]]
        cache, mask = _encode_prompts(model, batch, cands, pad_id, prefix)
        while _search_step(model, batch, cands, cache, mask, pad_id, exhaustive):
            pass
    model.train(was_training)
    scores = LabelScores(
        [s.best(cands) for s in searches],
        [s.ref_logp for s in searches],
        [s.expanded for s in searches],
        exact=[s.exact for s in searches],
    )
    if exhaustive:
        scores.all_scores = [[(s.score[q], len(q)) for q in cands.seqs] for s in searches]
    return scores


def _encode_prompts(model, batch: list[_Search], cands: Candidates, pad_id: int, prefix):
    """Step 0: each prompt and its reference's reply but the last token, in one forward. Gives the
    reference's log-probs (the test loss), opens the root and keeps the reference path's children
    for when the search reaches them; returns the batch's KV cache and attention mask."""
    keep = max(len(s.reply) for s in batch)  # the last `keep` columns hold every row's reply logits
    logp, cache, mask = _encode(model, [s.prompt + s.reply[:-1] for s in batch], prefix, pad_id, keep)
    for b, s in enumerate(batch):
        before = logp[b, keep - len(s.reply) :]  # (len(reply), V): the log-probs before each reply token
        s.ref_logp = (float(before.gather(1, torch.tensor(s.reply)[:, None]).sum()), len(s.reply))
        for d in range(len(s.reply)):
            path = tuple(s.reply[:d])
            if path in cands.children:
                s.known[path] = before[d, cands.children[path]].tolist()
        s.open((), s.known.pop(()), cands)
    return cache, mask


def _encode(model, rows: list[list[int]], prefix: SharedPrefix | None, pad_id: int, keep: int):
    """One forward of token rows that all start with `prefix` (its cache copied per row), each padded
    between the prefix and its own tokens so every row ends in the last column: the log-probs of
    the last `keep` columns ((B, keep, V), on the CPU), the batch's KV cache and its (B, S) mask."""
    p = 0 if prefix is None else len(prefix.ids)
    width = max(len(r) for r in rows) - p
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), p + width), dtype=torch.long)
    mask[:, :p] = 1
    for b, r in enumerate(rows):
        ids[b, width - len(r) + p :] = torch.tensor(r[p:])
        mask[b, p + width - len(r) + p :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    start = prefix.cache_for(len(rows)) if prefix is not None else None
    logp, cache = _forward_logp(model, ids, mask, positions, start, keep)
    return logp, cache, mask


def _forward_logp(model, ids, mask, positions, cache, keep: int):
    """One forward of `ids` (B, T) after `cache` (None: empty), under the (B, S+T) `mask`: the
    log-softmax of the last `keep` positions ((B, keep, V), on the CPU), and the cache now holding
    these tokens too. Only those positions are projected onto the vocabulary."""
    from transformers import DynamicCache

    device = model_device(model)
    cache = cache if cache is not None else DynamicCache(config=getattr(model, "config", None))
    with autocast(device):
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=keep,
            **{cache_kwarg(model): cache},
        )
    return F.log_softmax(out.logits[:, -keep:].float(), dim=-1).cpu(), cache


@dataclass
class _Row:
    """Tokens to feed after one row of a batch's cache: `first` is the position of tokens[0], and
    the cached columns [hide_from, end) are masked out (a reference reply this row does not follow)."""

    b: int
    tokens: list[int]
    first: int
    hide_from: int | None = None


def _feed_after(model, cache, mask, rows: list[_Row], pad_id: int, keep: int) -> torch.Tensor:
    """Each row's tokens after its batch row's cached prompt (the cache rows copied), left-padded to
    one width: the log-probs of the last `keep` columns, (R, keep, V) on the CPU."""
    from transformers import DynamicCache

    width = max(len(r.tokens) for r in rows)
    s0 = mask.shape[1]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    row_mask = torch.zeros((len(rows), s0 + width), dtype=torch.long)
    for k, r in enumerate(rows):
        n = len(r.tokens)
        ids[k, width - n :] = torch.tensor(r.tokens)
        positions[k, width - n :] = torch.arange(r.first, r.first + n)
        row_mask[k, :s0] = mask[r.b]
        if r.hide_from is not None:
            row_mask[k, r.hide_from : s0] = 0
        row_mask[k, s0 + width - n :] = 1
    pick = torch.tensor([r.b for r in rows])
    data = [(layer.keys[pick], layer.values[pick]) for layer in cache.layers]
    sub = DynamicCache(ddp_cache_data=data, config=getattr(model, "config", None))
    return _forward_logp(model, ids, row_mask, positions, sub, keep)[0]


def _search_step(model, batch: list[_Search], cands, cache, mask, pad_id: int, exhaustive: bool) -> bool:
    """Open the next paths of every unfinished search (`_Search.to_open`), in forwards of at most
    EXPAND_PER_STEP rows per example. Each path is fed after the part of it the cache holds (its
    prompt and the part of the reference's reply it shares; the rest of that reply is masked out);
    False when every search is done."""
    s0 = mask.shape[1]
    todo: list[tuple[_Row, Path]] = []
    busy = False
    for b, s in enumerate(batch):
        paths, done = s.to_open(cands, exhaustive)
        busy |= not done
        s.expanded += len(paths)
        for path in paths:
            c = min(_shared(path, s.reply), len(path) - 1)
            hide = s0 - (len(s.reply) - 1) + c  # step 0 fed the reply but its last token, in the last columns
            todo.append((_Row(b, list(path[c:]), len(s.prompt) + c, hide), path))
    step = EXPAND_PER_STEP * len(batch)
    for start in range(0, len(todo), step):
        chunk = todo[start : start + step]
        logp = _feed_after(model, cache, mask, [row for row, _ in chunk], pad_id, 1)
        for k, (row, path) in enumerate(chunk):
            batch[row.b].open(path, logp[k, 0, cands.children[path]].tolist(), cands)
    return busy


def _shared(path: Path, reply: list[int]) -> int:
    """How many leading tokens of `path` the reference's reply shares and step 0 fed (all of the
    reply but its last token): those are in the cache already."""
    n = 0
    while n < len(path) and n < len(reply) - 1 and path[n] == reply[n]:
        n += 1
    return n


@torch.no_grad()
def continuation_logprobs(
    model, prompts: list[list[int]], continuations: list[list[list[int]]], pad_id: int, batch_size: int = 16
) -> list[list[tuple[float, int]]]:
    """(sum of log-probs, token count) of each continuation after its prompt (token ids), e.g. the
    forgetting probe's four options after their question: each prompt is encoded once (and the
    prompts' shared prefix once for all), its continuations fed against its cache in one forward
    per batch of prompts, instead of a full forward per (prompt, continuation)."""
    was_training = model.training
    model.eval()
    longest = max(len(p) for p in prompts) + max(len(c) for cs in continuations for c in cs)
    prefix = SharedPrefix.build(model, prompts, longest)
    out: list[list[tuple[float, int]]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        first, cache, mask = _encode(model, [prompts[i] for i in idx], prefix, pad_id, 1)
        rows = [
            _Row(b, c[:-1], len(prompts[i]))
            for b, i in enumerate(idx)
            for c in continuations[i]
            if len(c) > 1
        ]
        keep = max((len(r.tokens) for r in rows), default=0)
        rest = _feed_after(model, cache, mask, rows, pad_id, keep) if rows else None
        k = 0
        for b, i in enumerate(idx):
            for c in continuations[i]:
                logp = first[b, 0, c[0]].item()
                if len(c) > 1:
                    after = rest[k, keep - len(c) + 1 :]  # (len(c) - 1, V): before each later token
                    logp += float(after.gather(1, torch.tensor(c[1:])[:, None]).sum())
                    k += 1
                out[i].append((logp, len(c)))
    model.train(was_training)
    return out


def label_scoring_unsupported(model, items: list[TokenizedExample], cands: Candidates) -> str | None:
    """Why these examples cannot be label-scored with this model, or None: every reference's reply
    must start with its label's sequence as `cands` tokenized it (a template that tokenizes a label
    differently in context would make the scores wrong), and the model's cache must be copyable."""
    seq_of = set(cands.seqs)
    for k, it in enumerate(items):
        parts = split_item(it)
        if parts is None:
            return f"example {k + 1} is not one prompt followed by one reply"
        reply = tuple(parts[1])
        if not any(reply[: len(q)] == q for q in seq_of if len(q) <= len(reply)):
            return f"example {k + 1}'s reply does not tokenize as any label does in a plain prompt"
    longest = max(len(it.input_ids) for it in items) + max(map(len, cands.seqs))
    if not prefix_cache_supported(model, longest):
        return "the model's KV cache (recurrent or sliding-window layers) cannot be copied per candidate"
    return None
