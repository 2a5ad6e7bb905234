"""How long the `tunekit` command takes to start: `--help` and `data check FILE`, before and after.

Run as: python bench/cli_startup.py --before-src /tmp/tk-before/src [--after-src src] [--runs 7]

"Before" and "after" are two source trees (e.g. a `git worktree add /tmp/tk-before COMMIT` of an
older commit, and this checkout's src/), both run with this Python (`PYTHONPATH=SRC python -m
tunekit ...`), so only the code differs. Each command runs once to warm the disk cache, then RUNS
times; prints the median wall time of each, the ratio before/after, and which heavy libraries
(torch, transformers, ...) each command imported. `data check` reads a small chat JSONL written to
a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "accelerate")

# Runs the CLI in-process, then prints the heavy libraries it imported (on stderr, last line).
PROBE = f"""
import sys
sys.argv = ["tunekit", *sys.argv[1:]]
try:
    import tunekit.cli
    tunekit.cli.main()
except SystemExit:
    pass
finally:
    import json
    print("HEAVY", json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)
"""


def small_jsonl(folder: Path, n: int = 20) -> Path:
    path = folder / "small.jsonl"
    with path.open("w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"Where is my card number {i}? It has not arrived yet."},
                {"role": "assistant", "content": f"Card {i} ships within 5 working days."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def env_for(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src.resolve()), "COLUMNS": "100"}


def check_source(src: Path) -> None:
    """The tree actually imported under PYTHONPATH=src is `src` (not the installed package)."""
    got = subprocess.run(
        [sys.executable, "-c", "import tunekit; print(tunekit.__file__)"],
        env=env_for(src),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(got).resolve().is_relative_to(src.resolve()):
        sys.exit(f"PYTHONPATH={src} imports tunekit from {got}, not from {src}")


def time_command(src: Path, args: list[str], runs: int) -> float:
    cmd = [sys.executable, "-m", "tunekit", *args]
    env = env_for(src)
    subprocess.run(cmd, env=env, capture_output=True)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def heavy_modules(src: Path, args: list[str]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=env_for(src), capture_output=True, text=True
    )
    last = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY ")]
    return json.loads(last[-1][len("HEAVY ") :]) if last else ["?"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before-src", type=Path, required=True, help="src/ folder of the old tree")
    p.add_argument(
        "--after-src",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "src",
        help="src/ folder of the new tree",
    )
    p.add_argument("--runs", type=int, default=7, help="timed runs per command (after one warm-up)")
    a = p.parse_args()
    for src in (a.before_src, a.after_src):
        check_source(src)

    with tempfile.TemporaryDirectory() as tmp:
        data = small_jsonl(Path(tmp))
        commands = {
            "tunekit --help": ["--help"],
            "tunekit data check small.jsonl": ["data", "check", str(data)],
        }
        print(f"python {sys.version.split()[0]}, {a.runs} runs each after one warm-up, median wall time")
        print(f"before: {a.before_src}\nafter:  {a.after_src}\n")
        print(f"{'command':32} {'before':>8} {'after':>8} {'ratio':>6}  heavy imports before / after")
        for name, args in commands.items():
            before = time_command(a.before_src, args, a.runs)
            after = time_command(a.after_src, args, a.runs)
            heavy = f"{heavy_modules(a.before_src, args)} / {heavy_modules(a.after_src, args)}"
            print(f"{name:32} {before:7.2f}s {after:7.2f}s {before / after:5.1f}x  {heavy}")


if __name__ == "__main__":
    main()
