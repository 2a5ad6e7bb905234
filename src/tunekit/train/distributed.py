"""Data-parallel training over several processes and machines, on torch.distributed.

`tunekit train CONFIG --nproc N [--nnodes M --node-rank R --master-addr A --master-port P]` starts
N workers per machine through torchrun (torch's own elastic launcher), each running the same
config. Inside a worker:

- every rank builds the same model from the same seed, so the weights start identical;
- each optimizer step's group of examples (batch_size x grad_accum x world examples, grouped by
  length) is cut into one slice per rank, so N processes with batch b train on exactly the batches
  one process with batch N x b would;
- after backward, gradients are averaged across ranks in one flattened all-reduce; the SFT loss is
  normalised by the global count of target tokens, so the average is the exact global gradient;
- rank 0 alone writes the run directory (splits, metrics, checkpoints, model, reports); the others
  wait for it at barriers.

The backend is NCCL on GPUs and gloo on CPUs. FSDP and DeepSpeed are not implemented yet
(`distributed.strategy` accepts only ddp): say so rather than silently running something else.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

from tunekit.errors import TunekitError


def launched() -> bool:
    """True inside a worker started by torchrun (or any launcher that sets the standard env)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init() -> None:
    """Join the process group once, if this process is a worker of a multi-process launch."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 writes files and prints; every other rank stays quiet."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def sum_int(value: int) -> int:
    """The sum of an integer over all ranks (e.g. target tokens of a step)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def max_int(value: int) -> int:
    """The largest value over all ranks (e.g. a stop signal any rank received)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean(value: float) -> float:
    """The mean of a float over all ranks (e.g. the step's loss, for the log)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of `params` across ranks in a single all-reduce of one flat buffer."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[offset : offset + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def rank_slice(indices: list[int]) -> list[int]:
    """This rank's contiguous share of a step's examples."""
    n, r = world(), rank()
    per = -(-len(indices) // n)
    return indices[r * per : (r + 1) * per]


def check_supported(cfg) -> None:
    """Refuse, before any worker starts, what several processes cannot run yet."""
    from tunekit.errors import ConfigError

    if cfg.distributed.strategy != "ddp":
        raise ConfigError(
            [f"distributed.strategy: {cfg.distributed.strategy} is not implemented yet; use ddp"], "config"
        )
    if cfg.task == "rl":
        raise ConfigError(["task: rl runs in one process (TRL's trainer); drop --nproc"], "config")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    argv: list[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
) -> int:
    """Start `python -m tunekit ARGV` in `nproc` workers on this node through torchrun; returns the
    exit code. Multi-node: run the same command on every node with its own --node-rank."""
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise TunekitError(
            f"--nproc {nproc} --nnodes {nnodes} --node-rank {node_rank}: need nproc >= 1, nnodes >= 1 "
            "and 0 <= node-rank < nnodes"
        )
    if nnodes > 1 and master_port is None:
        raise TunekitError("--nnodes > 1 needs --master-addr and --master-port, the same on every node")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--master_addr={master_addr}",
        f"--master_port={master_port or _free_port()}",
        "-m",
        "tunekit",
        *argv,
    ]
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))}
    return subprocess.call(cmd, env=env)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
