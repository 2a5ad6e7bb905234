"""Where models and tensors live, and in which precision: the one decision train, eval and serve share.

- Device: `$TUNEKIT_DEVICE` when set (`cpu`, `cuda`, `cuda:N`); else `cuda:$LOCAL_RANK` (default 0)
  when CUDA is available, so each torchrun worker takes its own GPU; else `cpu`.
- Models are moved there once, right after loading (`place`); QLoRA's 4-bit base is put there
  by bitsandbytes through `device_map` instead. Data tensors move to the model's device in the
  function that runs the forward pass (`to_device`), and numbers come back with `.cpu()`/`.item()`.
- Precision: weights the optimizer updates stay fp32. On a CUDA device with bf16 support, forward
  passes run under `torch.autocast(bfloat16)` (`autocast`), and a LoRA/DoRA run's frozen base is
  loaded in bf16 (train/setup.py: it is only ever read in bf16 there); on the CPU
  everything stays fp32, as bf16 matmuls are about 17x slower on CPUs without bf16 instructions.
  `$TUNEKIT_PRECISION=fp32` keeps CUDA in fp32 too (exact comparisons, debugging a loss).
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext

import torch

from tunekit.errors import TunekitError

ENV = "TUNEKIT_DEVICE"
PRECISION_ENV = "TUNEKIT_PRECISION"
_SPEC = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def default_device() -> torch.device:
    """The device models and data go to: $TUNEKIT_DEVICE, else cuda:$LOCAL_RANK, else cpu."""
    spec = os.environ.get(ENV, "").strip().lower()
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if not spec:
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    m = _SPEC.match(spec)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise TunekitError(f"{ENV}={spec!r}: expected cpu, cuda or cuda:N (e.g. cuda:1)")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TunekitError(f"{ENV}={spec}: CUDA is not available here; unset {ENV} or set it to cpu")
    index = int(m.group(2)) if m.group(2) is not None else local
    if index >= torch.cuda.device_count():
        raise TunekitError(
            f"{ENV}={spec}: there is no cuda:{index} (this machine has {torch.cuda.device_count()} GPUs)"
        )
    return torch.device("cuda", index)


def place(model):
    """`model`, moved to `default_device()` (a no-op on the CPU). A model that was given a
    `device_map` at load (QLoRA's 4-bit base) stays where the map put it."""
    if getattr(model, "hf_device_map", None):
        return model
    device = default_device()
    return model if device.type == "cpu" else model.to(device)


def model_device(model) -> torch.device:
    """The device of the model's weights (of its first parameter)."""
    return next(model.parameters()).device


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def bf16_autocast(device: torch.device) -> bool:
    """Whether forward passes on `device` run under bf16 autocast: on a CUDA device with bf16
    support, unless $TUNEKIT_PRECISION=fp32."""
    precision = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if precision not in ("auto", "bf16", "fp32"):
        raise TunekitError(f"{PRECISION_ENV}={precision!r}: expected auto, bf16 or fp32")
    return precision != "fp32" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast for forward passes on a CUDA device that supports it; fp32 (no-op) elsewhere.
    Wrap forward passes and the loss only: backward runs outside, in the dtypes the forward used."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16_autocast(device) else nullcontext()


def cuda_peak_memory() -> dict[str, float]:
    """{"cuda_peak_memory_gib": ...}: the most memory torch allocated on the current CUDA device so
    far; {} on the CPU."""
    device = default_device()
    if device.type != "cuda":
        return {}
    return {"cuda_peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
