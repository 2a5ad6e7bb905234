"""Memory and speed of each training method: full, LoRA, DoRA and QLoRA, on the same batches.

Run as: python bench/methods_memory.py [--steps 6] [--batch-size 4] [--max-length 192]
                                       [--methods full,lora,dora,qlora] [--threads N] [--model M]
                                       [--json OUT]

Fine-tunes the default model (SmolLM2-135M-Instruct) on the shipped demo tickets with each method
as tunekit builds it (`train/setup.py` build_model: LoRA/DoRA r16 alpha 32 on all linear layers,
dropout 0; QLoRA = the same LoRA on a 4-bit NF4 base with double quantization, fp32 compute), with
tunekit's loss (`accumulate_gradients`), AdamW and clipping at 1.0. Every method trains on the same
token batches in the same order. Each method runs in its own spawned process, so its peak RSS is
its own.

Measures per method: trainable and total parameters, RSS after the model is loaded and peak RSS of
the process (Linux ru_maxrss), non-padding tokens/s and seconds per step over the steps after the
first (the first pays one-off allocation), and the loss at the first and last step. On a CUDA
machine the methods train there as tunekit trains on CUDA (bf16 autocast; QLoRA's compute dtype
bf16), and torch's peak GPU allocation is reported too.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "tunekit" / "demo" / "data" / "tickets.jsonl"
METHODS = {  # name -> (config method, lora.use_dora)
    "full": ("full", False),
    "lora": ("lora", False),
    "dora": ("lora", True),
    "qlora": ("qlora", False),
}
LR = {"full": 5e-5, "lora": 1e-3, "dora": 1e-3, "qlora": 1e-3}


def _rss_mb() -> float:
    """Current resident set size, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_method(
    name: str, steps: int, batch_size: int, max_length: int, threads: int | None, model_name: str
) -> dict:
    """Train `steps` optimizer steps with one method in this (fresh) process; returns its figures."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from tunekit.config import config_from_dict
    from tunekit.data import load_examples
    from tunekit.data.tokenize import tokenize_example
    from tunekit.models import load_tokenizer, resolve_model
    from tunekit.train.batching import collate, length_grouped_batches
    from tunekit.train.recipes.sft import accumulate_gradients
    from tunekit.train.setup import build_model

    method, dora = METHODS[name]
    cfg = config_from_dict(
        {
            "model": model_name,
            "method": method,
            "data": {"train": str(DATA)},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "use_dora": dora},
            "train": {"seed": 42},
        }
    )
    path = resolve_model(cfg.model)
    tok = load_tokenizer(path)
    data = [tokenize_example(tok, ex, max_length) for ex in load_examples(DATA)]
    order = length_grouped_batches([len(t.input_ids) for t in data], batch_size, seed=42)[:steps]
    batches = [collate([data[i] for i in idx], tok.pad_token_id) for idx in order]

    torch.manual_seed(42)
    model, params = build_model(cfg, path)
    rss_loaded = _rss_mb()
    opt = torch.optim.AdamW(params, lr=LR[name])
    losses, times, tokens = [], [], []
    cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    for b in batches:
        t0 = time.perf_counter()
        losses.append(accumulate_gradients(model, [b]))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()  # the host clock then times the queued GPU work
        times.append(time.perf_counter() - t0)
        tokens.append(int(b["attention_mask"].sum()))
    timed = slice(1, None) if len(times) > 1 else slice(None)
    return {
        "method": name,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "tokens_per_s": sum(tokens[timed]) / sum(times[timed]),
        "s_per_step": sum(times[timed]) / len(times[timed]),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": len(batches),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | RSS after load | peak RSS | peak GPU | tokens/s | s/step | loss first -> last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = 100 * r["trainable_params"] / r["total_params"]
        lines.append(
            f"| {r['method']} | {r['trainable_params'] / 1e6:.2f}M ({share:.2f}%) "
            f"| {r['rss_after_load_mb'] / 1024:.2f} GB | {r['peak_rss_mb'] / 1024:.2f} GB "
            f"| {'-' if r['peak_gpu_mb'] is None else format(r['peak_gpu_mb'] / 1024, '.2f') + ' GB'} "
            f"| {r['tokens_per_s']:.0f} | {r['s_per_step']:.2f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias or local folder")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rows = []
    for name in args.methods.split(","):
        if name not in METHODS:
            ap.error(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)}")
        # One fresh process per method: ru_maxrss is a process-lifetime peak.
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            row = pool.submit(
                run_method, name, args.steps, args.batch_size, args.max_length, args.threads, args.model
            ).result()
        print(f"{name}: {row['tokens_per_s']:.0f} tokens/s, peak {row['peak_rss_mb']:.0f} MB", flush=True)
        rows.append(row)
    print(table(rows))
    if args.json:
        import os

        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "load_average_at_end": os.getloadavg(),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
