"""Duplicates and leakage: exact groups, near pairs (exact Jaccard scores), cross pairs, edge cases."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tunekit.data import dedup
from tunekit.data.dedup import (
    choose_bands,
    cross_pairs,
    exact_duplicate_groups,
    find_duplicates,
    near_duplicate_pairs,
    normalize_text,
)

WORDS = [f"w{i}" for i in range(3000)]


def shingles(text: str, n: int = 3) -> set[str]:
    """The reference: word n-grams of the normalized text, as strings."""
    words = normalize_text(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 3) -> float:
    x, y = shingles(a, n), shingles(b, n)
    return len(x & y) / len(x | y) if x | y else 1.0


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def edit(rng: random.Random, text: str, n_changes: int) -> str:
    words = text.split()
    for pos in rng.sample(range(len(words)), n_changes):
        words[pos] = "changed" + str(rng.randrange(10**9))
    return " ".join(words)


def brute_force(texts: list[str], threshold: float) -> dict[tuple[int, int], float]:
    norms = [normalize_text(t) for t in texts]
    sets = [shingles(t) for t in texts]
    out = {}
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            inter = len(sets[i] & sets[j])
            score = inter / (len(sets[i]) + len(sets[j]) - inter)
            if norms[i] != norms[j] and score >= threshold:
                out[i, j] = score
    return out


def test_normalize_text():
    assert normalize_text("  Hello\tWORLD \n\n again ") == "hello world again"
    assert normalize_text("a\u00a0B\u2003c") == "a b c"
    assert normalize_text(" \n ") == ""


def test_exact_groups_ignore_case_and_whitespace():
    texts = ["Reset my password", "other", "reset  my\nPASSWORD ", "Other", "third", " reset my password"]
    assert exact_duplicate_groups(texts) == [[0, 2, 5], [1, 3]]
    assert exact_duplicate_groups(["a", "b", "c"]) == []
    assert exact_duplicate_groups([]) == []


def test_exact_groups_split_hash_collisions():
    # Every text given the same hash: the groups still follow the texts themselves.
    texts = ["a b", "c", "A  B", "d", "c"]
    label, multi = dedup._exact_groups(texts, np.zeros(len(texts), dtype=np.uint64))
    assert multi == {0: [0, 2], 1: [1, 4]}
    assert label.tolist() == [0, 1, 0, 3, 1]


def test_words_match_str_split():
    # The numpy word splitter agrees with normalize_text().split() on ASCII control characters,
    # Unicode whitespace and non-ASCII words, and a word's hash depends only on the word.
    rng = random.Random(3)
    pieces = ["ab", "Ab", "x", "é", "ÉTÉ", "日本", "\x00", "\x07", "-", " ", "  ", "\t", "\n", "\r\n", "\x0b"]
    pieces += ["\x0c", "\x1c", "\x1f", "\x85", "\u00a0", "\u2003", "\u3000"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(400)]
    words = dedup._Words()
    hashes, lens = words(texts)
    assert lens.tolist() == [len(normalize_text(t).split()) for t in texts]
    flat = [w for t in texts for w in normalize_text(t).split()]
    by_word: dict[str, int] = {}
    for w, h in zip(flat, hashes.tolist(), strict=True):
        assert by_word.setdefault(w, h) == h
    assert len(set(by_word.values())) == len(by_word)


def test_near_pair_found_at_085_not_at_05():
    rng = random.Random(1)
    base = " ".join(WORDS[:40])  # 40 distinct words, 38 shingles
    close = edit(rng, base, 1)  # one word changed: 3 shingles lost, J = 35 / 41
    far = " ".join(WORDS[:24] + WORDS[100:116])  # J = 22 / 54
    assert jaccard(base, close) == pytest.approx(35 / 41)
    assert jaccard(base, far) < 0.5
    pairs = near_duplicate_pairs([base, far, close])
    assert pairs == [(0, 2, 35 / 41)]


def families(seed: int, n: int = 60) -> list[str]:
    """n random texts, each with 0-2 edited copies (J from about 0.7 to 0.97), shuffled."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        base = random_text(rng, rng.randint(20, 80))
        texts.append(base)
        for _ in range(rng.randint(0, 2)):
            texts.append(edit(rng, base, rng.randint(1, 4)))
    texts.append(texts[0].upper())  # an exact copy: not a near pair of text 0
    rng.shuffle(texts)
    return texts


