"""Evaluation speed: the old path against the new one, on the same data in the same process.

Run as: python bench/eval_speed.py [--n 64] [--shots 3] [--run RUN_DIR] [--probe-questions 40]
                                   [--normalisation N] [--threads N] [--json OUT]

Data: held-out banking77 rows (a seeded shuffle of ../shared/data/banking77/train.csv; the first
--n rows are the test set, rows from 1000 on the training split that gives the 77 labels and the
few-shot shots). Model: the default (smollm2-135m-instruct) as the base, zero-shot and --shots-shot;
with --run, also that run's fine-tuned model (a banking77 run of `task: sft`).

  old  what `tunekit eval` did before: greedy generation in left-padded batches (max_new_tokens =
       the longest reference + 16), then a second pass for the test loss (`target_logprobs`); the
       probe: a full forward per multiple-choice option, plain batched generation for open questions.
  new  label scoring (eval/label_scoring.py: one forward of each prompt after the shared prefix's
       cache, the exact best-first search over the label trie, the test loss from the same forward);
       the probe: each question encoded once, its options against its cache, generation from the
       shared prefix's cache.

Prints examples/s and seconds of each path per contender, the accuracy of each (label scoring can
only differ from generation where generation wrote something that is not the reference), the probe's
seconds, and the projection for 3,080 test examples x 3 contenders + the probe (for base and
fine-tuned); the machine's load average (`uptime`) beside each figure. --normalisation N scores
every label of N examples and compares the argmax of the sum of log-probs with that of the mean.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77" / "train.csv"
SEED = 42
FULL_TEST = 3080  # banking77's test split
BUDGET = None  # set from --budget in main (default: label_scoring.SEARCH_BUDGET, as tunekit eval)


def load_avg() -> float:
    return os.getloadavg()[0]


def banking(n: int):
    """(test examples, training examples) of a seeded shuffle of the banking77 file."""
    from tunekit.data import load_examples

    examples = load_examples(DATA, format="classification", columns={"label": "category"})
    random.Random(SEED).shuffle(examples)  # the file is sorted by intent
    return examples[:n], examples[1000:]


def timed(fn):
    load0, t0 = load_avg(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, (load0 + load_avg()) / 2


def old_path(model, tok, exs, batch_size: int):
    """Generation in left-padded batches, then the test-loss pass: `tunekit eval` before."""
    from tunekit.data.tokenize import render_prompt, tokenize_example
    from tunekit.eval.generate import generate_ids
    from tunekit.eval.probe import target_logprobs
    from tunekit.models.stops import reply_text, stop_token_ids

    stops = stop_token_ids(tok, model)
    max_new = 16 + max(len(tok(ex.target, add_special_tokens=False)["input_ids"]) for ex in exs)
    prompts = [render_prompt(tok, ex) for ex in exs]
    rows = generate_ids(model, tok, prompts, max_new, batch_size, stops, share_prefix=False)
    target_logprobs(model, [tokenize_example(tok, ex, 1 << 16) for ex in exs], tok.pad_token_id, batch_size)
    return [reply_text(tok, r, stops).strip() for r in rows]


def new_path(model, tok, exs, labels, batch_size: int, exhaustive: bool = False):
    from tunekit.data.tokenize import tokenize_example
    from tunekit.eval.label_scoring import Candidates, label_scoring_unsupported, score_labels
    from tunekit.models.stops import stop_token_ids

    cands = Candidates.build(tok, exs[0], labels, stop_token_ids(tok, model))
    items = [tokenize_example(tok, ex, 1 << 16) for ex in exs]
    why = label_scoring_unsupported(model, items, cands)
    if why:
        sys.exit(f"eval_speed: label scoring does not apply: {why}")
    got = score_labels(model, items, cands, tok.pad_token_id, batch_size, exhaustive, budget=BUDGET)
    return got, cands


def old_probe(model, tok, probe, batch_size: int) -> None:
    from tunekit.data.tokenize import render_prompt, tokenize_example
    from tunekit.eval.generate import generate_ids
    from tunekit.eval.probe import OPEN_INSTRUCTION, _qa, target_logprobs
    from tunekit.models.stops import stop_token_ids

    items = [tokenize_example(tok, _qa(q, o), 1024) for q, opts, _ in probe.multiple_choice for o in opts]
    target_logprobs(model, items, tok.pad_token_id, batch_size)
    prompts = [render_prompt(tok, _qa(f"{OPEN_INSTRUCTION}\nQuestion: {q}", "")) for q, _ in probe.open]
    generate_ids(model, tok, prompts, 24, batch_size, stop_token_ids(tok, model), share_prefix=False)


def accuracy(preds, exs) -> float:
    return sum(p.strip() == ex.target for p, ex in zip(preds, exs, strict=True)) / len(exs)


def contenders(args, model, is_adapter: bool):
    """(name, context manager giving the model) for each contender measured."""
    from contextlib import nullcontext

    out = [("base", model.disable_adapter() if is_adapter else nullcontext(model))]
    if args.shots:
        out.append(("base_few_shot", model.disable_adapter() if is_adapter else nullcontext(model)))
    if is_adapter:
        out.append(("finetuned", nullcontext(model)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="test examples")
    ap.add_argument("--shots", type=int, default=3, help="few-shot shots (0: no base_few_shot)")
    ap.add_argument("--run", type=Path, help="a banking77 `task: sft` run: adds its fine-tuned model")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--probe-questions", type=int, default=40, help="of each kind (the builtin has 40)")
    ap.add_argument("--normalisation", type=int, default=0, help="examples scored on every label")
    ap.add_argument("--skip-old", action="store_true", help="measure the new path only")
    ap.add_argument("--budget", type=int, help="search budget (default: tunekit eval's; 0: exact)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not DATA.is_file():
        sys.exit(
            f"eval_speed: skipped: {DATA} not found (this benchmark needs ../shared/data beside the repo)"
        )

    from contextlib import nullcontext

    import torch

    from tunekit.eval.evaluate import few_shot_examples, with_shots
    from tunekit.eval.probe import load_probe, run_probe
    from tunekit.models import load_model, load_tokenizer, resolve_model

    if a.threads:
        torch.set_num_threads(a.threads)
    from tunekit.eval.label_scoring import SEARCH_BUDGET

    global BUDGET
    BUDGET = SEARCH_BUDGET if a.budget is None else (a.budget or None)
    test, train = banking(a.n)
    labels = sorted({ex.target for ex in train})
    if a.run:
        from tunekit.train.setup import load_trained

        model, tok, is_adapter = load_trained(a.run)
    else:
        path = resolve_model(MODEL)
        model, tok, is_adapter = load_model(path).eval(), load_tokenizer(path), False
    shots = few_shot_examples(train, a.shots, SEED)
    res: dict = {"n": a.n, "labels": len(labels), "threads": torch.get_num_threads(), "contenders": {}}
    print(f"{a.n} banking77 test examples, {len(labels)} labels, {torch.get_num_threads()} threads")
    for name, ctx in contenders(a, model, is_adapter):
        exs = [with_shots(ex, shots) for ex in test] if name == "base_few_shot" else test
        with ctx as m:
            new, t_new, l_new = timed(lambda m=m, exs=exs: new_path(m, tok, exs, labels, a.batch_size))
            scores, cands = new
            row = {
                "new_s": t_new,
                "new_load": l_new,
                "new_acc": accuracy(scores.predictions, exs),
                "expanded_per_example": sum(scores.expanded) / len(exs),
                "exact_share": sum(scores.exact) / len(exs),
                "trie_tokens": cands.n_nodes,
            }
            if not a.skip_old:
                old, t_old, l_old = timed(lambda m=m, exs=exs: old_path(m, tok, exs, a.batch_size))
                row |= {"old_s": t_old, "old_load": l_old, "old_acc": accuracy(old, exs)}
                row["old_valid_labels"] = sum(p in set(labels) for p in old) / len(exs)
            if a.normalisation:
                part = exs[: a.normalisation]
                full, _ = new_path(m, tok, part, labels, a.batch_size, exhaustive=True)
                by_sum = [
                    labels[max(range(len(labels)), key=lambda k, s=s: s[k][0])] for s in full.all_scores
                ]
                by_mean = [
                    labels[max(range(len(labels)), key=lambda k, s=s: s[k][0] / s[k][1])]
                    for s in full.all_scores
                ]
                row |= {"sum_acc": accuracy(by_sum, part), "mean_acc": accuracy(by_mean, part)}
        res["contenders"][name] = row
        line = f"{name:<14} new {a.n / t_new:6.2f} ex/s {t_new:7.1f} s (load {l_new:.1f}) acc {row['new_acc']:.3f}"
        if "old_s" in row:
            line += (
                f" | old {a.n / row['old_s']:6.2f} ex/s {row['old_s']:7.1f} s (load {row['old_load']:.1f})"
                f" acc {row['old_acc']:.3f} | {row['old_s'] / t_new:.1f}x"
            )
        print(
            line + f" | opened/example {row['expanded_per_example']:.1f}, exact {row['exact_share']:.2f}",
            flush=True,
        )
        if "sum_acc" in row:
            print(
                f"{'':<14} normalisation on {a.normalisation}: sum {row['sum_acc']:.3f}, mean {row['mean_acc']:.3f}"
            )

    probe = load_probe("builtin", a.probe_questions, seed=SEED)
    with model.disable_adapter() if is_adapter else nullcontext(model) as m:
        _, p_new, lp_new = timed(lambda: run_probe(m, tok, probe, a.batch_size))
        res["probe"] = {
            "new_s": p_new,
            "new_load": lp_new,
            "questions": len(probe.multiple_choice) + len(probe.open),
        }
        line = (
            f"probe (one model, {res['probe']['questions']} questions) new {p_new:.1f} s (load {lp_new:.1f})"
        )
        if not a.skip_old:
            _, p_old, lp_old = timed(lambda: old_probe(m, tok, probe, a.batch_size))
            res["probe"] |= {"old_s": p_old, "old_load": lp_old}
            line += f" | old {p_old:.1f} s (load {lp_old:.1f}) | {p_old / p_new:.1f}x"
    print(line)
    project(res, a)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


def project(res: dict, a) -> None:
    """3,080 examples x 3 contenders + the probe on base and fine-tuned, from the per-example times.
    Without --run, the fine-tuned contender is counted at the zero-shot base's time (an upper bound
    for label scoring: a confident model's search stops at once)."""
    rows = res["contenders"]
    for way in ("new", "old"):
        if f"{way}_s" not in rows["base"]:
            continue
        per = {n: r[f"{way}_s"] / a.n for n, r in rows.items()}
        per.setdefault("finetuned", per["base"])
        per.setdefault("base_few_shot", per["base"])
        total = FULL_TEST * sum(per.values()) + 2 * res["probe"][f"{way}_s"]
        res[f"projection_{way}_s"] = total
        print(f"projection, {way}: {FULL_TEST} examples x 3 contenders + probe x 2 = {total / 60:.1f} min")


if __name__ == "__main__":
    main()
