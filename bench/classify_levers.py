"""What each classification lever gives on real intents (issue 22 item 1), measured on held-out rows.

    python bench/classify_levers.py                       # Banking77, every lever, 1 epoch each
    python bench/classify_levers.py --levers head-lora,head-full --rows 3000 --epochs 1
    python bench/classify_levers.py --data ../shared/data/sms-spam/... --label-column label

The official Banking77 test set is not used: a stratified `--test` rows are held out of the public
train split (../shared/data/banking77/train.csv) with a fixed seed, and every lever trains on (a
subset of) the rest, so the figures compare levers on the same unseen texts. Each lever is a real
`tunekit train` run into a temporary folder, evaluated by `tunekit eval`. Prints one row per lever:
accuracy with its 95% interval, macro-F1, training seconds, steps, evaluation seconds.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# name -> config overrides on top of the common part (model, data, max_length, seed).
LEVERS: dict[str, dict] = {
    # The generative default: teach the model to write the label (evaluated by label scoring where
    # tunekit eval does it, else by generation).
    # (128 tokens: the chat template and its system prompt come before the text)
    "sft-lora": {
        "task": "sft",
        "method": "lora",
        "train": {"learning_rate": 2.0e-4, "batch_size": 16, "max_length": 128},
    },
    # A label head (one output per label) on LoRA-adapted layers, the head trained in full.
    "head-lora": {"task": "classify", "method": "lora", "train": {"learning_rate": 1.0e-3, "batch_size": 16}},
    "head-lora-r64": {
        "task": "classify",
        "method": "lora",
        "lora": {"r": 64, "alpha": 64, "target_modules": "all-linear"},
        "train": {"learning_rate": 5.0e-4, "batch_size": 16},
    },
    # Every weight trained: the classic recipe for encoders, at an encoder's learning rate.
    "head-full": {"task": "classify", "method": "full", "train": {"learning_rate": 5.0e-5, "batch_size": 16}},
    # Whatever tunekit picks when the config names no task, method or learning rate.
    "default": {},
}


def stratified_holdout(rows: list[dict], label: str, n_test: int, seed: int) -> tuple[list, list]:
    """(rest, test): test takes n_test rows spread over the labels in proportion, the same every run."""
    by_label: dict[str, list] = defaultdict(list)
    for r in rows:
        by_label[r[label]].append(r)
    rng = random.Random(seed)
    rest, test = [], []
    share = n_test / len(rows)
    for lab in sorted(by_label):
        group = by_label[lab][:]
        rng.shuffle(group)
        k = max(1, round(share * len(group)))
        test += group[:k]
        rest += group[k:]
    rng.shuffle(rest)
    return rest, test


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_lever(name: str, train_csv: Path, test_csv: Path, args, work: Path) -> dict:
    from tunekit import config_from_dict, evaluate, fine_tune

    common = {
        "model": args.model,
        "data": {
            "train": str(train_csv),
            "test": str(test_csv),
            "format": "classification",
            "columns": {"label": args.label_column, "text": args.text_column},
            "split": [1 - args.val_share, args.val_share, 0.0],
        },
        "train": {"max_length": 64, "seed": 42, "epochs": args.epochs},
        "eval": {"max_examples": None, "batch_size": 64, "few_shot": 0, "probe": "none"},
        "output_dir": str(work / name),
    }
    if args.max_steps:
        common["train"]["max_steps"] = args.max_steps
    cfg = config_from_dict(merge(common, LEVERS[name]))
    t0 = time.perf_counter()
    run_dir = fine_tune(cfg, quiet=True)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = evaluate(run_dir, quiet=True)
    t_eval = time.perf_counter() - t0
    fin = report["contenders"]["finetuned"]
    acc = fin.get("accuracy", fin.get("exact_match"))
    return {
        "lever": name,
        "task": report.get("task", cfg.task),
        "accuracy": acc,
        "ci": wilson(acc, report["n_test"]),
        "macro_f1": fin.get("macro_f1"),
        "train_s": t_train,
        "eval_s": t_eval,
    }


def wilson(p: float, n: int, z: float = 1.96) -> str:
    """The 95% Wilson interval of an accuracy p on n examples, as "[lo, hi]"."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return f"[{centre - half:.3f}, {centre + half:.3f}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "banking77" / "train.csv")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="category")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--levers", default=",".join(LEVERS))
    p.add_argument("--rows", type=int, default=0, help="train on this many rows (0: all but the held-out)")
    p.add_argument("--test", type=int, default=1000, help="held-out rows (stratified)")
    p.add_argument("--val-share", type=float, default=0.05)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0)
    args = p.parse_args()
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent (the shared data folder is not on this machine)")
        return 0
    with args.data.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    rest, test = stratified_holdout(rows, args.label_column, args.test, seed=7)
    if args.rows:
        rest = rest[: args.rows]
    print(f"{args.data}: {len(rows)} rows; training on {len(rest)}, held out {len(test)} (stratified)")
    results = []
    with tempfile.TemporaryDirectory(prefix="tk-levers-") as tmp:
        work = Path(tmp)
        train_csv = write_csv(work / "train.csv", rest, fields)
        test_csv = write_csv(work / "test.csv", test, fields)
        for name in args.levers.split(","):
            r = run_lever(name, train_csv, test_csv, args, work)
            results.append(r)
            print(
                f"{r['lever']:>14}  task {r['task']:<8}  accuracy {r['accuracy']:.3f} {r['ci']}  "
                f"macro-F1 {r['macro_f1'] or float('nan'):.3f}  train {r['train_s']:.0f}s  eval {r['eval_s']:.0f}s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
