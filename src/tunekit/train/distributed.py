"""Training over several processes and machines, on torch.distributed: DDP or FSDP.

`tunekit train CONFIG --nproc N [--nnodes M --node-rank R --master-addr A --master-port P]` starts
N workers per machine through torchrun (torch's own elastic launcher), each running the same
config. Inside a worker:

- every rank builds the same model from the same seed, so the weights start identical;
- each optimizer step's group of examples (batch_size x grad_accum x world examples, grouped by
  length) is cut into one share per rank, so N processes with batch b train on exactly the batches
  one process with batch N x b would;
- the SFT loss is normalised by the global count of target tokens divided by the world size, so
  the mean of the ranks' gradients is exactly the one-process gradient;
- rank 0 alone writes the run directory (splits, metrics, checkpoints, model, reports); the others
  wait for it at barriers.

`distributed.strategy` says how the model and its gradients are spread:

- ddp: every rank holds the whole model; after backward the gradients are averaged in one
  flattened all-reduce (`average_gradients`).
- fsdp: torch's FSDP2 (`fully_shard`) shards each decoder layer (the model's `_no_split_modules`),
  then the root, over all ranks: a rank keeps 1/N of every weight, gradient and AdamW moment
  (frozen LoRA base weights included) and all-gathers a layer only for its forward and backward.
  FSDP reduce-scatters the gradients itself, as a mean over ranks, so `average_gradients` is
  skipped and the same loss normalisation stays exact. Every forward is a collective, so every
  rank must run as many micro-batches as the others (`micro_batches(even=True)`). Checkpoints and
  the saved adapter or model are gathered to full tensors first, so they are the files a
  one-process run writes: an FSDP checkpoint resumes in one process and the other way round.
  method: qlora too (FSDP-QLoRA, the Answer.AI / Hugging Face recipe): the 4-bit base is stored in
  a float dtype (`bnb_4bit_quant_storage`, setup.quantization_config), so each packed weight is a
  float tensor FSDP shards like any frozen weight; the layer keeps its quantization state and
  bitsandbytes dequantizes the all-gathered weight in its forward.
- deepspeed: not implemented here (and deepspeed is not a dependency): refused.

The backend is NCCL on GPUs and gloo on CPUs (FSDP2 shards on CPU too). Tested on CPU with 2 gloo
processes against one process (tests/test_distributed.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

from tunekit.errors import TunekitError
from tunekit.models.load import unwrap_peft


def launched() -> bool:
    """True inside a worker started by torchrun (or any launcher that sets the standard env)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init() -> None:
    """Join the process group once, if this process is a worker of a multi-process launch."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    from tunekit.models.device import default_device

    device = default_device()  # TUNEKIT_DEVICE=cpu on a GPU machine means gloo, not NCCL
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _comm_device() -> torch.device:
    """Where small collective tensors live: NCCL takes only CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return int(t.item())


def max_int(value: int) -> int:
    """The largest value over all ranks (e.g. a stop signal any rank received)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean(value: float) -> float:
    """The mean of a float over all ranks (e.g. the step's loss, for the log)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
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
    """This rank's contiguous share of a step's examples; the shares differ by at most one example."""
    base, extra = divmod(len(indices), world())
    r = rank()
    start = r * base + min(r, extra)
    return indices[start : start + base + (r < extra)]


def micro_batches(indices: list[int], batch_size: int, even: bool = False) -> list[list[int]]:
    """This rank's share of one optimizer step's examples, cut into micro-batches of `batch_size`.

    even (FSDP): each forward and backward all-gathers and reduce-scatters with the other ranks, so
    every rank must run the same number of micro-batches, none of them empty. The share is then cut
    into as many micro-batches as the largest share needs (only at batch_size 1 can a smaller share
    force a micro-batch of 2). A step with fewer examples than ranks (the last of an epoch can be)
    repeats some of them, as accelerate's even_batches does; the loop warns when that will happen.
    """
    n = world()
    if even and len(indices) < n:
        indices = (indices * n)[:n]
    mine = rank_slice(indices)
    if not even:
        return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    largest = -(-len(indices) // n)
    k = min(-(-largest // batch_size), len(indices) // n)  # the same on every rank
    per, more = divmod(len(mine), k)
    cuts = [0]
    for i in range(k):
        cuts.append(cuts[-1] + per + (i < more))
    return [mine[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


# ---------------------------------------------------------------------------------------------
# FSDP


def sharded(model) -> bool:
    """True when `shard` spread `model` over the ranks (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model) -> int:
    """Shard `model` in place with FSDP2 over all ranks: each decoder layer, then the root (the
    embeddings, final norm and head). Returns the number of layers sharded one by one.

    Mixed trainable and frozen weights in one layer (LoRA) are fine: FSDP2 shards both and
    reduce-scatters only the gradients that exist. Parameters become DTensors, so collect the
    trainable ones after this call.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = unwrap_peft(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    mesh = init_device_mesh(next(model.parameters()).device.type, (world(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # `model.load_state_dict(full tensors)` (e.g. `tunekit train --from RUN`) keeps working.
    model.register_load_state_dict_pre_hook(_full_to_shards)
    return len(layers)


def reshard(model) -> None:
    """Put every FSDP unit of `model` back into its sharded state. The root stays gathered after a
    forward, waiting for the backward; after a no-grad forward (validation) none comes, and until
    this call its parameters would read as full tensors, not the DTensors the optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _full_to_shards(module, state_dict, prefix, *args) -> None:
    params = dict(module.named_parameters(prefix=prefix, remove_duplicate=False))  # tied weights too
    for name, value in list(state_dict.items()):
        if name in params and not _is_dtensor(value):
            state_dict[name] = shard_like(value, params[name])


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) as `param` holds it: this rank's shard when `param` is a
    DTensor (no communication), else `full` itself."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(param.device, param.dtype)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from the ranks' shards for a DTensor (every rank must call)."""
    return t.full_tensor() if _is_dtensor(t) else t


def full_state_dict(model, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP model on rank 0's CPU ({} on the other ranks, which must
    call too): what `save_pretrained` of a one-process model would see. `trainable_only` skips the
    frozen base of a LoRA model (the adapter is all that is saved)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied weight (lm_head = embed_tokens): saved once, as one process saves it
            state.pop(name, None)
        seen.add(id(p))
    return state


def check_supported(cfg) -> None:
    """Refuse, before any worker starts, what several processes cannot run; every reason at once."""
    from tunekit.errors import ConfigError
    from tunekit.tasks import get_task

    problems = []
    if not get_task(cfg.task).multi_process:
        problems.append(f"task: {cfg.task} runs in one process; drop --nproc")
    if problems:
        raise ConfigError(problems, "config")


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
