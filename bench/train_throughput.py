"""Training throughput of tunekit's loop against TRL's SFTTrainer, on identical token sequences.

Run as: python bench/train_throughput.py [--data banking77|alpaca] [--steps 20] [--batch-size 8] [--full]
                                         [--examples N] [--runs tunekit,trl_default,trl_best] [--threads N]
                                         [--repeats N] [--model M] [--data-dir DIR] [--json OUT]

Fine-tunes the default model (SmolLM2-135M-Instruct, fp32) with LoRA r16 alpha 32 on all linear layers
(or every weight with --full) on real examples from ../shared/data, for the same optimizer steps, three
ways, each in a fresh model instance in its own spawned process (so peak RSS is per run):

  tunekit      tunekit's own loop pieces with its defaults: `collate`, `accumulate_gradients` (loss projected
               onto the vocabulary only at target positions, 256 of them at a time), lean activations,
               AdamW, `lr_at`; LoRA dropout 0.0 as in the quickstart.
  trl_default  TRL `SFTTrainer` + PEFT `LoraConfig` with TRL's defaults, except bf16=False and
               use_cpu=True (needed on this CPU) and LoRA dropout 0.05 (what PEFT users usually set).
  trl_best     TRL with the settings that are fastest here: no gradient checkpointing, LoRA dropout 0.

Optional extra runs (name them in --runs): `trl_padding_free` (trl_best + padding_free=True) and
`trl_std_loss` (trl_best with TRL's chunked log-prob loss replaced, by a subclass, by the standard
transformers loss: TRL 1.16 has no setting for that).

Every run trains on the same batches in the same order: the examples are tokenized once with tunekit's
`tokenize_example` (chat template, loss on assistant tokens only), grouped into batches with tunekit's
`length_grouped_batches`, and TRL gets that order as a pre-tokenized `input_ids` + `labels` dataset read
sequentially. Learning rate 2e-4, cosine decay, no warmup, clipping at 1.0, weight decay 0, in all runs.

Measures per run: non-padding tokens/s and examples/s over the training steps after the first (step
wall time, data collation and logging included), peak RSS, the loss at each step and the final loss
(mean of the last 3), model-FLOPs utilisation against the machine's fp32 matmul peak, and the ratio of
each figure to tunekit's.

On a CUDA machine every run trains there in mixed precision (fp32 weights, bf16 autocast: tunekit's
default on CUDA, and TRL with bf16=True); peak memory is then torch's peak GPU allocation, the matmul
peak a bf16 one, and step times are taken after a device synchronize.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import platform
import random
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

MODEL = "smollm2-135m-instruct"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# name -> (file under ../shared/data, tunekit format, column renames)
DATASETS = {
    "banking77": ("banking77/train.csv", "classification", {"label": "category"}),
    "alpaca": ("llamafactory-demo/alpaca_en_demo.json", "alpaca", None),
}
LEARNING_RATE = 2e-4
LORA_R, LORA_ALPHA = 16, 32
MAX_LENGTH = 512  # tunekit's default train.max_length; TRL gets the same so it cuts nothing more
MAX_GRAD_NORM = 1.0
SEED = 42

# Each run's settings; "loop" picks the trainer. Anything not named here is the library's default.
RUNS = {
    # tunekit's defaults (train.lean_activations, train.loss_chunk_tokens: 256); until 2026-11-23
    # (session 7) the loss was computed whole by default, and this run was then named "tunekit".
    "tunekit": {"loop": "tunekit", "lora_dropout": 0.0},
    "trl_default": {"loop": "trl", "lora_dropout": 0.05, "gradient_checkpointing": True},
    "trl_best": {"loop": "trl", "lora_dropout": 0.0, "gradient_checkpointing": False},
    "trl_padding_free": {
        "loop": "trl",
        "lora_dropout": 0.0,
        "gradient_checkpointing": False,
        "padding_free": True,
    },
    "trl_std_loss": {
        "loop": "trl",
        "lora_dropout": 0.0,
        "gradient_checkpointing": False,
        "standard_loss": True,
    },
    # tunekit variants for the speed/memory levers: AdamW implementations, and glibc malloc told (in
    # process, through mallopt) to serve every block over 1 MiB by mmap, so freed activations go back to
    # the OS at once instead of staying in the heap.
    "tunekit_fused": {"loop": "tunekit", "lora_dropout": 0.0, "adamw": "fused"},
    "tunekit_foreach_off": {"loop": "tunekit", "lora_dropout": 0.0, "adamw": "for-loop"},
    "tunekit_mmap": {"loop": "tunekit", "lora_dropout": 0.0, "mmap_threshold": 1 << 20},
    # glibc heap levers that keep tensors where they are: one malloc arena for all threads (OpenMP
    # workers otherwise allocate from arenas of their own), or malloc_trim(0) after every step (the
    # freed activations' pages go back to the OS; the next forward faults them in again).
    "tunekit_arena1": {"loop": "tunekit", "lora_dropout": 0.0, "arena_max": 1},
    "tunekit_trim": {"loop": "tunekit", "lora_dropout": 0.0, "trim_each_step": True},
    # train.gradient_checkpointing: true (every decoder layer), or N (selective: every Nth one only).
    "tunekit_ckpt": {"loop": "tunekit", "lora_dropout": 0.0, "checkpoint_every": 1},
    "tunekit_ckpt2": {"loop": "tunekit", "lora_dropout": 0.0, "checkpoint_every": 2},
    "tunekit_ckpt3": {"loop": "tunekit", "lora_dropout": 0.0, "checkpoint_every": 3},
    # train.lean_activations: false (norm outputs and MLP products kept, not recomputed): the
    # default before 2026-11-23, for the memory this lever saves.
    "tunekit_keep": {"loop": "tunekit", "lora_dropout": 0.0, "lean": False},
    # train.loss_chunk_tokens: null: the loss over all a batch's targets at once (the (N, V) logits).
    "tunekit_whole": {"loop": "tunekit", "lora_dropout": 0.0, "loss_chunk": None},
    # train.compile: true: torch.compile (inductor, dynamic shapes) of each decoder layer, forward and
    # backward; lean activations off under it, as in tunekit. The compile time falls in the first step,
    # which no run's tokens/s counts: "first_step_s" in the JSON shows it.
    "tunekit_compile": {"loop": "tunekit", "lora_dropout": 0.0, "lean": False, "compile": True},
    # PEFT's own LoRA forward (four autograd nodes a layer) instead of tunekit's fused one
    # (train/speed/fused_lora.py), which tunekit's add_lora installs: the fused node's baseline.
    "tunekit_peft": {"loop": "tunekit", "lora_dropout": 0.0, "fused": False},
    # train.padding_free: true: one row of the batch's real tokens with attention per example,
    # instead of padded (batch x longest) blocks with an attention mask.
    "tunekit_padding_free": {"loop": "tunekit", "lora_dropout": 0.0, "padding_free": True},
    # trl_best + TrainingArguments(torch_compile=True): the Trainer compiles the whole model.
    "trl_compile": {"loop": "trl", "lora_dropout": 0.0, "gradient_checkpointing": False, "compile": True},
}
DEFAULT_RUNS = ("tunekit", "trl_default", "trl_best")


# ---- data --------------------------------------------------------------------------------------------


def training_sequences(
    data: str, n_examples: int, steps: int, batch_size: int, model: str, data_dir: Path
) -> list[dict]:
    """The token sequences every run trains on, in training order: steps * batch_size of them.

    A seeded sample of the file (banking77 is sorted by intent, so the head of the file would be a
    handful of intents), tokenized with tunekit, cut into tunekit's length-grouped batches; only full
    batches are kept so that TRL, reading the list sequentially, forms exactly the same batches.
    """
    from tunekit.data import load_examples
    from tunekit.models import load_tokenizer, resolve_model
    from tunekit.train.batching import length_grouped_batches
    from tunekit.train.tokens import tokenize_all

    rel, fmt, columns = DATASETS[data]
    path = data_dir / rel
    if not path.is_file():
        sys.exit(f"train_throughput: {path} not found; this benchmark needs ../shared/data (or --data-dir).")
    examples = load_examples(path, format=fmt, columns=columns)
    random.Random(SEED).shuffle(examples)
    tokenizer = load_tokenizer(resolve_model(model))
    tokenized = tokenize_all(tokenizer, examples[:n_examples], MAX_LENGTH, data)
    batches = length_grouped_batches([len(t.input_ids) for t in tokenized], batch_size, SEED)
    batches = [b for b in batches if len(b) == batch_size][:steps]
    if len(batches) < steps:
        sys.exit(
            f"train_throughput: {n_examples} examples give {len(batches)} full batches of {batch_size}, "
            f"fewer than --steps {steps}; raise --examples."
        )
    return [{"input_ids": tokenized[i].input_ids, "labels": tokenized[i].labels} for b in batches for i in b]


# ---- machine -----------------------------------------------------------------------------------------


@functools.cache  # asked at every step by sync(); the device does not change within a process
def on_cuda() -> bool:
    from tunekit.models.device import default_device

    return default_device().type == "cuda"


def sync() -> None:
    """Wait for queued GPU work, so a host clock read after it times the work (no-op on the CPU)."""
    import torch

    if on_cuda():
        torch.cuda.synchronize()


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n matmul: fp32 with torch's own thread settings (as training uses) on
    the CPU; bf16 at n = 8192 on CUDA (what autocast runs the matmuls in)."""
    import torch

    kw = {}
    if on_cuda():
        n, kw = 8192, {"device": "cuda", "dtype": torch.bfloat16}
    a, b = torch.randn(n, n, **kw), torch.randn(n, n, **kw)
    a @ b  # warm up the BLAS threads / cuBLAS handle
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads. On a machine where another job holds a core, two spinning OpenMP
    threads are over 10x slower than one (measured: 55 s against 4.3 s a LoRA step), so a shared
    machine needs --threads 1 for figures that mean anything."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def machine_info() -> dict:
    import os

    import peft
    import torch
    import transformers
    import trl

    return {
        "gpu": torch.cuda.get_device_name() if on_cuda() else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "matmul_peak_gflops": round(matmul_peak_gflops(), 1),
        "matmul_dtype": "bf16" if on_cuda() else "fp32",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
    }


