"""Speed and recall of tunekit.data.dedup on generated texts with planted duplicates.

    python bench/dedup_speed.py                 # 100,000 texts
    python bench/dedup_speed.py --n 20000 --json dedup.json

Texts are 60-150 words of sentences drawn from a Zipf-weighted vocabulary of 5,000 made-up words.
About 2% are planted exact duplicates (a copy with its case and whitespace changed) and about 2%
planted near duplicates (a copy with 1 to len/25 words replaced, Jaccard about 0.75-0.97). Recall is over the planted near
pairs whose exact Jaccard (computed here independently, on shingle strings) reaches the threshold;
precision is the share of reported near pairs whose independent Jaccard reaches it.
If `datasketch` is importable, its MinHash + MinHashLSH runs on the first --baseline-n texts, and
tunekit on the same texts, for the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

import numpy as np

from tunekit.data.dedup import (
    choose_bands,
    exact_duplicate_groups,
    find_duplicates,
    near_duplicate_pairs,
    normalize_text,
)


def make_vocab(size: int, rng: random.Random) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words: dict[str, None] = {}
    while len(words) < size:
        words["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))] = None
    return list(words)


def make_texts(n: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]], list[tuple[int, int]]]:
    """(texts, planted exact pairs, planted near pairs), the pairs as (original, copy)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    vocab = np.array(make_vocab(5000, rng))
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    n_exact, n_near = n // 50, n // 50
    n_base = n - n_exact - n_near
    lengths = nrng.integers(60, 151, size=n_base)
    ids = nrng.choice(len(vocab), size=int(lengths.sum()), p=weights / weights.sum())
    texts: list[str] = []
    start = 0
    for length in lengths.tolist():
        words = vocab[ids[start : start + length]].tolist()
        start += length
        out, k = [], 0
        while k < length:  # sentences of 5-16 words
            sent = words[k : k + rng.randint(5, 16)]
            k += len(sent)
            sent[0] = sent[0].capitalize()
            out.append(" ".join(sent) + rng.choice(".?!" if rng.random() < 0.2 else "."))
        texts.append(" ".join(out))
    originals = rng.sample(range(n_base), n_exact + n_near)
    exact, near = [], []
    for src in originals[:n_exact]:
        t = texts[src]
        copy = t.upper() if rng.random() < 0.5 else "  " + t.replace(" ", "\n", 3) + " "
        exact.append((src, len(texts)))
        texts.append(copy)
    replacements = vocab[:2000].tolist()
    for src in originals[n_exact:]:
        words = texts[src].split(" ")
        for pos in rng.sample(range(len(words)), rng.randint(1, max(1, round(len(words) / 25)))):
            words[pos] = replacements[rng.randrange(len(replacements))]
        near.append((src, len(texts)))
        texts.append(" ".join(words))
    # Shuffle so planted copies are spread out, as in real data.
    order = list(range(len(texts)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    texts = [texts[i] for i in order]
    exact = [tuple(sorted((where[a], where[b]))) for a, b in exact]
    near = [tuple(sorted((where[a], where[b]))) for a, b in near]
    return texts, exact, near


def shingle_set(text: str, n: int = 3) -> set[str]:
    words = normalize_text(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def run_tunekit(texts: list[str], threshold: float) -> tuple[list[list[int]], list, float, float]:
    t0 = time.perf_counter()
    groups = exact_duplicate_groups(texts)
    t1 = time.perf_counter()
    pairs = near_duplicate_pairs(texts, threshold=threshold)
    t2 = time.perf_counter()
    return groups, pairs, t1 - t0, t2 - t1


def run_datasketch(texts: list[str], threshold: float) -> tuple[float, set[tuple[int, int]]]:
    """datasketch's fastest path (MinHash.bulk, an insertion session) with tunekit's bands x rows.

    Its default banding for 0.8 (9 x 13) would find a pair at J = 0.8 only 40% of the time. It
    reports LSH candidates without verifying them, so it does less work than tunekit here.
    """
    from datasketch import MinHash, MinHashLSH

    bands, rows = choose_bands(threshold, 128)
    t0 = time.perf_counter()
    sketches = MinHash.bulk([[s.encode() for s in shingle_set(t)] for t in texts], num_perm=128)
    lsh = MinHashLSH(num_perm=128, params=(bands, rows))
    with lsh.insertion_session() as session:
        for i, m in enumerate(sketches):
            session.insert(i, m)
    pairs = {(min(i, j), max(i, j)) for i, m in enumerate(sketches) for j in lsh.query(m) if j != i}
    return time.perf_counter() - t0, pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--baseline-n", type=int, default=10_000, help="texts for the datasketch comparison")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    texts, planted_exact, planted_near = make_texts(args.n)
    run_tunekit(texts[:500], args.threshold)  # warm-up: imports, first allocations
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(f"{len(texts)} texts, {words:.0f} words on average")

    groups, pairs, t_exact, t_near = run_tunekit(texts, args.threshold)
    total = t_exact + t_near
    t0 = time.perf_counter()
    both = find_duplicates(texts, threshold=args.threshold)
    t_both = time.perf_counter() - t0
    assert both == (groups, pairs)
    print(
        f"tunekit: exact {t_exact:.2f} s + near {t_near:.2f} s = {total:.2f} s, {len(texts) / total:,.0f} docs/s; "
        f"find_duplicates (both in one pass) {t_both:.2f} s, {len(texts) / t_both:,.0f} docs/s"
    )

    same_group = {(g[k], g[m]) for g in groups for k in range(len(g)) for m in range(k + 1, len(g))}
    exact_recall = sum(pair in same_group for pair in planted_exact) / max(1, len(planted_exact))
    # A planted near copy whose replaced words all happened to equal the originals is an exact copy.
    near_only = [p for p in planted_near if normalize_text(texts[p[0]]) != normalize_text(texts[p[1]])]
    truth = {pair: jaccard(texts[pair[0]], texts[pair[1]]) for pair in near_only}
    reachable = [pair for pair, j in truth.items() if j >= args.threshold]
    found = {(i, j): s for i, j, s in pairs}
    recall = sum(pair in found for pair in reachable) / max(1, len(reachable))
    checked = {(i, j): jaccard(texts[i], texts[j]) for i, j, _ in pairs}
    precision = sum(j >= args.threshold for j in checked.values()) / max(1, len(pairs))
    max_score_error = max((abs(checked[i, j] - s) for i, j, s in pairs), default=0.0)
    unplanted = len(set(found) - set(planted_near))
    print(
        f"exact: {len(groups)} groups, planted recall {exact_recall:.4f}; near: {len(pairs)} pairs, "
        f"recall {recall:.4f} on {len(reachable)} planted pairs with J >= {args.threshold} "
        f"({len(near_only) - len(reachable)} planted below it), precision {precision:.4f}, "
        f"{unplanted} pairs beyond the planted ones, max score error {max_score_error:.1e}"
    )
    figures = {
        "n": len(texts),
        "mean_words": round(words, 1),
        "threshold": args.threshold,
        "exact_seconds": round(t_exact, 3),
        "near_seconds": round(t_near, 3),
        "seconds": round(total, 3),
        "docs_per_second": round(len(texts) / total),
        "find_duplicates_seconds": round(t_both, 3),
        "exact_recall": exact_recall,
        "near_recall": recall,
        "near_precision": precision,
        "near_pairs": len(pairs),
        "planted_near_reachable": len(reachable),
    }

    try:
        import datasketch  # noqa: F401
    except ImportError:
        print("datasketch not importable: baseline skipped")
    else:
        sub = texts[: args.baseline_n]
        t_ds, ds_pairs = run_datasketch(sub, args.threshold)
        sub_groups, sub_pairs, te, tn = run_tunekit(sub, args.threshold)
        ratio = t_ds / (te + tn)
        wanted = {(i, j) for i, j, _ in sub_pairs}
        ds_recall = len(wanted & ds_pairs) / max(1, len(wanted))
        print(
            f"datasketch on {len(sub)} texts: {t_ds:.2f} s ({len(sub) / t_ds:,.0f} docs/s, {len(ds_pairs)} "
            f"unverified candidate pairs, {ds_recall:.4f} of tunekit's near pairs among them); "
            f"tunekit exact + near {te + tn:.2f} s: {ratio:.1f}x faster"
        )
        figures |= {"baseline_n": len(sub), "datasketch_seconds": round(t_ds, 3), "speedup": round(ratio, 1)}

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process (texts included): {peak:.0f} MiB")
    figures["peak_rss_mib"] = round(peak)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
