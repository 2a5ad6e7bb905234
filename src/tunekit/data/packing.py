"""Raw text to packed rows (task: pretrain): documents -> token chunks -> fixed-length rows.

A document is the text of a `text` row ({"text": "table: ...\\nQ: ...\\nA: SELECT ..."}). Its tokens
are the tokenizer's own encoding (with the BOS it adds, where it adds one) and the end-of-sequence
token, so the model learns where a document ends. A document longer than `max_length` is cut into
windows of `max_length` tokens that overlap by one token: each window's first token is context only,
so every token after the document's first is a target exactly once and nothing is dropped.

Chunks are then packed into rows of at most `max_length` tokens (best fit, longest first). Each
chunk is a segment of its row: its position ids restart at 0 and its first label is ignored, so no
token attends to, or is predicted from, another segment (transformers builds the block-diagonal
mask from the restarting position ids; train/speed/padding_free runs segment by segment). A row
of three chunks:

    input_ids     [a0 a1 a2 | b0 b1 | c0 c1 c2 c3]
    position_ids  [0  1  2  | 0  1  | 0  1  2  3 ]
    labels        [-  a1 a2 | -  b1 | -  c1 c2 c3]       (- is IGNORE_INDEX)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tunekit.data.example import Example
from tunekit.data.tokenize import IGNORE_INDEX


@dataclass
class Chunk:
    """A window of one document's tokens: `doc` is the document's index, `first` whether the window
    starts the document (its first token is then predicted by nothing at all)."""

    doc: int
    input_ids: list[int]
    first: bool


@dataclass
class PackedRow:
    """One training row: chunks laid end to end. `segments` holds each chunk's length."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)

    def add(self, chunk: Chunk) -> None:
        n = len(chunk.input_ids)
        self.input_ids += chunk.input_ids
        self.labels += [IGNORE_INDEX] + chunk.input_ids[1:]
        self.position_ids += list(range(n))
        self.segments.append(n)


@dataclass
class PackStats:
    """What packing did with a split, for the run's output and train_summary.json."""

    documents: int
    chunks: int
    tokens: int  # every token of every document (BOS and EOS included)
    targets: int  # tokens that carry loss: all but each document's first
    rows: int
    row_length: int

    @property
    def fill(self) -> float:
        """Share of the rows' max_length slots holding a token (the rest is padding)."""
        chunk_tokens = self.tokens + self.chunks - self.documents  # overlap tokens count twice
        return chunk_tokens / max(1, self.rows * self.row_length)

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.documents:,} documents -> {self.chunks:,} chunks of at most {self.row_length} "
            f"tokens ({self.tokens:,} tokens, {self.targets:,} with loss) -> {self.rows:,} rows, "
            f"{self.fill:.1%} full"
        )

    def to_dict(self) -> dict[str, float | int]:
        keys = ("documents", "chunks", "tokens", "targets", "rows", "row_length")
        return {k: getattr(self, k) for k in keys} | {"fill": round(self.fill, 4)}


def document_text(ex: Example) -> str | None:
    """The text of a document row: a `text` row (one assistant message, nothing else; a run's
    split files hold it so), else None."""
    if len(ex.messages) == 1 and ex.messages[0].role == "assistant" and ex.rejected is None:
        return ex.messages[0].content if ex.label is None and ex.desirable is None else None
    return None


def documents_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document's tokens: the tokenizer's encoding with its own special tokens (a BOS where it
    adds one), then EOS. One batched call (the Rust tokenizer encodes in parallel); verbose=False:
    a document longer than the model's context is expected here, as it is cut into chunks."""
    if not texts:
        return []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [ids + eos for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]


def document_ids(tokenizer, text: str) -> list[int]:
    """One document's tokens (`documents_ids`)."""
    return documents_ids(tokenizer, [text])[0]


def chunk_document(doc: int, ids: list[int], max_length: int) -> list[Chunk]:
    """Windows of at most `max_length` tokens, overlapping by one: window k starts at k*(L-1), so each
    token after the first is the target of exactly one window (a one-token document: one window)."""
    step = max_length - 1
    starts = range(0, max(1, len(ids) - 1), step)
    return [Chunk(doc, ids[s : s + max_length], first=s == 0) for s in starts]


def pack_chunks(chunks: list[Chunk], max_length: int) -> list[PackedRow]:
    """Best-fit decreasing: longest chunk first, into the fullest row it still fits, else a new row.
    Deterministic for a given input; O(n log n) with the rows kept sorted by free room."""
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for chunk in sorted(chunks, key=lambda c: -len(c.input_ids)):
        n = len(chunk.input_ids)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, i = free.pop(k)
        else:
            room, i = max_length, len(rows)
            rows.append(PackedRow())
        rows[i].add(chunk)
        if room - n > 0:
            bisect.insort(free, (room - n, i))
    return rows


def pack_documents(tokenizer, texts: list[str], max_length: int) -> tuple[list[PackedRow], PackStats]:
    """Tokenize, chunk and pack `texts`; returns the rows and what packing did."""
    chunks, tokens = [], 0
    for d, ids in enumerate(documents_ids(tokenizer, texts)):
        tokens += len(ids)
        chunks += chunk_document(d, ids, max_length)
    rows = pack_chunks(chunks, max_length)
    stats = PackStats(len(texts), len(chunks), tokens, tokens - len(texts), len(rows), max_length)
    return rows, stats