def test_scores_are_exact_jaccard_and_match_brute_force():
    texts = families(7)
    expected = brute_force(texts, 0.8)
    assert len(expected) > 20
    got = near_duplicate_pairs(texts, threshold=0.8)
    assert [(i, j) for i, j, _ in got] == sorted(expected)
    for i, j, score in got:
        assert score == pytest.approx(expected[i, j], abs=1e-12)
        assert score >= 0.8


def test_small_batches_give_the_same_pairs(monkeypatch):
    texts = families(9)
    pairs = near_duplicate_pairs(texts, threshold=0.6)
    assert len(pairs) > 20
    monkeypatch.setattr(dedup, "_PAIR_BATCH", 3)
    monkeypatch.setattr(dedup, "_VERIFY_BATCH", 2)
    monkeypatch.setattr(dedup, "_TEXTS_PER_CHUNK", 5)
    assert near_duplicate_pairs(texts, threshold=0.6) == pairs


def test_near_pairs_reported_for_every_exact_copy():
    rng = random.Random(2)
    base = random_text(rng, 50)
    texts = [base, base.upper(), edit(rng, base, 1), "unrelated words here"]
    score = jaccard(base, texts[2])
    assert near_duplicate_pairs(texts) == [(0, 2, score), (1, 2, score)]
    assert find_duplicates(texts) == ([[0, 1]], [(0, 2, score), (1, 2, score)])


def test_cross_pairs_only_across_sets():
    rng = random.Random(4)
    x, y, z = (random_text(rng, 40) for _ in range(3))
    train = [x, y, edit(rng, y, 1), x.upper(), random_text(rng, 40)]  # inside: exact (0, 3), near (1, 2)
    test = [z, "  " + x, edit(rng, y, 1), z.upper(), edit(rng, train[4], 1)]  # inside: exact (0, 3)
    exact, near = cross_pairs(train, test)
    assert exact == [(0, 1), (3, 1)]
    expected = {
        (a, b): jaccard(ta, tb)
        for a, ta in enumerate(train)
        for b, tb in enumerate(test)
        if normalize_text(ta) != normalize_text(tb) and jaccard(ta, tb) >= 0.8
    }
    assert {(1, 2), (4, 4)} <= set(expected)
    assert [(a, b) for a, b, _ in near] == sorted(expected)
    for a, b, score in near:
        assert score == pytest.approx(expected[a, b])
    assert cross_pairs([], test) == ([], [])
    assert cross_pairs(train, []) == ([], [])


def test_deterministic_by_seed():
    rng = random.Random(5)
    texts = []
    for _ in range(100):
        base = random_text(rng, 30)
        texts += [base, edit(rng, base, rng.randint(1, 3))]
    first = near_duplicate_pairs(texts, threshold=0.7, seed=11)
    assert near_duplicate_pairs(texts, threshold=0.7, seed=11) == first
    h1, h2 = dedup._Hasher(3, 64, 11), dedup._Hasher(3, 64, 12)
    assert np.array_equal(h1.sketch(texts).sig, dedup._Hasher(3, 64, 11).sketch(texts).sig)
    assert not np.array_equal(h1.sketch(texts).sig, h2.sketch(texts).sig)
    # Another seed draws other hash functions; clear pairs (J >= 0.85) are found either way.
    clear = {(i, j) for i, j, s in first if s >= 0.85}
    assert clear <= {(i, j) for i, j, _ in near_duplicate_pairs(texts, threshold=0.7, seed=12)}


def test_empty_and_short_texts():
    assert near_duplicate_pairs([]) == []
    assert near_duplicate_pairs([""]) == []
    assert find_duplicates(["", " \n", "\t"]) == ([[0, 1, 2]], [])
    # A text shorter than the shingle is one shingle of all its words.
    texts = ["hello", "Hello", "world", "hello world", "hello  WORLD", "world hello", "a b c"]
    assert exact_duplicate_groups(texts) == [[0, 1], [3, 4]]
    assert near_duplicate_pairs(texts, threshold=0.1) == []
    assert near_duplicate_pairs(["a b c d", "a b c"], threshold=0.5) == [(0, 1, 0.5)]
    assert near_duplicate_pairs(["one two", "one two three"], threshold=0.1) == []
    # Equal shingle sets but different texts: a near pair with Jaccard 1.
    assert near_duplicate_pairs(["one two", "two one two"], shingle=1, threshold=0.5) == [(0, 1, 1.0)]


