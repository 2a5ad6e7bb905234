"""Where a tunekit LoRA training step spends its time, and two levers tried against it.

Run as: python bench/step_anatomy.py profile   # torch.profiler over steps 2-5 (alpaca, batch 4)
        python bench/step_anatomy.py fused     # tokens/s, PEFT's LoRA forward against tunekit's fused node
        python bench/step_anatomy.py sdpa      # SDPA flash against math, one layer's shapes

The data and model are those of bench/train_throughput.py (alpaca, batch 4, the default model, LoRA
r16, tunekit's defaults: lean activations, the loss chunked 256 target tokens at a time, the fused
LoRA node). `fused` times PEFT's own `lora.Linear` forward against tunekit's fused node
(train/speed/fused_lora.py). Until 2026-11-24 that mode was `addmm`, timing a prototype of the node that
kept PEFT's backward (BENCHMARKS.md "Session 8" quotes it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_throughput as tt  # noqa: E402

BATCH = 4


def model_and_step(steps: int, fused: bool = True):
    from tunekit.data.tokenize import TokenizedExample
    from tunekit.models import load_model, load_tokenizer, resolve_model
    from tunekit.train.batching import collate
    from tunekit.train.recipes.sft import accumulate_gradients
    from tunekit.train.setup import add_lora
    from tunekit.train.speed.fused_lora import unfuse_lora_layers
    from tunekit.train.speed.lean import enable_lean_activations

    torch.set_num_threads(2)
    seqs = tt.training_sequences("alpaca", 80, steps, BATCH, tt.MODEL, tt.SHARED_DATA)
    model = add_lora(load_model(resolve_model(tt.MODEL)), tt.lora_settings(0.0), tt.SEED)
    if not fused:
        unfuse_lora_layers(model)
    enable_lean_activations(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tt.LEARNING_RATE)
    pad = load_tokenizer(resolve_model(tt.MODEL)).pad_token_id
    examples = [TokenizedExample(s["input_ids"], s["labels"]) for s in seqs]

    def step(i: int) -> float:
        loss = accumulate_gradients(model, [collate(examples[i * BATCH : (i + 1) * BATCH], pad)], 256)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return seqs, step


def profile() -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, step = model_and_step(5)
    step(0)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(1, 5):
            step(i)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    mms = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::mm"]
    rank = sum(e.self_cpu_time_total for e in mms if tt.LORA_R in [d for s in e.input_shapes for d in s])
    total = sum(e.self_cpu_time_total for e in mms)
    print(f"aten::mm {total / 1e6:.2f} s, of which with a rank-{tt.LORA_R} dimension {rank / 1e6:.2f} s")


def fused(steps: int = 12) -> None:
    for round_ in range(2):
        for on in (False, True):
            seqs, step = model_and_step(steps, fused=on)
            losses, ends = [], []
            for i in range(steps):
                losses.append(step(i))
                ends.append(time.perf_counter())
            tokens = sum(len(s["input_ids"]) for s in seqs[BATCH:])
            print(
                f"round {round_ + 1} {'fused' if on else 'peft '}: {tokens / (ends[-1] - ends[0]):.1f} tokens/s"
                f" over steps 2-{steps}; losses {' '.join(f'{x:.4f}' for x in losses)}"
            )


def sdpa() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.set_num_threads(2)
    B, H, T, D = BATCH, 9, 200, 64  # the default model's 9 heads of 64, alpaca-length rows
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T).clone()
    mask[0, :, :, 180:] = False  # one padded row
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
        times = []
        for _ in range(12):
            t = time.perf_counter()
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
            times.append(time.perf_counter() - t)
        print(f"{backend.name}: {sorted(times)[6] * 1e3:.1f} ms forward + backward (median of 12)")


if __name__ == "__main__":
    {"profile": profile, "fused": fused, "sdpa": sdpa}[sys.argv[1] if len(sys.argv) > 1 else "profile"]()
