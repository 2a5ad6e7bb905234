"""Where a tunekit LoRA training step spends its time, and two levers tried against it.

Run as: python bench/step_anatomy.py profile   # torch.profiler over steps 2-5 (alpaca, batch 4)
        python bench/step_anatomy.py addmm     # tokens/s, PEFT's LoRA forward against one addmm
        python bench/step_anatomy.py sdpa      # SDPA flash against math, one layer's shapes

The data and model are those of bench/train_throughput.py (alpaca, batch 4, the default model, LoRA
r16, tunekit's defaults: lean activations, the loss chunked 256 target tokens at a time). `addmm`
replaces the forward of PEFT's `lora.Linear` (plain LoRA, no dropout, one active adapter; anything
else falls back to PEFT) by `addmm(base(x), lora_A(x), lora_B.T, alpha=scaling)`: the same values,
without the separate multiply and add over every output. A prototype, not part of tunekit.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_throughput as tt  # noqa: E402

BATCH = 4


def addmm_forward(self, x, *args, **kwargs):
    import peft.tuners.lora.layer as lora

    a = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    plain = (
        a is not None
        and not (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None)
        and a not in self.lora_variant
        and isinstance(self.lora_dropout[a], torch.nn.Identity)
        and self.base_layer.bias is None
    )
    if not plain:
        return lora.Linear.forward(self, x, *args, **kwargs)
    A, B = self.lora_A[a].weight, self.lora_B[a].weight
    out = torch.nn.functional.linear(x, self.base_layer.weight).view(-1, B.shape[0])
    h = torch.nn.functional.linear(x, A).view(-1, A.shape[0])
    return torch.addmm(out, h, B.t(), alpha=self.scaling[a]).view(*x.shape[:-1], -1)


def model_and_step(steps: int, addmm: bool):
    import peft.tuners.lora.layer as lora

    from tunekit.data.tokenize import TokenizedExample
    from tunekit.models import load_model, load_tokenizer, resolve_model
    from tunekit.train.batching import collate
    from tunekit.train.lean import enable_lean_activations
    from tunekit.train.sft import accumulate_gradients, add_lora

    torch.set_num_threads(2)
    seqs = tt.training_sequences("alpaca", 80, steps, BATCH, tt.MODEL, tt.SHARED_DATA)
    model = add_lora(load_model(resolve_model(tt.MODEL)), tt.lora_settings(0.0), tt.SEED)
    if addmm:
        for m in model.modules():
            if isinstance(m, lora.Linear):
                m.forward = types.MethodType(addmm_forward, m)
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

    _, step = model_and_step(5, addmm=False)
    step(0)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(1, 5):
            step(i)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    mms = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::mm"]
    rank = sum(e.self_cpu_time_total for e in mms if tt.LORA_R in [d for s in e.input_shapes for d in s])
    total = sum(e.self_cpu_time_total for e in mms)
    print(f"aten::mm {total / 1e6:.2f} s, of which with a rank-{tt.LORA_R} dimension {rank / 1e6:.2f} s")


def addmm(steps: int = 12) -> None:
    for round_ in range(2):
        for fused in (False, True):
            seqs, step = model_and_step(steps, addmm=fused)
            losses, ends = [], []
            for i in range(steps):
                losses.append(step(i))
                ends.append(time.perf_counter())
            tokens = sum(len(s["input_ids"]) for s in seqs[BATCH:])
            print(
                f"round {round_ + 1} {'addmm' if fused else 'peft '}: {tokens / (ends[-1] - ends[0]):.1f} tokens/s"
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
    {"profile": profile, "addmm": addmm, "sdpa": sdpa}[sys.argv[1] if len(sys.argv) > 1 else "profile"]()
