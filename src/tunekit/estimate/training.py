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
from tunekit.errors import ConfigError, TunekitError
from tunekit.tasks import check_config as check_task_config
from tunekit.tasks import get_task
from tunekit.train.batching import collate


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def measure_throughput(cfg: Config, lengths: list[int], steps: int = 3) -> dict:
    """Run `steps` timed optimizer steps (after one warm-up) at the config's batch size and the
    data's median length; returns tokens/s, seconds/step and peak memory."""
    from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample
    from tunekit.models import load_tokenizer, resolve_model
    from tunekit.train.recipes.sft import accumulate_gradients
    from tunekit.train.setup import build_model

    path = resolve_model(cfg.model)
    tok = load_tokenizer(path, cfg.chat_template)
    model, _ = build_model(cfg, path, tokenizer=tok)
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
        accumulate_gradients(model, [batch], cfg.train.loss_chunk_tokens)
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


# ---- `tunekit estimate`: predicted peak memory and time, before training -------------------------------


def estimate_checked(cfg: Config, report, price_per_hour: float | None = None) -> dict | None:
    """`tunekit data check --config C --estimate`: the time and memory of training on the rows the
    check read (`report`, a data.check.CheckReport); None when the train file has no rows."""
    if not report.files[0].examples:
        return None
    d = cfg.data
    train_split = d.split[0] if d.validation is None or d.test is None else 1.0
    lengths = report.token_lengths[: len(report.files[0].examples)]  # the train file comes first
    # The training split is a share of the train file when validation/test are split off it.
    lengths = lengths[: max(1, int(len(lengths) * train_split))]
    return estimate_training(cfg, lengths, price_per_hour)


def data_profile(cfg: Config) -> dict:
    """Token lengths and the share of positions carrying loss, from the config's train file: its
    examples as training tokenizes them, or for raw text (task: pretrain) the packed rows it trains on."""
    from tunekit.data import load_examples
    from tunekit.data.packing import document_text, pack_documents
    from tunekit.data.tokenize import TokenizedExample, tokenize_example
    from tunekit.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(cfg.model), cfg.chat_template)
    examples = load_examples(cfg.data.train, format=cfg.data.format, columns=cfg.data.columns or None)
    if get_task(cfg.task).data == "documents":
        texts = [t for ex in examples if (t := document_text(ex)) is not None]
        packed, _ = pack_documents(tok, texts, cfg.train.max_length)
        rows = [TokenizedExample(r.input_ids, r.labels) for r in packed]
    else:
        rows = [tokenize_example(tok, ex, cfg.train.max_length) for ex in examples]
    lengths = [len(r.input_ids) for r in rows]
    tokens = sum(lengths)
    return {
        "examples": len(rows),
        "lengths": lengths,
        "max_tokens": max(lengths, default=0),
        "target_fraction": sum(r.n_loss_tokens for r in rows) / max(1, tokens),
    }


def training_tokens(cfg: Config, lengths: list[int]) -> float:
    """Tokens the run trains on: epochs over the data, or max_steps x batch x grad_accum examples."""
    per_epoch = sum(lengths)
    tc = cfg.train
    if tc.max_steps:
        return per_epoch * tc.max_steps * tc.batch_size * tc.grad_accum / max(1, len(lengths))
    return per_epoch * tc.epochs


