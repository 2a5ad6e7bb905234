"""Does replay reduce forgetting? Two short LoRA runs of the default model on the demo tickets, one
with `data.replay` (general alpaca data), and the forgetting probe on both.

Run as: .venv/bin/python bench/replay_forgetting.py [--steps 40] [--ratio 0.25] [--out runs/replay-bench]
Writes OUT/replay_forgetting.json and prints the figures the README quotes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tunekit.config import config_from_dict
from tunekit.demo.quickstart import demo_data_path
from tunekit.eval.evaluate import evaluate_generation
from tunekit.train.session import train

REPLAY = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory-demo" / "alpaca_en_demo.json"


def run(name: str, out: Path, steps: int, replay: dict | None) -> dict:
    cfg = config_from_dict(
        {
            "model": "smollm2-135m-instruct",
            "data": {"train": str(demo_data_path()), "format": "chat", "replay": replay},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            # A high learning rate on purpose: forgetting shows within a short run.
            "train": {"max_steps": steps, "learning_rate": 2e-3, "batch_size": 8, "max_length": 256},
            "eval": {"max_examples": 40, "few_shot": 0, "probe": "builtin"},
            "output_dir": str(out / name),
        }
    )
    t0 = time.perf_counter()
    run_dir = train(cfg, quiet=True, overwrite=True)  # a rerun replaces the last one
    report = evaluate_generation(run_dir, quiet=True)
    parts = report["forgetting"]["parts"]
    return {
        "seconds": time.perf_counter() - t0,
        "task_exact_match": report["contenders"]["finetuned"]["exact_match"],
        "probe": {
            k: {x: p[x] for x in ("base", "finetuned", "drop", "drop_ci_low", "drop_ci_high", "p_value")}
            for k, p in parts.items()
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--out", type=Path, default=Path("runs/replay-bench"))
    a = ap.parse_args()
    results = {
        "steps": a.steps,
        "ratio": a.ratio,
        "without_replay": run("no-replay", a.out, a.steps, None),
        "with_replay": run("replay", a.out, a.steps, {"path": str(REPLAY), "ratio": a.ratio}),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "replay_forgetting.json").write_text(json.dumps(results, indent=2))
    for name in ("without_replay", "with_replay"):
        r = results[name]
        probe = ", ".join(
            f"{k} drop {p['drop']:+.3f} [{p['drop_ci_low']:+.3f}, {p['drop_ci_high']:+.3f}]"
            for k, p in r["probe"].items()
        )
        print(f"{name}: task exact match {r['task_exact_match']:.3f}; {probe}; {r['seconds']:.0f}s")


if __name__ == "__main__":
    main()
