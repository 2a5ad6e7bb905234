"""Exact duplicates, near duplicates and leakage between two collections, over plain texts.

The caller renders each example to one text (e.g. its message contents joined by "\\n"):

    texts = ["Reset my password", "reset  my PASSWORD", "How do I reset my password please",
             "how do I reset my password please now"]
    exact_duplicate_groups(texts)          # -> [[0, 1]]  (case and whitespace ignored)
    near_duplicate_pairs(texts)            # -> [(2, 3, 0.8333...)]  i < j, exact Jaccard >= 0.8
    groups, pairs = find_duplicates(texts)  # both of the above, one pass over the texts
    exact, near = cross_pairs(train_texts, test_texts)
    # exact -> [(train_index, test_index), ...]; near -> [(train_index, test_index, jaccard), ...]

Texts are compared in normalized form (`normalize_text`: lowercase, whitespace collapsed). Near
duplicates are pairs whose Jaccard similarity over word n-gram shingles (n = `shingle`; a text of
fewer than n words is one shingle of all its words) reaches `threshold`. They are found with
MinHash + LSH banding, and every candidate is then checked against the exact Jaccard of the two
shingle sets (each shingle a 64-bit hash), so a reported pair is never below the threshold and its
score is the exact Jaccard. A pair exactly at the threshold is missed with probability below 0.2%
(see `choose_bands`); pairs above it, far less often.

Pairs of exact duplicates are left to `exact_duplicate_groups` and never reported as near
duplicates. Each distinct normalized text is compared once; a near pair between two texts that have
exact copies is reported for every copy, so the output grows with the product of copy counts.

Speed (bench/dedup_speed.py, 100,000 texts of about 105 words, one core: `find_duplicates` about
2 s, the two separate calls about 3 s): texts are split into words and hashed in numpy over their
UTF-8 bytes (no Python object per word), shingle hashes are combined from word hashes, and the
`num_perm` hash functions run over blocks of shingles as one (num_perm x block) uint32 array reduced
per text with `np.minimum.reduceat`. Texts go through in chunks, so memory is the signatures and
band keys (4 * num_perm + 8 * bands bytes a text) plus one chunk's arrays.

Texts that share a long boilerplate (a system prompt, a template) share many shingles; that stays
fast (see `_candidates`), but if the boilerplate alone makes them near duplicates, every pair is
one. Render examples without text that every example repeats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "choose_bands",
    "cross_pairs",
    "exact_duplicate_groups",
    "find_duplicates",
    "near_duplicate_pairs",
    "normalize_text",
]

_TEXTS_PER_CHUNK = 1024  # texts parsed and sketched together ...
_CHARS_PER_CHUNK = 1 << 20  # ... or fewer, up to 1M characters: arrays of some MB, mostly in cache
_CELLS_PER_BLOCK = 1 << 20  # num_perm x shingles hashed at once (4 MiB of uint32: stays in cache)
_RECALL_TARGET = 0.99  # wanted P(candidate) at J == threshold; choose_bands(0.8, 128) gives 0.998
_FILTER_SIGMAS = 5.0  # see _estimate_ok
_FILTER_HEAD = 32  # MinHash values in the first, cheap estimate
_MAX_BUCKET = 500  # texts in one band bucket before it is split, see _candidates
_PAIR_BATCH = 1 << 18  # candidate pairs made and compared per numpy batch
_VERIFY_BATCH = 8192  # candidate pairs whose texts' shingle sets are held at once (<= 16384 sets)
_MAX32 = np.uint32(0xFFFFFFFF)
# Salts for the fixed (seed-independent) keys of word and text hashing.
_BYTE_SALT, _WORD_SALT, _LEN_SALT = (
    np.uint64(s) for s in (0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822)
)


def normalize_text(text: str) -> str:
    """Lowercase, whitespace runs to one space, stripped: the form texts are compared in."""
    return " ".join(text.lower().split())


def exact_duplicate_groups(texts: Sequence[str]) -> list[list[int]]:
    """Groups (size >= 2) of indices whose normalized texts are equal, each ascending, by first index."""
    _, multi = _exact_groups(texts, _text_hashes(texts))
    return sorted(multi.values())


def near_duplicate_pairs(
    texts: Sequence[str], threshold: float = 0.8, shingle: int = 3, num_perm: int = 128, seed: int = 0
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard), i < j, of texts whose exact shingle Jaccard is >= `threshold`.

    Exact duplicates (equal normalized texts) are not reported here. Sorted by (i, j).
    """
    return find_duplicates(texts, threshold, shingle, num_perm, seed)[1]


