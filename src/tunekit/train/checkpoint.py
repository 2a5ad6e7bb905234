"""Checkpoints that survive any interruption, and exact resume from them.

run_dir/checkpoints/step-000120/
    trainable.safetensors   the parameters that train (the adapter, or every weight for full)
    optimizer.pt            AdamW state (moments and step counts), keyed by parameter name
    rng.pt                  Python, NumPy and torch RNG states (dropout masks replay exactly)
    state.json              step, epoch, the data order still to come, loop counters, and the
                            config it belongs to (`config.run_identity`) with its hash
    manifest.json           sha256 and size of each file above, written last

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place and
the parent fsynced: a rename is atomic, so a process killed at any moment leaves either a complete
checkpoint or a hidden temporary folder that resume ignores (and the next save clears). Only the
newest `save_total_limit` checkpoints are kept.

Resume verifies every file against the manifest and refuses a damaged checkpoint by name; asked to
(`--skip-damaged`), it moves the damaged one aside (`damaged-step-000120/`, never listed again) and
takes the newest intact one before it.

Several processes: every rank calls `save_checkpoint` and `load_checkpoint`. With FSDP the weights
and AdamW moments are sharded; saving gathers them into full tensors (rank 0 writes), loading
hands each rank its shard of the full tensors. The files are the same however many processes and
whichever strategy wrote them, so any checkpoint resumes with any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from tunekit.errors import TunekitError
from tunekit.train import distributed

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "optimizer.pt", "rng.pt", "state.json")
FORMAT = 2  # state.json's "format": 2 and later always come with a manifest
# What state.json must hold for the loop to resume (train/loop.py writes them all).
STATE_KEYS = (
    "step",
    "epoch",
    "step_groups",
    "total_steps",
    "tokens",
    "seconds",
    "loss",
    "val",
    "window",
    "rng",
)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory; the rename still holds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, as full contiguous CPU tensors on rank 0 ({} on the other
    ranks). Every rank must call: FSDP gathers each sharded parameter, one at a time."""
    main = distributed.is_main()
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = distributed.full_tensor(p.detach())
            if main:
                state[name] = full.to("cpu").contiguous().clone()
    return state


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's full state keyed by parameter name on rank 0 ({} on the other ranks, which
    must call too): the same dict whether the model is sharded (FSDP) or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, opt_state: dict) -> None:
    """Restore `optimizer_state`'s dict (every rank passes the whole of it; FSDP keeps its shard).
    A checkpoint from before names were used is keyed by position in the optimizer's parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if any(isinstance(k, int) for k in opt_state.get("state", {})) or any(
        isinstance(i, int) for g in opt_state.get("param_groups", []) for i in g["params"]
    ):
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        opt_state = {
            "state": {order[i]: v for i, v in opt_state["state"].items()},
            "param_groups": [
                g | {"params": [order[i] for i in g["params"]]} for g in opt_state["param_groups"]
            ],
        }
    set_optimizer_state_dict(model, optimizer, opt_state, options=StateDictOptions(full_state_dict=True))


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python/NumPy states, torch states as tensors): both load without unpickling code."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run_dir: Path, model, optimizer, state: dict, total_limit: int | None = 2) -> Path:
    """Write a complete checkpoint for `state["step"]` atomically; prune older ones. Returns its path.

    Every rank calls (the weights and optimizer state are gathered first); rank 0 alone writes."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    weights, opt_state = trainable_state(model), optimizer_state(model, optimizer)
    root = Path(run_dir) / CHECKPOINTS
    if not distributed.is_main():
        return root / f"step-{state['step']:06d}"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    target = root / f"step-{state['step']:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(opt_state, tmp / "optimizer.pt")
        plain_rng, tensor_rng = rng_state()
        torch.save(tensor_rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state | {"rng": plain_rng, "format": FORMAT}))
        _write_manifest(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(root)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save: a failed write is a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise TunekitError(
            f"{target}: cannot write the checkpoint ({why}); free disk space in {root.parent} "
            "or set output_dir elsewhere, then resume. The last complete checkpoint is unchanged."
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    """manifest.json: the sha256 and size of every file of the checkpoint (read back from disk, so
    the sums are of what was written)."""
    files = {f: {"sha256": _sha256(folder / f), "bytes": (folder / f).stat().st_size} for f in FILES}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with the checkpoint at `path` (a file missing, truncated or changed, state.json
    unreadable or lacking a key), or None when it is intact. A checkpoint from before checksums
    (no manifest and no "format" in its state.json) is checked for its files and keys only."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).is_file() else None
        listed = manifest["files"] if manifest is not None else {}
        if manifest is not None and set(listed) != set(FILES):
            return f"{MANIFEST} lists {sorted(listed)}, not the checkpoint's files"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} cannot be read ({e})"
    for name in FILES:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if name in listed and f.stat().st_size != listed[name]["bytes"]:
            return f"{name} has {f.stat().st_size:,} bytes, not the {listed[name]['bytes']:,} written"
        if name in listed and _sha256(f) != listed[name]["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST}"
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json cannot be read ({e})"
    if not isinstance(state, dict):
        return "state.json is not a JSON object"
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        return f"state.json lacks {', '.join(missing)}"
    if manifest is None and state.get("format", 1) >= FORMAT:
        return f"{MANIFEST} is missing"
    return None


def damaged(path: Path, problem: str) -> TunekitError:
    return TunekitError(
        f"{path}: damaged checkpoint: {problem}. Resume from the newest intact checkpoint before it with "
        "--skip-damaged (this one is then moved aside), or delete it."
    )


def resumable_checkpoint(run_dir: Path, skip_damaged: bool = False, say=None) -> Path | None:
    """The newest checkpoint to resume from, verified. A damaged one is refused by name, unless
    `skip_damaged`: then it is renamed `damaged-step-N` (kept to look at, never listed again) and the
    one before it is tried; `say` is told of each. None when there is no checkpoint at all."""
    ckpts = list_checkpoints(run_dir)
    for ckpt in reversed(ckpts):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        if not skip_damaged:
            raise damaged(ckpt, problem)
        aside = ckpt.with_name(f"damaged-{ckpt.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ckpt, aside)
        if say:
            say(
                f"[yellow]resume: {ckpt} is damaged ({problem}); moved to {aside.name}, trying the one before"
            )
    if ckpts:
        raise TunekitError(
            f"{Path(run_dir) / CHECKPOINTS}: no intact checkpoint left to resume from; start over with "
            "--overwrite, or set output_dir to a new folder"
        )
    return None


def read_state(path: Path) -> dict:
    """The state.json of a verified checkpoint."""
    return json.loads((Path(path) / "state.json").read_text())


def checkpoint_bytes(params) -> int:
    """Size of one checkpoint: the trainable weights plus AdamW's two moments for each."""
    return 3 * sum(p.numel() * p.element_size() for p in params)


def ensure_free_space(run_dir: Path, need: int) -> None:
    """Refuse to start when the run directory's disk cannot hold what the run writes (`need` bytes:
    loop.needed_bytes)."""
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise TunekitError(
            f"output_dir: {run_dir} has {free / 2**20:,.0f} MiB free, but this run's checkpoints, final model "
            f"and tokenizer need about {need / 2**20:,.0f} MiB; free space, lower train.save_total_limit, or set "
            "output_dir on a bigger disk"
        )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore the trainable parameters, the optimizer and the RNGs from `path`; returns its state.
    Every rank reads the whole checkpoint; a sharded (FSDP) model keeps its shard of it. Files are
    written from CPU tensors and read onto the CPU; the weights then go to each parameter's device,
    and the optimizer's moments follow their parameters (`Optimizer.load_state_dict`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    problem = verify_checkpoint(path)
    if problem:
        raise damaged(path, problem)
    try:
        weights = load_file(path / "trainable.safetensors")
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        tensor_rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise damaged(path, f"it cannot be read ({e})") from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise TunekitError(
            f"{path}: the checkpoint does not match the model this config builds "
            f"({len(missing)} parameters missing, {len(unknown)} unknown, e.g. {(missing or unknown)[0]}); "
            "resume with the config the run was started with"
        )
    with torch.no_grad():
        for name, value in weights.items():
            p = params[name]
            p.copy_(distributed.shard_like(value.to(p.device, p.dtype), p))  # FSDP: this rank's shard
    load_optimizer_state(model, optimizer, opt_state)
    set_rng_state(state.pop("rng"), tensor_rng)
    return state
