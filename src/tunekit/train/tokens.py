"""Tokenizing a split for training: once per content, shared between ranks and with a resume.

`tokenize_all` says how many examples `train.max_length` cut and which were left with no target
tokens (those are not trained on, and the run says so); `tokenize_cached` stores the result in
RUN/cache/ keyed by content; `tokenize_stored` writes a memory-mapped token store for a split too
big to hold (data.streaming).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tunekit.console import err as console
from tunekit.data.stream import ExampleStream, TokenStore, build_token_store, hash_file
from tunekit.data.tokenize import TokenizedExample, tokenize_example
from tunekit.io import atomic_write_jsonl
from tunekit.train import distributed


def tokenize_all(tokenizer, examples, max_length: int, name: str) -> list[TokenizedExample]:
    """Tokenize a split; examples left with no target tokens after truncation are reported and skipped."""
    out, empty, cut = [], [], 0
    for ex in examples:
        t = tokenize_example(tokenizer, ex, max_length)
        cut += t.truncated > 0
        if t.n_loss_tokens == 0:
            empty.append(ex.where)
        else:
            out.append(t)
    report_tokenized(name, max_length, cut, len(empty), empty[:5])
    return out


def report_tokenized(name: str, max_length: int, cut: int, n_empty: int, first_empty: list[str]) -> None:
    """Say how many examples max_length cut, and which were left with nothing to learn."""
    if cut:
        console.print(f"[yellow]{name}: {cut} example(s) longer than train.max_length={max_length} were cut")
    if n_empty:
        console.print(
            f"[yellow]{name}: {n_empty} example(s) have no target tokens within train.max_length "
            f"and are not trained on: {', '.join(first_empty[:5])}{' ...' if n_empty > 5 else ''}"
        )


def _cache_hash(tokenizer, max_length: int):
    """A hash seeded with what tokenization depends on besides the examples: the tokenizer's
    vocabulary size and chat template, and max_length."""
    import xxhash

    h = xxhash.xxh64()
    for part in (str(len(tokenizer)), tokenizer.chat_template or "", str(max_length)):
        h.update(part.encode())
    return h


def tokenize_cached(tokenizer, examples, max_length: int, name: str, run_dir: Path):
    """`tokenize_all`, computed once per content and shared: rank 0 tokenizes and writes
    run_dir/cache/NAME-KEY.jsonl, the other ranks (and a resumed run) read it back. The key hashes
    the tokenizer's vocabulary and chat template, max_length and every example's content."""
    h = _cache_hash(tokenizer, max_length)
    for ex in examples:
        h.update(ex.content_hash().encode())
    path = run_dir / "cache" / f"{name}-{h.hexdigest()}.jsonl"
    if distributed.is_main() and not path.is_file():
        out = tokenize_all(tokenizer, examples, max_length, name)
        atomic_write_jsonl(
            path, [{"input_ids": t.input_ids, "labels": t.labels, "truncated": t.truncated} for t in out]
        )
    distributed.barrier()
    with path.open() as f:
        return [TokenizedExample(**json.loads(line)) for line in f if line.strip()]


def tokenize_stored(
    tokenizer, split: ExampleStream, extra: list, max_length: int, name: str, run_dir: Path, quiet: bool
) -> TokenStore:
    """`tokenize_cached` for a split too big to hold (data.streaming): rank 0 tokenizes it one
    example at a time into run_dir/cache/NAME-KEY.tokens/, a token store on disk; every rank, and a
    resumed run, memory-maps that store. The key hashes what tokenize_cached's does, with the bytes
    of the split's file standing for its examples' content, and the content of `extra` (replay
    examples, trained after the split's own)."""
    from rich.progress import track

    h = _cache_hash(tokenizer, max_length)
    hash_file(split.path, h)
    for ex in extra:
        h.update(ex.content_hash().encode())
    path = run_dir / "cache" / f"{name}-{h.hexdigest()}.tokens"
    if distributed.is_main() and not (path / "meta.json").is_file():
        examples = track(
            itertools.chain(split, extra),
            description=f"tokenize {name}",
            total=len(split) + len(extra),
            console=console,
            disable=quiet,
        )
        stats = build_token_store(examples, lambda ex: tokenize_example(tokenizer, ex, max_length), path)
        report_tokenized(name, max_length, stats.truncated, stats.empty, stats.empty_where)
    distributed.barrier()
    return TokenStore(path)