def find_duplicates(
    texts: Sequence[str], threshold: float = 0.8, shingle: int = 3, num_perm: int = 128, seed: int = 0
) -> tuple[list[list[int]], list[tuple[int, int, float]]]:
    """(exact_duplicate_groups(texts), near_duplicate_pairs(texts, ...)) in one pass over the texts."""
    _check(threshold, shingle, num_perm)
    hasher = _Hasher(shingle, num_perm, seed, threshold)
    sk = hasher.sketch(texts)
    label, multi = _exact_groups(texts, sk.doc_hash)
    pairs = []
    for r, s, score in _near_reps(hasher, texts, sk, label, threshold, side=None):
        pairs += [(min(i, j), max(i, j), score) for i in multi.get(r, [r]) for j in multi.get(s, [s])]
    return sorted(multi.values()), sorted(pairs)


def cross_pairs(
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    threshold: float = 0.8,
    shingle: int = 3,
    num_perm: int = 128,
    seed: int = 0,
) -> tuple[list[tuple[int, int]], list[tuple[int, int, float]]]:
    """Leakage between two collections: ([(a, b), ...] exact, [(a, b, jaccard), ...] near), sorted.

    Indices are into `texts_a` and `texts_b`; only pairs with one text on each side are reported.
    Near matches follow `near_duplicate_pairs` (exact matches are not repeated there).
    """
    _check(threshold, shingle, num_perm)
    n_a = len(texts_a)
    texts = [*texts_a, *texts_b]
    hasher = _Hasher(shingle, num_perm, seed, threshold)
    sk = hasher.sketch(texts)
    label, multi = _exact_groups(texts, sk.doc_hash)
    side = np.zeros(len(texts), dtype=np.uint8)  # per representative: 1 = has a text of a, 2 = of b
    np.bitwise_or.at(side, label, np.where(np.arange(len(texts)) < n_a, 1, 2).astype(np.uint8))

    def split(r: int) -> tuple[list[int], list[int]]:
        members = multi.get(r, [r])
        return [i for i in members if i < n_a], [i - n_a for i in members if i >= n_a]

    exact = []
    for r in multi:
        a, b = split(r)
        exact += [(i, j) for i in a for j in b]
    near = []
    for r, s, score in _near_reps(hasher, texts, sk, label, threshold, side=side):
        (a1, b1), (a2, b2) = split(r), split(s)
        near += [(i, j, score) for i in a1 for j in b2] + [(i, j, score) for i in a2 for j in b1]
    return sorted(exact), sorted(near)


