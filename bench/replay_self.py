"""Does `data.replay: self` keep the default recipe from forgetting? The quickstart recipe (LoRA on the
demo tickets, 2 epochs) with and without self-replay; for each: the task's exact match, the builtin
forgetting probe and an MMLU slice (base vs fine-tuned, with the probe's paired test).

Run as: .venv/bin/python bench/replay_self.py [--arms none,self] [--ratio 0.1] [--out runs/replay-self]
        [--max-examples 40] [--mmlu ../shared/data/mmlu/dev] [--data banking77]
Each arm writes OUT/ARM/bench.json as it finishes (so arms can run separately); the table is printed
from every arm found under OUT.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

from tunekit.config import config_from_dict
from tunekit.demo.quickstart import quickstart_config
from tunekit.eval.evaluate import evaluate_generation
from tunekit.train.session import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PARTS = ("multiple_choice", "open_exact_match", "open_contains")


def banking77_chat(out: Path, n: int, seed: int = 0) -> Path:
    """A seeded slice of Banking77's train.csv as chat rows (query -> intent name): classification as
    generation."""
    with (SHARED / "banking77" / "train.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    random.Random(seed).shuffle(rows)
    path = out / "banking77_chat.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows[:n]:
            msgs = [
                {"role": "user", "content": f"Which banking intent is this query? {r['text']}"},
                {"role": "assistant", "content": r["category"]},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def arm_config(arm: str, out: Path, a: argparse.Namespace):
    replay = {"none": None, "self": {"source": "self", "ratio": a.ratio}}[arm]
    overrides = [
        f"eval.max_examples={a.max_examples}",
        "eval.few_shot=0",
        "eval.probe=builtin",
        f"eval.probe_max_questions={a.probe_questions}",
    ]
    overrides += [f"train.max_steps={a.steps}"] if a.steps else []
    if a.data == "tickets":
        cfg = quickstart_config(out / arm, overrides)
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"replay": replay})})
    raw = {
        "model": "smollm2-135m-instruct",
        "data": {"train": str(banking77_chat(out, a.banking_rows)), "format": "chat", "replay": replay},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"epochs": 1, "learning_rate": 1.0e-3, "batch_size": 8, "max_length": 128, "seed": 42},
        "output_dir": str(out / arm),
    }
    return config_from_dict(raw, overrides, source="bench")


def probe_parts(report: dict) -> dict:
    parts = report["forgetting"]["parts"]
    keys = ("n", "base", "finetuned", "drop", "drop_ci_low", "drop_ci_high", "p_value", "significant")
    return {k: {x: p[x] for x in keys} for k, p in parts.items()}


def run_arm(arm: str, out: Path, a: argparse.Namespace) -> dict:
    cfg = arm_config(arm, out, a)
    t0 = time.perf_counter()
    run_dir = train(cfg, overwrite=True)
    t_train = time.perf_counter() - t0
    summary = json.loads((run_dir / "train_summary.json").read_text())
    t1 = time.perf_counter()
    report = evaluate_generation(run_dir, quiet=True)
    result = {
        "arm": arm,
        "data": a.data,
        "ratio": a.ratio if arm == "self" else 0.0,
        "train_seconds": t_train,
        "steps": summary.get("steps"),
        "replay_examples": summary.get("replay_examples", 0),
        "train_examples": summary.get("train_examples"),
        "n_test": report["n_test"],
        "task_metric": report["task_metric"],
        "base_task": report["contenders"]["base"][report["task_metric"]],
        "finetuned_task": report["contenders"]["finetuned"][report["task_metric"]],
        "finetuned_task_ci": [
            report["contenders"]["finetuned"].get(f"{report['task_metric']}_ci_low"),
            report["contenders"]["finetuned"].get(f"{report['task_metric']}_ci_high"),
        ],
        "test_loss": report["contenders"]["finetuned"]["test_loss"],
        "builtin_probe": probe_parts(report),
        "open_examples": report["forgetting"]["open_examples"][:5],
    }
    if a.mmlu:
        # The same run, probed on an MMLU slice; the task eval reruns on a 1-row file to keep it cheap.
        one = out / "one_test_row.jsonl"
        one.write_text((run_dir / "data" / "test.jsonl").read_text().splitlines()[0] + "\n")
        mmlu = evaluate_generation(run_dir, data=one, quiet=True, probe=a.mmlu)
        result["mmlu_probe"] = probe_parts(mmlu)
        result["mmlu_source"] = a.mmlu
    result["eval_seconds"] = time.perf_counter() - t1
    (out / arm / "bench.json").write_text(json.dumps(result, indent=2))
    return result


def fmt_part(p: dict) -> str:
    sig = "significant" if p["significant"] else "n.s."
    return (
        f"{p['base']:.3f} -> {p['finetuned']:.3f} (drop {p['drop']:+.3f} "
        f"[{p['drop_ci_low']:+.3f}, {p['drop_ci_high']:+.3f}], p={p['p_value']:.3f}, {sig})"
    )


def print_table(out: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/bench.json"))]
    print("| arm | replay ex. | task metric (base -> ft) | builtin MC | builtin open EM | open contains "
          "| MMLU slice MC | train s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        b, m = r["builtin_probe"], r.get("mmlu_probe", {})
        cells = [
            f"{r['arm']} ({r['data']}, ratio {r['ratio']})",
            str(r["replay_examples"]),
            f"{r['task_metric']} {r['base_task']:.3f} -> {r['finetuned_task']:.3f} (n={r['n_test']})",
            *(fmt_part(b[k]) if k in b else "-" for k in PARTS),
            fmt_part(m["multiple_choice"]) if "multiple_choice" in m else "-",
            f"{r['train_seconds']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default="none,self")
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--data", choices=("tickets", "banking77"), default="tickets")
    ap.add_argument("--banking-rows", type=int, default=800)
    ap.add_argument("--max-examples", type=int, default=40)
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the recipe's)")
    ap.add_argument("--probe-questions", type=int, default=100, help="eval.probe_max_questions")
    ap.add_argument("--mmlu", default=str(SHARED / "mmlu" / "dev"))
    ap.add_argument("--out", type=Path, default=Path("runs/replay-self"))
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    if not a.table_only:
        for arm in a.arms.split(","):
            run_arm(arm, a.out, a)
    print_table(a.out)


if __name__ == "__main__":
    main()
