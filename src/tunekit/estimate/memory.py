"""Peak training memory and time, predicted from a model's config before anything is loaded.

An analytic model, in the usual accounting (ZeRO paper, Korthikanti et al. 2022), calibrated against
measured peaks on this project's CPU:

- weights:     every parameter in the training dtype; for qlora the decoder's linear layers in 4-bit
               NF4 (0.5 byte a parameter + its quantization constants), everything else as for lora.
- gradients:   one per trainable parameter (all of them for full, the adapters for lora/qlora).
- optimizer:   AdamW's two fp32 moments per trainable parameter, plus for mixed precision (bf16)
               an fp32 master copy: full fine-tuning costs 16 bytes a parameter either way.
- activations: what autograd keeps for the backward pass, per token per layer, for batch_size x
               max_length tokens, without gradient checkpointing unless asked (then of every Nth
               layer only the input is kept, plus one layer's activations during its recompute). The element counts
               were read off the default model with `torch.autograd.graph.saved_tensors_hooks`
               (sdpa attention: no term quadratic in the sequence length).
- logits:      the vocabulary projection: tunekit projects only the positions that carry loss, so
               it is (target tokens) x vocab, about three copies alive in the backward pass (the
               log-softmax output, its gradient and the logits' gradient).
- allocator:   on a CPU, glibc keeps the memory of freed activations and hands it back only in part, so
               the second step's forward peaks above the first (measured: about 550 MB more for LoRA,
               batch 4 x 128); calibrated here as 0.4 x (activations + logits). On a GPU: an assumed
               0.1 x for the caching allocator's fragmentation.
- checkpoint pages (qlora, CPU only): the fp32 checkpoint is read through mmap to be quantized and its
               pages stay mapped, so they count in the process's resident memory (measured: 508 MB of
               file pages for the default model's 513 MB file) although the kernel can drop them
               under pressure.
- runtime:     what the process holds before training (Python, torch, transformers; on a GPU the CUDA
               context), an assumption per device.

Several processes (`shards`, one per GPU): with ddp every process holds all of the above. With
fsdp over N processes (ZeRO-3 style, tunekit's FSDP2 sharding in train/distributed.py) each process
keeps 1/N of the weights, gradients and optimizer states, plus what is gathered in full at a time
(`gathered_weights`): the root unit (embeddings, final norm, head), which FSDP2 keeps gathered from
its forward to its backward, and two decoder layers (the one computing and the next, prefetched),
with one layer's unsharded gradients before their reduce-scatter. Activations and logits are per
process and do not shrink. Collective buffers and the overlap of communication are not counted.

The parameter count comes from the config alone: the model is built on torch's "meta" device, which
allocates nothing, so a 70B model costs no memory to count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tunekit.errors import ConfigError

GB = 1024**3
MB = 1024**2

# Llama-class reference shapes (public config.json values), usable without any download.
REFERENCE_CONFIGS: dict[str, dict] = {
    "1b": {  # Llama-3.2-1B
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "7b": {  # Llama-2-7B
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "8b": {  # Llama-3.1-8B
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "70b": {  # Llama-3.1-70B
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}

# GPUs for the fits-or-not table: memory and the dense bf16 tensor-core peak from the vendor's data
# sheet. Time on them is an assumption (see `gpu_seconds`), never a measurement.
GPUS: dict[str, dict] = {
    "24GB (RTX 4090)": {"memory_gb": 24, "bf16_tflops": 165},
    "48GB (RTX A6000)": {"memory_gb": 48, "bf16_tflops": 155},
    "80GB (A100)": {"memory_gb": 80, "bf16_tflops": 312},
    "80GB (H100 SXM)": {"memory_gb": 80, "bf16_tflops": 989},
}
ASSUMED_MFU = 0.40  # model-FLOPs utilisation a well-tuned GPU run reaches; an assumption, stated as one

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# NF4: 4 bits a weight; double quantization stores each block-of-64 absmax in 8 bits plus one fp32
# constant per 256 blocks (QLoRA paper, section 3).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

# Activation elements saved per token per decoder layer (fp32 sdpa, measured on SmolLM2-135M with
# saved_tensors_hooks and matched to the shapes: h hidden, i intermediate, kv key/value width):
#   full fine-tuning: 8h + 4i + 2kv (inputs of every matmul, the norms' inputs and outputs, q/k after
#   RoPE, the attention output and log-sum-exp, the four MLP intermediates);
#   frozen base + adapters: 2h fewer (a frozen norm's weight needs no saved normalized input), plus
#   the adapters' rank-r intermediates, plus, with dropout, a dropped copy of each adapted input;
#   lean activations (train/speed/lean.py): 2h + 2i fewer (the norm outputs, act(gate) and the product);
#   i fewer with LoRA dropout, where the adapters keep dropped copies of the norm outputs and product.
# Held before training: cpu measured (python + torch + transformers + peft), gpu the CUDA context (assumed).
RUNTIME_MB = {"cpu": 420, "gpu": 1024}
ALLOCATOR_OVERHEAD = {"cpu": 0.4, "gpu": 0.1}  # x (activations + logits): cpu calibrated here, gpu assumed


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about an architecture."""

    name: str
    params: int  # every parameter, tied embeddings counted once
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # key/value heads x head dim
    vocab: int
    linear_shapes: tuple[tuple[str, int, int], ...]  # (module name suffix, in, out) of one decoder layer

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear weights: what qlora quantizes."""
        return self.layers * sum(i * o for _, i, o in self.linear_shapes)

    def adapter_params(self, r: int, target_modules: str | list[str], dora: bool = False) -> int:
        """LoRA parameters: r x (in + out) for each targeted linear layer (DoRA adds a magnitude of `out`)."""
        names = {n for n, _, _ in self.linear_shapes}
        if target_modules == "all-linear":
            chosen = names
        else:
            wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
            chosen = {n for n in names if n in wanted}
            if not chosen:
                raise ConfigError(
                    [
                        f"lora.target_modules: none of {wanted} is a linear layer of this model "
                        f"(it has {sorted(names)}); use 'all-linear' or names from that list"
                    ]
                )
        per_layer = sum(r * (i + o) + (o if dora else 0) for n, i, o in self.linear_shapes if n in chosen)
        return self.layers * per_layer

    def adapted_inputs(self, target_modules: str | list[str]) -> tuple[int, int]:
        """(targeted modules, summed input width) in one layer: what adapter activations scale with."""
        names = [n for n, _, _ in self.linear_shapes]
        chosen = names if target_modules == "all-linear" else [n for n in names if n in target_modules]
        return len(chosen), sum(i for n, i, _ in self.linear_shapes if n in chosen)


def shape_from_config(hf_config, name: str = "") -> ModelShape:
    """Count parameters by building the model on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    layer = model.get_decoder().layers[0]
    linears = tuple(
        (n.rsplit(".", 1)[-1], m.in_features, m.out_features)
        for n, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    c = hf_config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return ModelShape(
        name=name or getattr(c, "_name_or_path", "") or c.model_type,
        params=params,
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        kv_width=(getattr(c, "num_key_value_heads", None) or heads) * head_dim,
        vocab=c.vocab_size,
        linear_shapes=linears,
    )


def reference_shape(size: str) -> ModelShape:
    """A built-in llama-class shape: one of REFERENCE_CONFIGS."""
    from transformers import LlamaConfig

    key = size.lower()
    if key not in REFERENCE_CONFIGS:
        raise ConfigError([f"--model-size {size!r}: choose one of {', '.join(REFERENCE_CONFIGS)}"])
    return shape_from_config(LlamaConfig(**REFERENCE_CONFIGS[key]), name=f"llama-class {key}")


def shape_from_model(spec: str) -> ModelShape:
    """The shape of a config's `model` (alias, folder or hub id), from its config.json only."""
    from transformers import AutoConfig

    from tunekit.models import resolve_model

    path = resolve_model(spec)
    return shape_from_config(AutoConfig.from_pretrained(path), name=spec)


@dataclass
class MemoryEstimate:
    """Predicted peak memory of a training run, by component (bytes)."""

    model: str
    method: str
    dtype: str
    batch_size: int
    seq_len: int
    checkpointing: int  # every how many decoder layers activations are recomputed; 0: never
    device: str
    trainable_params: int
    total_params: int
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def fits(self, memory_gb: float) -> bool:
        return self.total <= memory_gb * GB

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "method": self.method,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "gradient_checkpointing": self.checkpointing,
            "device": self.device,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "parts_mb": {k: round(v / MB, 1) for k, v in self.parts.items()},
            "peak_mb": round(self.total / MB, 1),
        }