# ---- runs (each in its own spawned process) -----------------------------------------------------------


def run_one(
    name: str, spec: dict, seqs: list[dict], steps: int, batch_size: int, full: bool, threads: int | None
) -> dict:
    """Train one way and return its per-step losses, step end times and the process's peak RSS."""
    import torch

    from tunekit.config import config_from_dict
    from tunekit.models import load_model, resolve_model
    from tunekit.train.setup import frozen_base_dtype

    set_threads(threads)
    if spec.get("mmap_threshold"):
        set_mmap_threshold(spec["mmap_threshold"])
    if spec.get("arena_max"):
        mallopt(-8, spec["arena_max"], "M_ARENA_MAX")
    torch.manual_seed(SEED)
    random.seed(SEED)
    # On the GPU where there is one. tunekit loads the base as its training does (a bf16 LoRA base
    # under bf16 autocast); TRL gets fp32 weights and casts as its own settings say.
    dtype = torch.float32
    if spec["loop"] == "tunekit":
        cfg = config_from_dict(
            {"model": spec["model"], "method": "full" if full else "lora", "data": {"train": "-"}}
        )
        dtype = frozen_base_dtype(cfg)
    model = load_model(resolve_model(spec["model"]), dtype)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    train = train_tunekit if spec["loop"] == "tunekit" else train_trl
    losses, step_ends, extra = train(model, spec, seqs, steps, batch_size, full)
    if on_cuda():
        extra["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {
        "losses": losses,
        "step_ends": step_ends,
        "parameters": n_params,
        # ru_maxrss is in KiB on Linux; this process ran this one training only, so it is the run's peak.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }


def set_mmap_threshold(nbytes: int) -> None:
    """glibc mallopt(M_MMAP_THRESHOLD): a fixed threshold also turns off glibc's dynamic raising of it,
    which otherwise moves large tensors into the heap after the first few are freed."""
    mallopt(-3, nbytes, "M_MMAP_THRESHOLD")


def mallopt(param: int, value: int, name: str) -> None:
    if not ctypes.CDLL("libc.so.6").mallopt(param, value):
        sys.exit(f"train_throughput: mallopt({name}) failed")


def make_adamw(params, kind: str):
    """torch AdamW: "default" lets torch pick (foreach on CPU), or "fused" / "for-loop"."""
    import torch

    extra = {"fused": {"fused": True}, "for-loop": {"foreach": False}}.get(kind, {})
    return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0, **extra)


