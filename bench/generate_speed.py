"""Evaluation's batched greedy generation against one prompt at a time, on the default model.

Run as: python bench/generate_speed.py [--n 64] [--max-new-tokens 64] [--batch-size 16] [--threads N]
                                       [--json OUT]

Both ways generate greedily for the same prompts (a seeded sample of banking77 questions, rendered
with the model's chat template exactly as `tunekit eval` renders them), with the same max_new_tokens
and stop ids:

  one_at_a_time  `model.generate` on each prompt alone (batch 1, KV cache on: transformers' default).
  batched        tunekit.eval.generate.generate: prompts sorted by length, left-padded batches.

tokens/s counts the reply tokens each way produced (up to and including the stop token; the padding
a finished row carries in a batch is not counted). Greedy replies should be the same both ways; the
script reports how many are identical (padding can flip a near-tie in fp32).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77" / "train.csv"
SEED = 42


def prompts(n: int):
    from tunekit.data import load_examples

    if not DATA.is_file():
        sys.exit(f"generate_speed: {DATA} not found; this benchmark needs ../shared/data beside the repo.")
    examples = load_examples(DATA, format="classification", columns={"label": "category"})
    random.Random(SEED).shuffle(examples)  # the file is sorted by intent
    return examples[:n]


def reply_tokens(tokenizer, text: str, stops: list[int], max_new: int) -> int:
    """Tokens of a decoded reply, plus its stop token when it ended before max_new."""
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    return min(max_new, n + 1) if stops else n


def one_at_a_time(model, tokenizer, examples, max_new: int) -> tuple[list[str], int, float]:
    import torch

    from tunekit.data.tokenize import render_prompt
    from tunekit.models.stops import stop_token_ids

    stops = stop_token_ids(tokenizer, model)
    texts, n_tokens = [], 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for ex in examples:
            enc = tokenizer(render_prompt(tokenizer, ex), add_special_tokens=False, return_tensors="pt")
            gen = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
            )
            new = gen[0, enc["input_ids"].shape[1] :]
            n_tokens += len(new)  # batch 1: no padding, every token is the reply's
            texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts, n_tokens, time.perf_counter() - t0


def batched(model, tokenizer, examples, max_new: int, batch_size: int) -> tuple[list[str], float]:
    from tunekit.eval.generate import generate

    t0 = time.perf_counter()
    texts = generate(model, tokenizer, examples, max_new, batch_size=batch_size)
    return texts, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="the batched run's batch size")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import torch

    from tunekit.eval.generate import _stop_ids
    from tunekit.models import load_model, load_tokenizer, resolve_model

    if a.threads:
        torch.set_num_threads(a.threads)
    path = resolve_model(MODEL)
    tokenizer, model = load_tokenizer(path), load_model(path)
    model.eval()
    examples = prompts(a.n)
    stops = _stop_ids(model, tokenizer)

    # Warm up both paths once (first-call allocation and kernel selection), then time.
    one_at_a_time(model, tokenizer, examples[:1], 4)
    batched(model, tokenizer, examples[:2], 4, 2)
    ref, ref_tokens, ref_s = one_at_a_time(model, tokenizer, examples, a.max_new_tokens)
    out, b_s = batched(model, tokenizer, examples, a.max_new_tokens, a.batch_size)
    b_tokens = sum(reply_tokens(tokenizer, t, stops, a.max_new_tokens) for t in out)
    # One-at-a-time counted exactly; the batched count is re-tokenized from its texts. Check that the
    # re-tokenized count of the reference agrees with its exact count (it should, to within a few).
    ref_recount = sum(reply_tokens(tokenizer, t, stops, a.max_new_tokens) for t in ref)
    same = sum(x == y for x, y in zip(ref, out, strict=True))
    res = {
        "model": MODEL,
        "prompts": a.n,
        "max_new_tokens": a.max_new_tokens,
        "batch_size": a.batch_size,
        "threads": torch.get_num_threads(),
        "one_at_a_time": {"tokens": ref_tokens, "seconds": ref_s, "tokens_per_s": ref_tokens / ref_s},
        "batched": {"tokens": b_tokens, "seconds": b_s, "tokens_per_s": b_tokens / b_s},
        "reference_recount": ref_recount,
        "identical_replies": same,
    }
    res["speedup"] = res["batched"]["tokens_per_s"] / res["one_at_a_time"]["tokens_per_s"]
    for k in ("one_at_a_time", "batched"):
        r = res[k]
        print(f"{k:<14} {r['tokens']:>6} tokens  {r['seconds']:>7.1f} s  {r['tokens_per_s']:>7.1f} tokens/s")
    print(
        f"batched / one at a time: {res['speedup']:.2f}x; identical replies {same}/{a.n}; "
        f"reference tokens exact {ref_tokens}, re-tokenized {ref_recount}"
    )
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