def estimate_report(
    cfg: Config,
    *,
    model_size: str | None = None,
    compare_sizes: bool = False,
    measure: bool = True,
    dtype: str | None = None,
    checkpointing: bool = False,
    seq_len: int | None = None,
    nproc: int = 1,
) -> dict:
    """Everything `tunekit estimate` shows: the memory breakdown of the config's run (or of a
    reference size), GPU fits and FLOPs-based times, and, for the config's own model, real steps here.

    The peak is set by the longest batch: batch_size x the longest example (at most max_length).
    nproc: the processes (GPUs) the run is launched on (`tunekit train --nproc N`). With
    `distributed.strategy: fsdp` each one holds 1/N of the weights, gradients and optimizer states
    (plus the units gathered at a time); with ddp each holds everything. The memory figures are per
    process; the GPU times assume the tokens are split evenly over the N GPUs.
    """
    from tunekit.estimate import memory as mem

    tc = cfg.train
    if nproc < 1:
        raise TunekitError(f"--nproc {nproc}: need at least 1 process")
    if problems := check_task_config(cfg):  # the task's own rules, as `tunekit train` applies them
        raise ConfigError(problems)
    shards = nproc if cfg.distributed.strategy == "fsdp" else 1
    # The --gradient-checkpointing flag means every layer; otherwise what the config says.
    checkpointing = 1 if checkpointing else tc.checkpoint_every
    try:
        profile = data_profile(cfg)
    except (OSError, TunekitError):
        profile = None  # no readable data: fall back to max_length and an all-target worst case
    longest = seq_len or (min(tc.max_length, profile["max_tokens"]) if profile else tc.max_length)
    frac = profile["target_fraction"] if profile else 1.0
    tokens = training_tokens(cfg, profile["lengths"]) if profile else None
    shape = mem.reference_shape(model_size) if model_size else mem.shape_from_model(cfg.model)
    lora = {
        "lora_r": cfg.lora.r,
        "target_modules": cfg.lora.target_modules,
        "lora_dropout": cfg.lora.dropout,
        "dora": cfg.lora.use_dora,
        # Under train.compile inductor's partitioner recomputes what lean activations would and more
        # (measured 10-21% below lean's peak, BENCHMARKS.md): predict lean's figure, an upper bound.
        "lean": cfg.train.lean_activations or cfg.train.compile,
        "loss_chunk": cfg.train.loss_chunk_tokens if get_task(cfg.task).loss_chunked else None,
    }

    def predict(s, method, dt, device):
        return mem.estimate_memory(
            s,
            method,
            tc.batch_size,
            longest,
            dtype=dt,
            target_fraction=frac,
            checkpointing=checkpointing,
            device=device,
            shards=shards,
            **lora,
        )

    here = predict(shape, cfg.method, dtype or "fp32", "cpu")
    gpu_dtype = dtype or "bf16"
    on_gpu = predict(shape, cfg.method, gpu_dtype, "gpu")
    report = {
        "model": shape.name,
        "method": cfg.method,
        "batch_size": tc.batch_size,
        "seq_len": longest,
        "target_fraction": frac,
        "training_tokens": tokens,
        "processes": nproc,
        "strategy": cfg.distributed.strategy if nproc > 1 else "one process",
        "here": here.as_dict(),
        "gpus": [
            {
                "gpu": name,
                "dtype": gpu_dtype,
                "peak_gb": on_gpu.total / mem.GB,
                "fits": on_gpu.fits(g["memory_gb"]),
                "seconds_assumed": (
                    mem.gpu_seconds(shape, cfg.method, tokens, g["bf16_tflops"]) / nproc if tokens else None
                ),
            }
            for name, g in mem.GPUS.items()
        ],
        "assumptions": (
            f"GPU times: {'6N' if cfg.method == 'full' else '4N'} FLOPs a token at the GPU's stated dense "
            f"bf16 peak and an assumed {mem.ASSUMED_MFU:.0%} MFU, not measured; GPU memory in {gpu_dtype} "
            f"with {mem.RUNTIME_MB['gpu']} MB for the CUDA context."
            + (
                f" Per GPU of {nproc} ({report_strategy(cfg, nproc)}); time split evenly over them, "
                "communication not counted."
                if nproc > 1
                else ""
            )
        ),
    }
    if measure and not model_size:
        m = measure_throughput(cfg, profile["lengths"] if profile else [longest])
        report["measured"] = m
        if tokens:
            report["measured"]["estimated_seconds"] = tokens / m["measured_tokens_per_s"]
    if compare_sizes:
        rows = []
        sizes = (
            [("config model", mem.shape_from_model(cfg.model))] if model_size else [("config model", shape)]
        )
        sizes += [(k, mem.reference_shape(k)) for k in mem.REFERENCE_CONFIGS]
        for label, s in sizes:
            for method in ("full", "lora", "qlora"):
                e = predict(s, method, gpu_dtype, "gpu")
                rows.append(
                    {
                        "size": label if label != "config model" else s.name,
                        "params_b": s.params / 1e9,
                        "method": method,
                        "peak_gb": e.total / mem.GB,
                        "parts_gb": {k: v / mem.GB for k, v in e.parts.items()},
                        "fits": {name: e.fits(g["memory_gb"]) for name, g in mem.GPUS.items()},
                    }
                )
        report["compare_sizes"] = rows
    return report


def report_strategy(cfg: Config, nproc: int) -> str:
    if cfg.distributed.strategy == "fsdp":
        return f"fsdp: weights, gradients and optimizer states sharded 1/{nproc}"
    return f"{cfg.distributed.strategy}: every GPU holds the whole model"


