"""`tunekit serve` under concurrent load: batched decoding against one request at a time.

Run as: python bench/serve_batching.py [--requests 32] [--clients 8] [--max-tokens 48] [--json OUT]

The default model with two LoRA adapters on it (rank 8 on every projection, small random weights, so
each adapter answers a little differently: what serving two fine-tunes of one base looks like),
served by the real server (uvicorn on loopback) and driven by the official `openai` client:

  one_at_a_time  the requests sent one after another by one client (each reply decoded alone)
  concurrent     the same requests from `--clients` clients at once, each sending its share in
                 turn; the server batches what arrives together, both adapters in one batch

Prompts are the demo tickets (shipped in the package), alternating between the two adapters
(`--adapters 1`: all to one);
greedy, max_tokens bounded, so both runs decode the same replies (the script counts how many are
identical). Throughput is completion tokens per second of wall time (usage.completion_tokens);
latency is each request's time from send to its whole reply.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def served_models():
    import torch
    from peft import LoraConfig, get_peft_model

    from tunekit.models import load_model, load_tokenizer, resolve_model
    from tunekit.ship.api import Served

    path = resolve_model(MODEL)
    tokenizer, model = load_tokenizer(path), load_model(path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    peft = get_peft_model(model, lora, adapter_name="north")
    peft.add_adapter("south", lora)
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    peft.eval()
    return {name: Served(name, path, peft, tokenizer, name, 0) for name in ("north", "south")}


def prompts(n: int) -> list[list[dict]]:
    import importlib.resources

    rows = importlib.resources.files("tunekit.demo").joinpath("data/tickets.jsonl").read_text().splitlines()
    return [[m for m in json.loads(r)["messages"] if m["role"] != "assistant"] for r in rows[:n]]


class Server:
    """The app on a real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def run(base_url: str, jobs: list[tuple[str, list[dict]]], clients: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    def one(job):
        model, messages = job
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0
        )
        return r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - t0

    shares = [jobs[i::clients] for i in range(clients)]  # each client sends its share in turn
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda share: [one(job) for job in share], shares))
    wall = time.perf_counter() - t0
    # back in the jobs' order
    results = [None] * len(jobs)
    for i, share in enumerate(done):
        for k, result in enumerate(share):
            results[i + k * clients] = result
    tokens = sum(r[1] for r in results)
    latencies = sorted(r[2] for r in results)
    return {
        "clients": clients,
        "requests": len(jobs),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "latency_mean_s": statistics.mean(latencies),
        "latency_p50_s": latencies[len(latencies) // 2],
        "latency_p90_s": latencies[int(0.9 * (len(latencies) - 1))],
        "replies": [r[0] for r in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    ap.add_argument("--adapters", type=int, choices=(1, 2), default=2, help="1: every request to one adapter")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import torch

    from tunekit.ship.serve import create_app

    served = served_models()
    app = create_app(served, max_batch=a.max_batch)
    messages = prompts(a.requests)
    jobs = [("north" if i % a.adapters == 0 else "south", m) for i, m in enumerate(messages)]
    with Server(app) as base_url:
        run(base_url, jobs[:2], 2, 4)  # warm up: first-call allocation, kernel selection
        lone = run(base_url, jobs, 1, a.max_tokens)
        waves = app.state.batchers[served["north"].model].waves
        before = len(waves)
        together = run(base_url, jobs, a.clients, a.max_tokens)
    waves = waves[before:]  # the concurrent run's
    same = sum(x == y for x, y in zip(lone.pop("replies"), together.pop("replies"), strict=True))
    res = {
        "model": MODEL,
        "adapters": a.adapters,
        "max_tokens": a.max_tokens,
        "max_batch": a.max_batch,
        "threads": torch.get_num_threads(),
        "one_at_a_time": lone,
        "concurrent": together,
        "speedup": together["tokens_per_s"] / lone["tokens_per_s"],
        "identical_replies": same,
        "waves": len(waves),
        "mean_wave": statistics.mean(waves),
    }
    for k in ("one_at_a_time", "concurrent"):
        r = res[k]
        print(
            f"{k:<14} {r['clients']} client(s) {r['requests']} requests {r['tokens']:>5} tokens "
            f"{r['seconds']:>6.1f} s {r['tokens_per_s']:>6.1f} tokens/s  latency mean "
            f"{r['latency_mean_s']:.2f} s p50 {r['latency_p50_s']:.2f} s p90 {r['latency_p90_s']:.2f} s"
        )
    print(
        f"concurrent / one at a time: {res['speedup']:.2f}x throughput; identical replies "
        f"{same}/{a.requests}; mean batch in the concurrent run {res['mean_wave']:.1f}"
    )
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
