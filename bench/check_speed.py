"""How fast `tunekit data check` is on a large chat data set.

Run as: python bench/check_speed.py [--n 100000] [--vocab english|synthetic] [--json OUT]

Generates N OpenAI-chat examples (system, user, assistant; about 60-120 words each, with 2% exact
and 2% near duplicates planted) into a temporary file, then times, in one process:
  - baseline: reading and normalizing the file alone (`load_examples`);
  - the whole check: reading, row checks, tokens with the default model's tokenizer, exact and
    near duplicates (MinHash LSH), statistics.
Prints seconds, examples/s, the ratio to the baseline and what was found. Target: N=100,000 in
under 60 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def english_vocab() -> list[str]:
    """Real words (those of the shipped demo tickets), so examples tokenize like real chat data:
    about 1.3 tokens a word, where made-up words like "w1234" take 3-4."""
    from tunekit.demo.tickets import generate

    words = {
        w.strip(".,:;!?\"'()").lower()
        for r in generate(800, 0)
        for m in r["messages"]
        for w in m["content"].split()
    }
    return sorted(w for w in words if w.isalpha())


def make_rows(n: int, seed: int = 0, vocab: list[str] | None = None) -> list[dict]:
    rng = random.Random(seed)
    vocab = vocab or [f"w{i}" for i in range(4000)]
    rows = []
    for i in range(n):
        r = rng.random()
        if rows and r < 0.02:
            rows.append(json.loads(json.dumps(rng.choice(rows))))  # exact duplicate
            continue
        if rows and r < 0.04:
            row = json.loads(json.dumps(rng.choice(rows)))
            words = row["messages"][1]["content"].split()
            words[rng.randrange(len(words))] = rng.choice(vocab)  # near duplicate: one word changed
            row["messages"][1]["content"] = " ".join(words)
            rows.append(row)
            continue
        user = " ".join(rng.choice(vocab) for _ in range(rng.randint(40, 90)))
        answer = " ".join(rng.choice(vocab) for _ in range(rng.randint(15, 30)))
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a support assistant."},
                    {"role": "user", "content": f"ticket {i}: {user}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--vocab",
        choices=["english", "synthetic"],
        default="english",
        help="english: real words (about 190 tokens an example); synthetic: w1234-style words (about 440, a stress case)",
    )
    args = ap.parse_args()

    from tunekit.data import load_examples
    from tunekit.data.check import check_data

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        vocab = english_vocab() if args.vocab == "english" else None
        path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.n, vocab=vocab)))
        t0 = time.perf_counter()
        load_examples(path)
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = check_data([path], model="smollm2-135m-instruct", max_length=512)
        t_check = time.perf_counter() - t0
    d = report.to_dict()
    figures = {
        "examples": args.n,
        "vocab": args.vocab,
        "tokens_per_example": round(d["stats"]["tokens_per_example"]["mean"], 1),
        "baseline_read_seconds": round(t_read, 2),
        "check_seconds": round(t_check, 2),
        "check_examples_per_s": round(args.n / t_check),
        "ratio_to_read": round(t_check / t_read, 2),
        "exact_duplicate_groups": sum(x["kind"] == "exact" for x in d["duplicates"]),
        "near_duplicate_pairs": sum(x["kind"] == "near" for x in d["duplicates"]),
        "total_tokens": d["stats"].get("total_tokens"),
        "under_60_s": t_check < 60,
    }
    for k, v in figures.items():
        print(f"{k:>24}: {v}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