def choose_bands(threshold: float, num_perm: int, target: float = _RECALL_TARGET) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still make a pair at `threshold` a candidate w.p. >= target.

    Two texts with Jaccard J agree on one MinHash value with probability J, so on all r rows of a
    band with probability J**r, and share at least one of b bands (become candidates) with
    probability P(J) = 1 - (1 - J**r)**b. More rows make chance candidates rarer (fewer pairs to
    verify), fewer rows make true pairs likelier to be caught; we take the largest r, with
    b = num_perm // r, for which P(threshold) >= target. For threshold 0.8 and 128 permutations:
    r = 6, b = 21 (126 of the 128 values; all 128 feed _estimate_ok):
    P(0.8) = 1 - (1 - 0.8**6)**21 = 1 - 0.738**21 = 0.998, P(0.85) = 0.9999, P(0.9) > 0.999999,
    while P(0.5) = 0.28, P(0.3) = 0.015 and P(0.2) = 0.0013, so unrelated texts rarely become
    candidates. (r = 7, b = 18 would give only P(0.8) = 0.986; r = 8, b = 16 only 0.947.)
    """
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if 1.0 - (1.0 - threshold**r) ** b >= target:
            best = (b, r)
    return best


# ---------------------------------------------------------------------------------------------------


def _check(threshold: float, shingle: int, num_perm: int) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if shingle < 1:
        raise ValueError(f"shingle must be >= 1, got {shingle}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64: a bijection with full avalanche."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _keys(n: int, salt: np.uint64) -> np.ndarray:
    """n fixed pseudo-random odd uint64 keys, one per position (the same for any n)."""
    with np.errstate(over="ignore"):
        return _mix64(np.arange(n, dtype=np.uint64) + salt) | np.uint64(1)


def _segment_sums(values: np.ndarray, counts: np.ndarray, salt: np.uint64) -> np.ndarray:
    """Per segment (consecutive runs of `counts` values; 0 allowed): mix(sum_p values[p] * key[p] + len).

    An order-dependent hash of each segment's sequence of (already random) word hashes: equal word
    sequences hash equal; a collision of different ones only costs _exact_groups a string compare.
    """
    out = np.zeros(len(counts), dtype=np.uint64)
    filled = counts > 0
    if filled.any():
        starts = np.cumsum(counts) - counts
        pos = np.arange(len(values), dtype=np.int64) - np.repeat(starts, counts)
        with np.errstate(over="ignore"):
            out[filled] = np.add.reduceat(values * _keys(int(counts.max()), salt)[pos], starts[filled])
    with np.errstate(over="ignore"):
        return _mix64(out + counts.astype(np.uint64) * (_LEN_SALT | np.uint64(1)))


def _chunks(texts: Sequence[str]) -> list[tuple[int, int]]:
    """[lo, hi) ranges of at most _TEXTS_PER_CHUNK texts and about _CHARS_PER_CHUNK characters."""
    out, lo, chars = [], 0, 0
    for i, t in enumerate(texts):
        chars += len(t)
        if i + 1 - lo >= _TEXTS_PER_CHUNK or chars >= _CHARS_PER_CHUNK:
            out.append((lo, i + 1))
            lo, chars = i + 1, 0
    if lo < len(texts):
        out.append((lo, len(texts)))
    return out


class _Words:
    """Splits normalized texts into words and hashes each word, in numpy over the UTF-8 bytes.

    An ASCII text is only lowercased in Python: its words are the runs of bytes that are not ASCII
    whitespace, exactly what str.split() gives. Any other text is normalized in Python first (its
    whitespace may be Unicode), leaving single spaces. A word w of bytes c_0 .. c_{L-1} hashes to
    mix(sum_i c_i * Q**i + L * K) mod 2**64, a polynomial in Q = P**-1 read off prefix sums
    S[k] = sum_{i<k} c_i * Q**i of the whole chunk as (S[end] - S[start]) * P**start: a few passes
    over the bytes, no Python object per word, and the hash depends only on the word's bytes.
    (Polynomial hashes mod 2**64 can be made to collide by crafted words thousands of bytes long;
    natural words collide about as often as random 64-bit values.)
    """

    P = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
    Q = pow(P, -1, 2**64)

    def __init__(self) -> None:
        self.p_pow = np.ones(1, dtype=np.uint64)  # P**k, k < len, grown on demand
        self.q_pow = np.ones(1, dtype=np.uint64)

    def _grow(self, n: int) -> None:
        with np.errstate(over="ignore"):
            while len(self.p_pow) < n:  # doubling: powers k .. 2k-1 are powers 0 .. k-1 times base**k
                k = len(self.p_pow)
                self.p_pow = np.concatenate((self.p_pow, self.p_pow * np.uint64(pow(self.P, k, 2**64))))
                self.q_pow = np.concatenate((self.q_pow, self.q_pow * np.uint64(pow(self.Q, k, 2**64))))

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(word hashes uint64 flat, words per text int64)."""
        parts = [t.lower().encode() if t.isascii() else normalize_text(t).encode() for t in texts]
        sizes = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)) + 1
        data = np.frombuffer(b" ".join(parts) + b" ", dtype=np.uint8)  # a space ends every text
        space = data <= 0x20
        odd = np.flatnonzero(space & (data != 0x20))  # control bytes: whitespace only if \t-\r, \x1c-\x1f
        if len(odd):
            c = data[odd]
            space[odd] = ((c >= 0x09) & (c <= 0x0D)) | (c >= 0x1C)
        word = ~space
        starts = np.flatnonzero(word[1:] & space[:-1]) + 1
        if len(data) and word[0]:
            starts = np.concatenate(([0], starts))
        ends = np.flatnonzero(word[:-1] & space[1:]) + 1
        self._grow(len(data) + 1)
        with np.errstate(over="ignore"):
            prefix = np.zeros(len(data) + 1, dtype=np.uint64)
            np.cumsum(data * self.q_pow[: len(data)], out=prefix[1:])
            raw = (prefix[ends] - prefix[starts]) * self.p_pow[starts]
            word_hash = _mix64(raw + (ends - starts).astype(np.uint64) * (_BYTE_SALT | np.uint64(1)))
        first_word = np.searchsorted(starts, np.cumsum(sizes) - sizes)  # each text's first word
        lens = np.diff(np.append(first_word, len(starts)))
        return word_hash, lens