def test_signatures_match_naive_minhash_across_chunks_and_blocks(monkeypatch):
    rng = random.Random(6)
    texts = [random_text(rng, rng.randint(0, 30)) for _ in range(50)] + ["", "x", "x y"]
    hasher = dedup._Hasher(3, 16, 0)
    sk = hasher.sketch(texts)
    # Small chunks and blocks: texts straddle block boundaries, the result must not change.
    monkeypatch.setattr(dedup, "_TEXTS_PER_CHUNK", 7)
    monkeypatch.setattr(dedup, "_CELLS_PER_BLOCK", 16 * 5)
    small = dedup._Hasher(3, 16, 0).sketch(texts)
    for got, want in zip(small, sk, strict=True):
        assert np.array_equal(got, want)
    for k, text in enumerate(texts):
        hashes, _ = hasher.shingles(*hasher.words([text]))
        assert sk.has_words[k] == bool(text.split())
        if len(hashes):
            x = hashes.astype(np.uint32)
            naive = (hasher.a[:, None] * x[None, :] + hasher.b[:, None]).min(axis=1)
            assert np.array_equal(sk.sig[k], naive)


def test_shared_boilerplate_stays_fast_and_exact(monkeypatch):
    # Texts that share most of their shingles (a long common preamble) fill one band bucket; it is
    # split, and the true near pairs among them are still found.
    rng = random.Random(10)
    preamble = random_text(rng, 60)
    texts = [preamble + " " + random_text(rng, 12) for _ in range(300)]
    texts += [edit(rng, texts[k], 1) for k in range(0, 40, 4)]
    monkeypatch.setattr(dedup, "_MAX_BUCKET", 20)
    expected = brute_force(texts, 0.9)
    assert len(expected) >= 10
    assert {(i, j) for i, j, _ in near_duplicate_pairs(texts, threshold=0.9)} == set(expected)


def test_choose_bands():
    assert choose_bands(0.8, 128) == (21, 6)
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95):
        b, r = choose_bands(threshold, 128)
        assert b * r <= 128
        assert 1 - (1 - threshold**r) ** b >= 0.99
        # One more row per band would miss the target.
        assert 1 - (1 - threshold ** (r + 1)) ** (128 // (r + 1)) < 0.99


def test_bad_arguments():
    for kwargs in ({"threshold": 0}, {"threshold": 1.5}, {"shingle": 0}, {"num_perm": 0}):
        with pytest.raises(ValueError):
            near_duplicate_pairs(["a"], **kwargs)
        with pytest.raises(ValueError):
            cross_pairs(["a"], ["b"], **kwargs)


def test_planted_duplicates_recall():
    """~2,000 generated texts with planted exact and near copies: recall >= 0.95, precision 1.0."""
    rng = random.Random(8)
    vocab = WORDS[:2000]
    texts = [
        " ".join(rng.choice(vocab) for _ in range(rng.randint(60, 150))).capitalize() + "."
        for _ in range(1920)
    ]
    planted_exact, planted_near = [], []
    for src in rng.sample(range(len(texts)), 80):
        if len(planted_exact) < 40:
            planted_exact.append((src, len(texts)))
            texts.append("  " + texts[src].upper().replace(" ", "\n", 2))
        else:
            planted_near.append((src, len(texts)))
            texts.append(edit(rng, texts[src], rng.randint(1, 2)))
    groups, pairs = find_duplicates(texts)
    assert sorted(groups) == sorted([list(p) for p in planted_exact])
    reachable = [p for p in planted_near if jaccard(texts[p[0]], texts[p[1]]) >= 0.8]
    assert len(reachable) >= 35
    found = {(i, j) for i, j, _ in pairs}
    assert sum(p in found for p in reachable) / len(reachable) >= 0.95
    for i, j, score in pairs:  # precision: every reported pair is a true near duplicate
        assert score == pytest.approx(jaccard(texts[i], texts[j]))
        assert score >= 0.8
