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
then ends at once. Each example's prompt is encoded once, its shared prefix (system prompt, few-shot
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
    all_scores: list[list[tuple[float, int]]] | None = None


@dataclass
class _Search:
    """One example's best-first search over the trie."""

    prompt: list[int]
    reply: list[int]  # the reference's reply tokens (through ChatML's trailing newline)
    score: dict[Path, float] = field(default_factory=dict)  # the sum of log-probs along each path
    opened: set[Path] = field(default_factory=set)  # paths whose children are scored
    heap: list[tuple[float, int, Path]] = field(default_factory=list)  # (-score, 0 complete | 1 not, path)
    ref_logp: tuple[float, int] = (0.0, 0)
    expanded: int = 0  # nodes opened by search steps (the reference's path is not counted)

    def open(self, path: Path, logp: torch.Tensor, cands: Candidates) -> None:
        """Score `path`'s children from the next-token log-probs after it ((V,), on the CPU)."""
        self.opened.add(path)
        tokens = cands.children.get(path, [])
        base = self.score.get(path, 0.0)
        for t, lp in zip(tokens, logp[tokens].tolist(), strict=True):
            child = (*path, t)
            self.score[child] = base + lp
            if child in cands.complete:
                heapq.heappush(self.heap, (-(base + lp), 0, child))
            if child in cands.children:
                heapq.heappush(self.heap, (-(base + lp), 1, child))

    def to_open(self, exhaustive: bool) -> list[Path]:
        """The paths to open next: the best EXPAND_PER_STEP unopened ones while no complete label
        beats them all (then the search is done: [] ); `exhaustive`: every unopened one."""
        if exhaustive:
            out = [path for _, more, path in self.heap if more and path not in self.opened]
            self.heap = [item for item in self.heap if not item[1]]
            heapq.heapify(self.heap)
            return out
        out: list[Path] = []
        while self.heap and self.heap[0][1] and len(out) < EXPAND_PER_STEP:
            path = heapq.heappop(self.heap)[2]
            if path not in self.opened:
                out.append(path)
        return out

    def best(self, cands: Candidates) -> str:
        """The label of the best complete item: once the search is done, the heap's top."""
        return cands.labels[cands.complete[self.heap[0][2]]]


@torch.no_grad()
def score_labels(
    model,
    items: list[TokenizedExample],
    cands: Candidates,
    pad_id: int,
    batch_size: int = 16,
    exhaustive: bool = False,
) -> LabelScores:
    """The most likely label of `cands` for each untruncated tokenized example (its prompt, then the
    reference's reply, as `split_item` reads it), by the exact best-first search in the module's
    docstring; `exhaustive`: every label's score too (the search runs until the trie is spent).
    Check `label_scoring_unsupported` first."""
    was_training = model.training
    model.eval()
    searches = [_Search(*split_item(it)) for it in items]
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
        [s.best(cands) for s in searches], [s.ref_logp for s in searches], [s.expanded for s in searches]
    )
    if exhaustive:
        scores.all_scores = [[(s.score[q], len(q)) for q in cands.seqs] for s in searches]
    return scores


def _encode_prompts(model, batch: list[_Search], cands: Candidates, pad_id: int, prefix):
    """Step 0: each prompt and its reference's reply but the last token, in one forward. Gives the
    reference's log-probs (the test loss) and opens the root and the reference's path; returns the
    batch's KV cache and attention mask, for the search steps."""
    keep = max(len(s.reply) for s in batch)  # the last `keep` columns hold every row's reply logits
    logp, cache, mask = _encode(model, [s.prompt + s.reply[:-1] for s in batch], prefix, pad_id, keep)
    for b, s in enumerate(batch):
        before = logp[b, keep - len(s.reply) :]  # (len(reply), V): the log-probs before each reply token
        s.ref_logp = (float(before.gather(1, torch.tensor(s.reply)[:, None]).sum()), len(s.reply))
        for d in range(len(s.reply)):
            if tuple(s.reply[:d]) in cands.children:
                s.open(tuple(s.reply[:d]), before[d], cands)
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
    for b, s in enumerate(batch):
        paths = s.to_open(exhaustive)
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
            batch[row.b].open(path, logp[k, 0], cands)
    return bool(todo)


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
