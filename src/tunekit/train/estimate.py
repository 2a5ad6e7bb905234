"""Training time and memory, measured rather than guessed.

We build the model exactly as the config would train it (LoRA included), run a few real optimizer
steps on batches of the data's median length, and time them. Throughput then scales to the whole
run: time = training tokens / measured tokens per second. Peak memory is the process's measured
peak resident set during those steps.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from tunekit.config import Config
from tunekit.train.batching import collate


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def measure_throughput(cfg: Config, lengths: list[int], steps: int = 3) -> dict:
    """Run `steps` timed optimizer steps (after one warm-up) at the config's batch size and the
    data's median length; returns tokens/s, seconds/step and peak memory."""
    from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample
    from tunekit.models import load_tokenizer, resolve_model
    from tunekit.train.setup import build_model
    from tunekit.train.sft import accumulate_gradients

    path = resolve_model(cfg.model)
    tok = load_tokenizer(path)
    model, _ = build_model(cfg, path)
    n = max(8, min(cfg.train.max_length, int(statistics.median(lengths)) if lengths else 128))
    # Half prompt, half target: the loss projection then costs what a typical SFT row costs.
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(cfg.train.batch_size):
        ids = torch.randint(3, len(tok), (n,), generator=g).tolist()
        rows.append(TokenizedExample(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    batch = collate(rows, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        accumulate_gradients(model, [batch])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step pays one-off allocation costs
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "measured_tokens_per_s": n * cfg.train.batch_size / step_s,
        "measured_seconds_per_micro_batch": step_s,
        "measured_at": {"batch_size": cfg.train.batch_size, "length": n, "steps": steps},
        "peak_memory_mb": _peak_rss_mb(),
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }


def estimate_training(cfg: Config, lengths: list[int], price_per_hour: float | None = None) -> dict:
    """Measured throughput scaled to the run the config describes (epochs or max_steps)."""
    m = measure_throughput(cfg, lengths)
    per_epoch = sum(min(n, cfg.train.max_length) for n in lengths)
    tc = cfg.train
    if tc.max_steps:
        n_examples = tc.max_steps * tc.batch_size * tc.grad_accum
        tokens = per_epoch * n_examples / max(1, len(lengths))
    else:
        tokens = per_epoch * tc.epochs
    seconds = tokens / m["measured_tokens_per_s"]
    out = m | {
        "training_tokens": int(tokens),
        "estimated_seconds": seconds,
        "estimated_hours": seconds / 3600,
    }
    if price_per_hour is not None:
        out["price_per_hour"] = price_per_hour
        out["estimated_cost"] = seconds / 3600 * price_per_hour
    return out