def _text_hashes(texts: Sequence[str]) -> np.ndarray:
    """A uint64 hash of each normalized text (of its word sequence), for exact grouping."""
    out = np.empty(len(texts), dtype=np.uint64)
    words = _Words()
    for lo, hi in _chunks(texts):
        word_hash, lens = words(texts[lo:hi])
        out[lo:hi] = _segment_sums(word_hash, lens, _WORD_SALT)
    return out


def _exact_groups(texts: Sequence[str], doc_hash: np.ndarray) -> tuple[np.ndarray, dict[int, list[int]]]:
    """(label, multi): label[i] = first index of the texts equal to i once normalized;
    multi = {first index: all indices, ascending} for groups of 2 or more.

    Texts are grouped on a 64-bit hash, and a bucket of more than one is split by the normalized
    texts themselves, so a hash collision never merges different texts.
    """
    n = len(doc_hash)
    label = np.arange(n, dtype=np.int64)
    order = np.argsort(doc_hash, kind="stable")
    sorted_hash = doc_hash[order]
    run_start = np.flatnonzero(np.concatenate(([True], sorted_hash[1:] != sorted_hash[:-1])))
    run_len = np.diff(np.append(run_start, n))
    multi: dict[int, list[int]] = {}
    for s, m in zip(run_start[run_len > 1].tolist(), run_len[run_len > 1].tolist(), strict=True):
        by_text: dict[str, list[int]] = {}
        for i in order[s : s + m].tolist():  # ascending: the sort is stable
            by_text.setdefault(normalize_text(texts[i]), []).append(i)
        for members in by_text.values():
            if len(members) > 1:
                multi[members[0]] = members
                label[members] = members[0]
    return label, multi


