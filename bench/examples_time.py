"""Wall time and peak memory of each example config, trained and evaluated as a user runs it.

Run as: python bench/examples_time.py [--only NAME,NAME] [--out runs/examples-time] [--json OUT]

For every examples/*.yaml (not examples/scale/, which needs machines we lack): `tunekit train
examples/NAME.yaml` then `tunekit eval RUN_DIR`, each in a fresh process under GNU time, at full
length (no overrides but output_dir). Prints and writes per example: train and eval wall seconds,
peak RSS of each process, optimizer steps and the machine's load average while it ran, because the
shared 2-core dev machine is rarely idle and a figure without its load is misleading. The example
headers quote these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str]) -> dict:
    """Run `python -m tunekit ARGS` under /usr/bin/time -v: wall seconds, peak RSS, exit status."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "tunekit", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
        "returncode": proc.returncode,
        "load_avg_1m": round((load0 + os.getloadavg()[0]) / 2, 2),  # mean of start and end
        "tail": proc.stderr[-1500:] if proc.returncode else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated example names (default: all)")
    ap.add_argument("--out", type=Path, default=Path("runs/examples-time"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    names = sorted(p.stem for p in (ROOT / "examples").glob("*.yaml"))
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    results = {}
    for name in names:
        run_dir = (a.out / name).resolve()
        train = timed(["train", f"examples/{name}.yaml", "--set", f"output_dir={run_dir}", "--overwrite"])
        ev = timed(["eval", str(run_dir)]) if train["returncode"] == 0 else None
        summary_path = run_dir / "train_summary.json"
        steps = json.loads(summary_path.read_text()).get("steps") if summary_path.is_file() else None
        results[name] = {"train": train, "eval": ev, "steps": steps}
        e = ev or {}
        print(
            f"{name:22s} train {train['seconds']:7.1f} s ({train['peak_rss_mb']} MB, load {train['load_avg_1m']}, "
            f"{steps} steps, rc {train['returncode']})  eval {e.get('seconds', '-')} s "
            f"({e.get('peak_rss_mb', '-')} MB, rc {e.get('returncode', '-')})",
            flush=True,
        )
        if a.json:
            a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