def print_estimate(report: dict) -> None:
    """The estimate as tables: the breakdown here, GPU fits, and the size comparison if asked."""
    from rich.table import Table

    from tunekit.console import out
    from tunekit.estimate.memory import human_seconds

    h = report["here"]
    share = h["trainable_params"] / h["total_params"]
    if report.get("processes", 1) > 1:
        out.print(
            f"{report['processes']} processes, distributed.strategy {report['strategy']}: memory is per process"
        )
    out.print(
        f"[bold]{report['model']}[/] ({h['total_params'] / 1e6:,.1f}M parameters), method {report['method']}, "
        f"{h['trainable_params'] / 1e6:,.2f}M trainable ({share:.2%}); longest batch {report['batch_size']} x "
        f"{report['seq_len']} tokens, {report['target_fraction']:.0%} of positions carry loss; "
        f"{_checkpointing_words(h['gradient_checkpointing'])}"
    )
    t = Table(title=f"Predicted peak memory on this machine ({h['dtype']}, CPU)")
    t.add_column("component")
    t.add_column("MB", justify="right")
    t.add_column("share", justify="right")
    for k, v in h["parts_mb"].items():
        t.add_row(k.replace("_", " "), f"{v:,.0f}", f"{v / h['peak_mb']:.0%}")
    t.add_row("[bold]peak", f"[bold]{h['peak_mb']:,.0f}", "100%")
    out.print(t)
    if "adapter_weights" in h["parts_mb"]:
        p = h["parts_mb"]
        adapter = p["adapter_weights"] + p["gradients"] + p["optimizer_states"]
        out.print(f"the adapter's share (weights, gradients, AdamW states): {adapter:,.0f} MB")
    m = report.get("measured")
    if m:
        line = (
            f"measured here ({m['measured_at']['steps']} real steps of {m['measured_at']['batch_size']} x "
            f"{m['measured_at']['length']} tokens): {m['measured_tokens_per_s']:.0f} tokens/s, "
            f"process peak {m['peak_memory_mb']:,.0f} MB"
        )
        if m.get("estimated_seconds"):
            line += (
                f"; training {report['training_tokens']:,.0f} tokens: {human_seconds(m['estimated_seconds'])}"
            )
        out.print(line)
    g = Table(title="On a GPU (an assumption, not measured)")
    for c in ("GPU", "dtype", "peak GB", "fits", "time"):
        g.add_column(c, justify="left" if c in ("GPU", "dtype", "fits") else "right")
    for r in report["gpus"]:
        secs = r["seconds_assumed"]
        g.add_row(
            r["gpu"],
            r["dtype"],
            f"{r['peak_gb']:.1f}",
            "yes" if r["fits"] else "[red]no",
            human_seconds(secs) if secs is not None else "-",
        )
    out.print(g)
    out.print(f"[dim]{report['assumptions']}")
    if report.get("compare_sizes"):
        rows = report["compare_sizes"]
        gpus = list(dict.fromkeys(g.split(" ")[0] for g in rows[0]["fits"]))  # one column per memory size
        c = Table(
            title=f"Peak GB by model size and method (GPU, {report['gpus'][0]['dtype']}, batch "
            f"{report['batch_size']} x {report['seq_len']} tokens; sizes are llama-class reference configs)"
        )
        for col in (
            "model",
            "params",
            "method",
            "weights",
            "grads+optim",
            "activations",
            "logits",
            "peak GB",
        ):
            c.add_column(col, justify="left" if col in ("model", "method") else "right")
        for gpu in gpus:
            c.add_column(gpu, justify="center")
        for r in rows:
            p = r["parts_gb"]
            weights = p["weights"] + p.get("adapter_weights", 0)
            c.add_row(
                r["size"],
                f"{r['params_b']:.2f}B",
                r["method"],
                f"{weights:.1f}",
                f"{p['gradients'] + p['optimizer_states']:.1f}",
                f"{p['activations']:.1f}",
                f"{p['logits']:.1f}",
                f"{r['peak_gb']:.1f}",
                *(
                    "yes" if r["fits"][next(g for g in r["fits"] if g.startswith(gpu))] else "[red]no"
                    for gpu in gpus
                ),
            )
        out.print(c)


def _checkpointing_words(every: int) -> str:
    if not every:
        return "no gradient checkpointing"
    return "gradient checkpointing" + ("" if every == 1 else f" of 1 decoder layer in {every}")