def lora_settings(dropout: float):
    from tunekit.config import LoraConfig

    return LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=dropout, target_modules="all-linear")


def train_tunekit(model, spec, seqs, steps, batch_size, full):
    """tunekit's loop, as `train_sft` runs it, minus validation, logging and saving."""
    import torch

    from tunekit.config import TrainConfig
    from tunekit.data.tokenize import TokenizedExample
    from tunekit.models import load_tokenizer, resolve_model
    from tunekit.train.batching import collate
    from tunekit.train.loop import lr_at
    from tunekit.train.recipes.sft import accumulate_gradients
    from tunekit.train.setup import add_lora, compile_layers, enable_checkpointing
    from tunekit.train.speed.fused_lora import unfuse_lora_layers
    from tunekit.train.speed.lean import enable_lean_activations
    from tunekit.train.speed.padding_free import enable_padding_free

    pad_id = load_tokenizer(resolve_model(spec["model"])).pad_token_id
    if spec.get("checkpoint_every"):
        enable_checkpointing(model, spec["checkpoint_every"])  # as train.gradient_checkpointing: N does
    if not full:
        model = add_lora(model, lora_settings(spec["lora_dropout"]), SEED)
        if not spec.get("fused", True):
            unfuse_lora_layers(model)
    if spec.get("lean", True):
        enable_lean_activations(model)  # as train.lean_activations (default true) does
    if spec.get("padding_free") and not spec.get("compile"):
        enable_padding_free(model)  # as train.padding_free (default true) does
    if spec.get("compile"):
        compile_layers(model)  # as train.compile does
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    kind = spec.get("adamw", "default")
    opt = make_adamw(params, kind)
    examples = [TokenizedExample(s["input_ids"], s["labels"]) for s in seqs]
    trim = ctypes.CDLL("libc.so.6").malloc_trim if spec.get("trim_each_step") else None
    default_chunk = TrainConfig.model_fields["loss_chunk_tokens"].default  # as train.loss_chunk_tokens
    losses, step_ends = [], []
    start = time.perf_counter()
    for step in range(steps):
        batch = collate(examples[step * batch_size : (step + 1) * batch_size], pad_id)
        losses.append(accumulate_gradients(model, [batch], spec.get("loss_chunk", default_chunk)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 0, LEARNING_RATE, "cosine")
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if trim:
            trim(0)
        sync()
        step_ends.append(time.perf_counter())
    # The first step's seconds: warm-up, and under train.compile the compiling.
    return (
        losses,
        step_ends,
        {"optimizer": f"torch.optim.AdamW ({kind})", "first_step_s": step_ends[0] - start},
    )


def train_trl(model, spec, seqs, steps, batch_size, full):
    """TRL's SFTTrainer on the pre-tokenized sequences, read in order."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import Trainer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunekit.models import load_tokenizer, resolve_model

    class Clock(TrainerCallback):
        """Step end times and logged losses (logging_steps=1, so one loss per step)."""

        def __init__(self):
            self.step_ends, self.losses = [], []

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class StdLossSFTTrainer(SFTTrainer):
        """TRL 1.16 always computes the loss through its chunked log-prob head; this swaps in the
        standard transformers loss (full logits + cross-entropy), which TRL offers no setting for."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="tp_trl_"),
        # On CUDA: mixed precision as tunekit trains there. On the CPU bf16=False is needed: TRL
        # defaults to bf16=True, which fails or runs bf16 matmuls 17x slower there.
        bf16=on_cuda(),
        use_cpu=not on_cuda(),
        # transformers 5 renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing.
        activation_checkpointing=spec["gradient_checkpointing"],
        padding_free=spec.get("padding_free", False),
        torch_compile=spec.get("compile", False),
        # The same optimisation as tunekit's run.
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        seed=SEED,
        # The sequences arrive already truncated to MAX_LENGTH, in tunekit's batch order. TRL refuses
        # max_length with padding_free (it cannot enforce it there); the inputs need no cutting anyway.
        max_length=None if spec.get("padding_free") else MAX_LENGTH,
        train_sampling_strategy="sequential",
        # Bookkeeping: a loss per step, nothing saved or reported.
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    peft_config = None
    if not full:
        peft_config = LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=spec["lora_dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    clock = Clock()
    cls = StdLossSFTTrainer if spec.get("standard_loss") else SFTTrainer
    torch.manual_seed(SEED)  # TRL creates the adapters inside the constructor
    trainer = cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(seqs),
        processing_class=load_tokenizer(resolve_model(spec["model"])),
        peft_config=peft_config,
        callbacks=[clock],
    )
    trainer.train()
    extra = {"optimizer": args.optim if isinstance(args.optim, str) else args.optim.value}
    if not spec.get("standard_loss"):
        # TRL counts the non-padding tokens it trained on: a check that it saw our batches.
        extra["trl_token_count"] = trainer._total_train_tokens
    return clock.losses, clock.step_ends, extra


def run_in_fresh_process(*args) -> dict:
    """One run per spawned process: a fresh model, fresh threads, and a peak RSS of its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_one, *args).result()


# ---- figures -----------------------------------------------------------------------------------------


def summarize(raw: dict, seqs: list[dict], steps: int, batch_size: int, full: bool, peak: float) -> dict:
    """Throughput over steps 2..N (the first carries one-off warm-up), losses, MFU."""
    tokens = [
        sum(len(s["input_ids"]) for s in seqs[i * batch_size : (i + 1) * batch_size]) for i in range(steps)
    ]
    ends = raw["step_ends"]
    seconds = ends[-1] - ends[0]
    tokens_per_s = sum(tokens[1:]) / seconds
    # Model FLOPs a token: forward 2N + backward 2N through the activations; full fine-tuning adds 2N
    # for the weight gradients. N counts every parameter, embeddings included; attention's
    # sequence-length term is left out (sequences here are short).
    flops_per_token = (6 if full else 4) * raw["parameters"]
    losses = raw["losses"]
    return {
        "tokens_per_s": tokens_per_s,
        "examples_per_s": (steps - 1) * batch_size / seconds,
        "seconds_per_step": seconds / (steps - 1),
        "peak_rss_mb": raw["peak_rss_mb"],
        **({"peak_gpu_mb": raw["peak_gpu_mb"]} if "peak_gpu_mb" in raw else {}),
        "final_loss": sum(losses[-3:]) / len(losses[-3:]),
        "losses": losses,
        "mfu": tokens_per_s * flops_per_token / (peak * 1e9),
        "tokens_trained": sum(tokens),
        "parameters": raw["parameters"],
        **{k: raw[k] for k in ("optimizer", "trl_token_count", "first_step_s") if k in raw},
    }


def median_run(rounds: list[dict]) -> dict:
    """The median of each figure over the rounds (losses are identical across rounds: same seeds)."""
    import statistics

    out = dict(rounds[0])
    for k in ("tokens_per_s", "examples_per_s", "seconds_per_step", "peak_rss_mb", "peak_gpu_mb", "mfu"):
        if k in out:
            out[k] = statistics.median(r[k] for r in rounds)
    out["rounds"] = [{k: r[k] for k in ("tokens_per_s", "peak_rss_mb")} for r in rounds]
    return out


def print_table(runs: dict) -> None:
    base = runs.get("tunekit")
    cols = ("tokens_per_s", "examples_per_s", "peak_rss_mb", "final_loss", "mfu")
    if base and "peak_gpu_mb" in base:
        cols = ("tokens_per_s", "examples_per_s", "peak_gpu_mb", "final_loss", "mfu")
    print(f"\n{'run':<18}" + "".join(f"{c:>16}" for c in cols))
    for name, r in runs.items():
        print(f"{name:<18}" + "".join(f"{r[c]:>16.4g}" for c in cols))
        if base and name != "tunekit":
            print(f"{'  / tunekit':<18}" + "".join(f"{r[c] / base[c]:>15.2f}x" for c in cols))
    print("\nloss at each step:")
    for name, r in runs.items():
        print(f"{name:<18}" + " ".join(f"{x:.4f}" for x in r["losses"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=sorted(DATASETS), default="banking77")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples", type=int, help="examples to sample (default: steps x batch size)")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--threads", type=int, help="torch threads in every run (default: torch's own)")
    ap.add_argument(
        "--repeats", type=int, default=1, help="rounds of all runs, interleaved; medians reported"
    )
    ap.add_argument(
        "--model", default=MODEL, help="the model (alias, local folder): default the default model"
    )
    ap.add_argument(
        "--data-dir", type=Path, default=SHARED_DATA, help="where banking77/ and llamafactory-demo/ are"
    )
    ap.add_argument("--json", type=Path, help="write machine, settings and runs here")
    a = ap.parse_args()
    names = a.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown or a.steps < 2:
        sys.exit(f"train_throughput: unknown runs {unknown}" if unknown else "--steps must be at least 2")
    n_examples = a.examples or a.steps * a.batch_size

    seqs = training_sequences(a.data, n_examples, a.steps, a.batch_size, a.model, a.data_dir)
    set_threads(a.threads)
    machine = machine_info()
    settings = {
        "data": a.data,
        "model": a.model,
        "method": "full" if a.full else f"lora r{LORA_R} alpha{LORA_ALPHA} all-linear",
        "steps": a.steps,
        "batch_size": a.batch_size,
        "examples": len(seqs),
        "tokens_per_example_mean": sum(len(s["input_ids"]) for s in seqs) / len(seqs),
        "target_tokens_per_example_mean": sum(sum(x != -100 for x in s["labels"]) for s in seqs) / len(seqs),
        "max_length": MAX_LENGTH,
        "learning_rate": LEARNING_RATE,
        "lr_schedule": "cosine, no warmup",
        "max_grad_norm": MAX_GRAD_NORM,
        "seed": SEED,
        "repeats": a.repeats,
        "precision": "fp32 weights, bf16 autocast (CUDA)" if on_cuda() else "fp32",
        "runs": {n: RUNS[n] for n in names},
    }
    print(
        f"{a.data}: {len(seqs)} examples, {settings['tokens_per_example_mean']:.0f} tokens an example "
        f"({settings['target_tokens_per_example_mean']:.1f} with loss), {a.steps} steps of {a.batch_size}; "
        f"{machine['matmul_dtype']} matmul peak {machine['matmul_peak_gflops']} GFLOP/s "
        f"({machine['gpu'] or str(machine['torch_threads']) + ' threads'})",
        flush=True,
    )
    # Contenders interleaved round by round (A B C, A B C, ...): on a shared machine a burst of outside
    # load then hits every contender alike; each figure is the median over the rounds.
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(a.repeats):
        for name in names:
            t0 = time.perf_counter()
            spec = {**RUNS[name], "model": a.model}
            raw = run_in_fresh_process(name, spec, seqs, a.steps, a.batch_size, a.full, a.threads)
            r = summarize(raw, seqs, a.steps, a.batch_size, a.full, machine["matmul_peak_gflops"])
            rounds[name].append(r)
            print(
                f"[round {rnd + 1}/{a.repeats}] {name}: {r['tokens_per_s']:.1f} tokens/s, "
                f"{r['examples_per_s']:.2f} examples/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                + (f"peak GPU {r['peak_gpu_mb']:.0f} MB, " if "peak_gpu_mb" in r else "")
                + f"final loss {r['final_loss']:.4f}, MFU {r['mfu']:.1%} ({time.perf_counter() - t0:.0f}s in all)",
                flush=True,
            )
    runs = {name: median_run(rs) for name, rs in rounds.items()}
    if "tunekit" in runs:
        for r in runs.values():
            r["ratio_to_tunekit"] = {
                k: r[k] / runs["tunekit"][k]
                for k in ("tokens_per_s", "examples_per_s", "peak_rss_mb", "peak_gpu_mb", "final_loss", "mfu")
                if k in r
            }
    print_table(runs)
    if a.json:
        a.json.write_text(json.dumps({"machine": machine, "settings": settings, "runs": runs}, indent=2))
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