class _Hasher:
    """The seeded hashing: shingle hashes from word hashes, and the MinHash permutations."""

    def __init__(self, shingle: int, num_perm: int, seed: int, threshold: float = 0.8):
        rng = np.random.default_rng(seed)
        self.n = shingle
        self.num_perm = num_perm
        self.bands, self.rows = choose_bands(threshold, num_perm)
        # Shingle hash: mix(sum_t word_hash[t] * k[t] + width * k[n]) mod 2^64.
        self.k = rng.integers(0, 2**64, size=shingle + 1, dtype=np.uint64) | np.uint64(1)
        # Permutation i of a 32-bit shingle hash x: a[i] * x + b[i] mod 2^32 with a[i] odd: a bijection,
        # so over random-looking x each one is a min-wise hash; measured estimates have the ideal
        # binomial spread sqrt(J (1 - J) / num_perm).
        self.a = (rng.integers(0, 2**32, size=num_perm, dtype=np.uint64) | np.uint64(1)).astype(np.uint32)
        self.b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
        # Band key: mix(sum of the band's rows * band_k) mod 2^64: equal band values give equal keys,
        # unequal ones collide with probability about 2^-64.
        self.band_k = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self.words = _Words()

    def shingles(self, word_hash: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hashes uint64, counts): each text's shingle hashes in order (repeats kept), flattened."""
        n, h = self.n, word_hash
        starts = np.cumsum(lens) - lens
        counts = np.where(lens >= n, lens - n + 1, np.minimum(lens, 1))
        out_starts = np.cumsum(counts) - counts
        out = np.empty(int(counts.sum()), dtype=np.uint64)
        long = lens >= n
        with np.errstate(over="ignore"):
            if long.any():
                # Full-width shingles at every position of the flat word array (contiguous slices),
                # then those that start a shingle inside one text.
                m = len(h) - n + 1
                acc = np.full(m, np.uint64(n) * self.k[n], dtype=np.uint64)
                for t in range(n):
                    acc += h[t : t + m] * self.k[t]
                c = counts[long]
                first = np.repeat(np.cumsum(c) - c, c)
                within = np.arange(len(first), dtype=np.int64) - first
                out[np.repeat(out_starts[long], c) + within] = acc[np.repeat(starts[long], c) + within]
            short = (lens > 0) & ~long
            if short.any():  # fewer than n words: one shingle of all of them
                s0, width = starts[short], lens[short]
                acc = width.astype(np.uint64) * self.k[n]
                for t in range(n - 1):
                    inside = t < width
                    acc[inside] += h[s0[inside] + t] * self.k[t]
                out[out_starts[short]] = acc
        return _mix64(out), counts

    def sketch(self, texts: Sequence[str]) -> _Sketch:
        """Text hashes, MinHash signatures and band keys of every text, a chunk of texts at a time."""
        sk = _Sketch(
            doc_hash=np.empty(len(texts), dtype=np.uint64),
            sig=np.full((len(texts), self.num_perm), _MAX32, dtype=np.uint32),
            band_keys=np.zeros((self.bands, len(texts)), dtype=np.uint64),
            has_words=np.zeros(len(texts), dtype=bool),
        )
        block = max(1, _CELLS_PER_BLOCK // self.num_perm)
        buf = np.empty((self.num_perm, block), dtype=np.uint32)
        a, b = self.a[:, None], self.b[:, None]
        for c0, c1 in _chunks(texts):
            word_hash, lens = self.words(texts[c0:c1])
            sk.doc_hash[c0:c1] = _segment_sums(word_hash, lens, _WORD_SALT)
            hashes, counts = self.shingles(word_hash, lens)
            x = hashes.astype(np.uint32)  # the low 32 bits of the mixed 64-bit hash
            cols = c0 + np.flatnonzero(counts)
            off = np.append(0, np.cumsum(counts[counts > 0]))  # text k's shingles: off[k]:off[k+1]
            part = np.full((self.num_perm, len(cols)), _MAX32, dtype=np.uint32)
            for lo in range(0, len(x), block):
                hi = min(lo + block, len(x))
                v = buf[:, : hi - lo]
                np.multiply(a, x[None, lo:hi], out=v)
                v += b
                # Texts overlapping [lo, hi) are d0..d1-1; each segment starts where its text does, or
                # at lo for a text begun in the previous block (its minima are merged by np.minimum).
                d0 = int(np.searchsorted(off, lo, side="right")) - 1
                d1 = int(np.searchsorted(off, hi, side="left"))
                mins = np.minimum.reduceat(v, np.maximum(off[d0:d1], lo) - lo, axis=1)
                np.minimum(part[:, d0:d1], mins, out=part[:, d0:d1])
            sk.sig[cols] = part.T
            sk.has_words[cols] = True
            with np.errstate(over="ignore"):
                for band in range(self.bands):
                    key = np.zeros(len(cols), dtype=np.uint64)
                    for t in range(band * self.rows, (band + 1) * self.rows):
                        key += part[t].astype(np.uint64) * self.band_k[t]
                    sk.band_keys[band, cols] = _mix64(key)
        return sk


class _Sketch(NamedTuple):
    doc_hash: np.ndarray  # (texts,) uint64: hash of the normalized text
    sig: np.ndarray  # (texts, num_perm) uint32 MinHash values; all ones for a text without words
    band_keys: np.ndarray  # (bands, texts) uint64
    has_words: np.ndarray  # (texts,) bool


def _near_reps(
    hasher: _Hasher,
    texts: Sequence[str],
    sk: _Sketch,
    label: np.ndarray,
    threshold: float,
    side: np.ndarray | None,
) -> list[tuple[int, int, float]]:
    """(r, s, jaccard), r < s, over representatives (first of each group of equal texts, with words).

    With `side` (per text: bit 1 = its group has a text of collection a, bit 2 = of b) only pairs
    that can span the two collections are kept.
    """
    reps = np.flatnonzero((label == np.arange(len(label))) & sk.has_words)
    if len(reps) < 2:
        return []
    return _verify(hasher, texts, _candidates(sk, reps, side, threshold), threshold)


def _candidates(sk: _Sketch, reps: np.ndarray, side: np.ndarray | None, threshold: float) -> np.ndarray:
    """Text pairs (i, j), i < j, both in `reps`, shape (m, 2), sorted: equal on all rows of some band,
    and with a MinHash estimate not far below the threshold.

    A bucket (texts with one band key) of more than _MAX_BUCKET texts, as when many texts share a
    long boilerplate whose shingles hold their minima, is split by the keys of the following bands
    until its parts are small: without that, N texts that all share half their shingles would make
    about N**2 / 2 * P(0.5) = 0.14 N**2 candidates. A pair inside such a bucket is then a candidate
    in that band only if it also agrees on the extra bands, so recall can drop below the figure in
    `choose_bands` for pairs whose texts sit in clusters of more than _MAX_BUCKET similar texts;
    elsewhere buckets are small and nothing changes. Pairs are made and filtered _PAIR_BATCH at a
    time, so memory stays bounded.
    """
    n_texts = len(sk.sig)
    keys = sk.band_keys[:, reps]
    bands = len(keys)
    codes: list[np.ndarray] = []
    for band in range(bands):
        key = keys[band]
        order, run_start, run_len = _runs(key)
        for extra in range(1, bands):
            big = run_len > _MAX_BUCKET
            if not big.any():
                break
            members = order[np.flatnonzero(np.repeat(big, run_len))]
            key = key.copy() if extra == 1 else key
            key[members] = _mix64(key[members] ^ keys[(band + extra) % bands, members])
            order, run_start, run_len = _runs(key)
        multi = run_len > 1
        if not multi.any():
            continue
        # Every element of a run of equal keys pairs with each later element of that run:
        # position p of a run ending at e has e - p - 1 partners, at p + 1 .. e - 1.
        elem = np.flatnonzero(np.repeat(multi, run_len))
        follow = np.repeat(run_start + run_len, run_len)[elem] - elem - 1
        done = np.cumsum(follow)  # pairs made once elements 0..k are through
        lo = 0
        while lo < len(elem):
            hi = max(lo + 1, int(np.searchsorted(done, done[lo] - follow[lo] + _PAIR_BATCH, side="right")))
            e, f = elem[lo:hi], follow[lo:hi]
            left = np.repeat(e, f)
            step = np.arange(len(left)) - np.repeat(np.cumsum(f) - f, f) + 1
            i, j = reps[order[left]], reps[order[left + step]]
            i, j = np.minimum(i, j), np.maximum(i, j)
            if side is not None:
                spans = (((side[i] & 1) & (side[j] >> 1)) | ((side[j] & 1) & (side[i] >> 1))) > 0
                i, j = i[spans], j[spans]
            for width in (_FILTER_HEAD, sk.sig.shape[1]):  # a cheap look at a few values, then all
                ok = _estimate_ok(sk.sig, i, j, width, threshold)
                i, j = i[ok], j[ok]
            codes.append(i * n_texts + j)
            lo = hi
    if not codes:
        return np.empty((0, 2), dtype=np.int64)
    code = np.unique(np.concatenate(codes))
    return np.stack((code // n_texts, code % n_texts), axis=1)


def _runs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, run_start, run_len): key[order] is sorted, in runs of equal keys."""
    order = np.argsort(key)
    sorted_key = key[order]
    run_start = np.flatnonzero(np.concatenate(([True], sorted_key[1:] != sorted_key[:-1])))
    return order, run_start, np.diff(np.append(run_start, len(key)))


def _estimate_ok(sig: np.ndarray, i: np.ndarray, j: np.ndarray, width: int, threshold: float) -> np.ndarray:
    """Which pairs' MinHash estimate over the first `width` values is not far below the threshold.

    The estimate (share of equal values) of a pair with Jaccard J has mean J and standard deviation
    sqrt(J (1 - J) / width): 0.035 at J = 0.8 over 128 values, 0.071 over 32. Dropping estimates more
    than 5 such deviations below the threshold (< 0.62 over 128, < 0.45 over 32, for 0.8) loses a
    pair at the threshold with probability under 1e-6 and drops most chance candidates before the
    exact check.
    """
    width = min(width, sig.shape[1])
    cut = threshold - _FILTER_SIGMAS * math.sqrt(threshold * (1.0 - threshold) / width)
    if cut <= 0 or len(i) == 0:
        return np.ones(len(i), dtype=bool)
    head = sig[:, :width]
    return np.count_nonzero(head[i] == head[j], axis=1) >= cut * width


def _verify(
    hasher: _Hasher, texts: Sequence[str], cand: np.ndarray, threshold: float
) -> list[tuple[int, int, float]]:
    """The candidate text pairs whose exact Jaccard over 64-bit shingle hashes is >= threshold.

    The shingle sets are rebuilt for the texts of _VERIFY_BATCH pairs at a time (few texts are
    candidates), so memory stays bounded however many pairs there are.
    """
    out = []
    for lo in range(0, len(cand), _VERIFY_BATCH):
        batch = cand[lo : lo + _VERIFY_BATCH]
        docs = np.unique(batch).tolist()
        chosen = [texts[d] for d in docs]
        sets: dict[int, frozenset[int]] = {}
        for c0, c1 in _chunks(chosen):
            hashes, counts = hasher.shingles(*hasher.words(chosen[c0:c1]))
            flat, ends = hashes.tolist(), np.cumsum(counts).tolist()
            for d, start, end in zip(docs[c0:c1], [0, *ends[:-1]], ends, strict=True):
                sets[d] = frozenset(flat[start:end])
        for i, j in batch.tolist():
            a, b = sets[i], sets[j]
            inter = len(a & b)
            score = inter / (len(a) + len(b) - inter)
            if score >= threshold:
                out.append((i, j, score))
    return out