def estimate_memory(
    shape: ModelShape,
    method: str,
    batch_size: int,
    seq_len: int,
    *,
    dtype: str = "fp32",
    lora_r: int = 16,
    target_modules: str | list[str] = "all-linear",
    lora_dropout: float = 0.0,
    dora: bool = False,
    target_fraction: float = 1.0,
    checkpointing: bool | int = False,
    device: str = "cpu",
    shards: int = 1,
    lean: bool = True,
    loss_chunk: int | None = None,
) -> MemoryEstimate:
    """Peak memory of training `shape` with `method` on batch_size x seq_len tokens.

    target_fraction: the share of positions that carry loss (tunekit projects only those onto the
    vocabulary). dtype: "fp32" (tunekit on a CPU) or "bf16" (weights and activations in bf16; full
    fine-tuning then keeps fp32 master weights, as mixed-precision training does). shards: the number
    of processes FSDP shards the model over (1: not sharded, as with ddp or one process); the peak
    is then one process's. lean: `train.lean_activations` (tunekit's default), under which the
    norms' outputs and the MLP's act(gate) and product are recomputed in the backward, not kept.
    loss_chunk: `train.loss_chunk_tokens`: the logits exist for that many target tokens at a time
    (in fp32; a bf16 run computes the loss whole).
    """
    if method not in ("full", "lora", "qlora"):
        raise ConfigError([f"method: {method!r} is not one of full, lora, qlora"])
    if dtype not in DTYPE_BYTES:
        raise ConfigError([f"dtype: {dtype!r} is not one of {', '.join(DTYPE_BYTES)}"])
    if shards < 1:
        raise ConfigError([f"processes: {shards} must be at least 1"])
    w = DTYPE_BYTES[dtype]
    h, i, kv, L = shape.hidden, shape.intermediate, shape.kv_width, shape.layers
    tokens = batch_size * seq_len
    parts: dict[str, float] = {}
    if method == "full":
        trainable = shape.params
        parts["weights"] = shape.params * w
        parts["gradients"] = shape.params * w
        # Two fp32 moments; bf16 training adds an fp32 master copy of the weights.
        parts["optimizer_states"] = shape.params * (8 + (4 if w < 4 else 0))
        per_token_layer = 8 * h + 4 * i + 2 * kv
    else:
        trainable = shape.adapter_params(lora_r, target_modules, dora)
        if method == "qlora":
            parts["weights"] = shape.linear_params * NF4_BYTES_PER_PARAM + (
                shape.params - shape.linear_params
            ) * max(w, 4)  # peft's prepare_model_for_kbit_training casts the rest to fp32
        else:
            parts["weights"] = shape.params * w
        # Adapters train in fp32 whatever the base's dtype: weights, gradients, two moments.
        parts["adapter_weights"] = trainable * 4
        parts["gradients"] = trainable * 4
        parts["optimizer_states"] = trainable * 8
        n_adapted, adapted_in = shape.adapted_inputs(target_modules)
        per_token_layer = 6 * h + 4 * i + 2 * kv + n_adapted * lora_r
        if lora_dropout > 0:
            per_token_layer += adapted_in * (1 + 1 / w)  # the dropped copy and its mask (1 byte)
    kept_per_layer = per_token_layer
    if lean:
        # act(gate) always. The product act(gate) * up and the two norm outputs only where something
        # kept them: LoRA dropout makes the adapters keep dropped copies of their inputs instead (a
        # frozen base keeps nothing), and bf16 autocast makes the projections keep bf16 copies of the
        # norm outputs (a GPU run's fp32 norms). Checked with saved_tensors_hooks on the default model.
        kept_per_layer -= i  # act(gate)
        if method == "full" or lora_dropout == 0:
            kept_per_layer -= i + (2 * h if dtype == "fp32" else 0)  # the product; the norm outputs
    if shards > 1:
        _shard(parts, shape, method, w, trainable, shards)
    act_bytes = w
    outside = 2 * h  # the embedding output and the final norm, once per token
    every = int(checkpointing)  # True: every layer; N: layers 0, N, 2N, ... (transformers' every_n_layers)
    recomputed = -(-L // every) if every else 0
    # A checkpointed layer keeps only its input, and one layer's full activations live again during
    # its backward (lean recipes stay out of checkpointed layers); the other layers keep everything.
    kept = recomputed * h + (L - recomputed) * kept_per_layer + (per_token_layer if recomputed else 0)
    parts["activations"] = tokens * (kept + outside) * act_bytes
    targets = max(1, round(tokens * target_fraction))
    # fp32 log-softmax, its gradient, the logits' gradient; chunked: of one chunk at a time. The chunked
    # loss runs only outside autocast (loss._chunkable), so a bf16 run holds the whole logits.
    chunk = loss_chunk if dtype == "fp32" and loss_chunk else targets
    parts["logits"] = 3 * min(targets, chunk) * shape.vocab * 4
    kind = "gpu" if device != "cpu" else "cpu"
    parts["allocator"] = ALLOCATOR_OVERHEAD[kind] * (parts["activations"] + parts["logits"])
    if method == "qlora" and kind == "cpu":
        parts["checkpoint_pages"] = shape.params * 4  # the whole fp32 file, read for quantization
    parts["runtime"] = RUNTIME_MB[kind] * MB
    return MemoryEstimate(
        model=shape.name,
        method=method,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        checkpointing=every,
        device=device,
        trainable_params=trainable,
        total_params=shape.params,
        parts=parts,
    )


def _shard(parts: dict[str, float], shape: ModelShape, method: str, w: int, trainable: int, n: int) -> None:
    """FSDP over `n` processes: the persistent states divided by n, plus what is gathered in full."""
    for k in ("weights", "adapter_weights", "gradients", "optimizer_states"):
        if k in parts:
            parts[k] /= n
    layer_linear = sum(i * o for _, i, o in shape.linear_shapes)
    layer_params = layer_linear + 2 * shape.hidden  # the linear weights and the two RMSNorms
    root_params = shape.params - shape.layers * layer_params  # embeddings, final norm, head
    if method == "qlora":
        layer_bytes = layer_linear * NF4_BYTES_PER_PARAM + 2 * shape.hidden * max(w, 4)
        root_bytes = root_params * max(w, 4)
    else:
        layer_bytes = layer_params * w
        root_bytes = root_params * w
    if method == "full":
        layer_grads = layer_params * w
    else:
        layer_bytes += trainable / shape.layers * 4  # the layer's adapters, fp32
        layer_grads = trainable / shape.layers * 4
    parts["gathered_weights"] = root_bytes + 2 * layer_bytes + layer_grads


def flops_per_token(shape: ModelShape, method: str) -> float:
    """Model FLOPs a training token: forward 2N + backward 2N through the activations, + 2N for the
    weight gradients of full fine-tuning (6N, Kaplan et al. 2020); adapters' own FLOPs are negligible."""
    return (6 if method == "full" else 4) * shape.params


def gpu_seconds(
    shape: ModelShape, method: str, tokens: float, tflops: float, mfu: float = ASSUMED_MFU
) -> float:
    """Training time on a GPU from FLOPs: an ASSUMPTION (stated peak x assumed MFU), not a measurement.
    QLoRA's dequantization makes it slower than this in practice."""
    return tokens * flops_per_token(shape, method) / (tflops * 1e12 * mfu)


def human_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    if s < 1:
        return "<1 s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
