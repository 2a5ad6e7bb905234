"""Where each speed piece is exact: the architectures tests/test_architectures.py verifies, and the
reason a piece stays off for a model.

The pieces rewrite parts of a model's computation (what autograd keeps, the LoRA layers' nodes, the
attention of packed rows, the output projection), so each is used only where it was shown to give the
plain model's values: on the architectures of `VERIFIED`, and there only where the model's own
settings keep it exact (e.g. attention soft-capping, which the padding-free kernel does not compute).
Any other architecture trains on the plain transformers and PEFT path, with a one-line note: slower,
never a different answer.
"""

from __future__ import annotations

from tunekit.models.load import unwrap_peft

# model_type (config.json) -> the family name the note and the README's matrix use. Each is built as a
# tiny model and every piece checked against the plain path in tests/test_architectures.py.
VERIFIED: dict[str, str] = {
    "llama": "Llama (and SmolLM)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3 / Phi-4",
}

# Config attributes that transform the logits after the output projection (soft-capping, scaling):
# the loss that projects only target positions (train/loss.py) would leave them out.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def model_type(model) -> str:
    """The model_type of a transformers model (PEFT-wrapped or not); "" where it has no config."""
    cfg = getattr(unwrap_peft(model), "config", None)
    return getattr(cfg, "model_type", "") or ""


def unverified(model) -> str | None:
    """Why no speed piece applies to `model`'s architecture; None where it is a verified one."""
    kind = model_type(model)
    if kind in VERIFIED:
        return None
    return f"architecture {kind or type(unwrap_peft(model)).__name__!r} is not one tunekit verified its speed pieces on"


def padding_free_reason(model) -> str | None:
    """Why padding-free batches would not be exact for `model`; None where they are."""
    base = unwrap_peft(model)
    cfg = getattr(base, "config", None)
    if (why := unverified(model)) is not None:
        return why
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", "tunekit_padding_free"):  # padding_free.NAME: already switched
        return f"attention runs as {impl!r}, not sdpa"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logits are soft-capped, which the segment kernel does not compute"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "attention is bidirectional"
    if not getattr(base, "_supports_attention_backend", False):
        return "its layers do not pass the segments down to attention"
    return None


def head_split_reason(model) -> str | None:
    """Why the loss must take the whole model's logits rather than project only target positions
    itself (train/loss.py); None where the split into decoder and head gives the same logits."""
    if (why := unverified(model)) is not None:
        return why
    cfg = getattr(unwrap_peft(model), "config", None)
    for name in LOGIT_TRANSFORMS:
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            return f"its logits are transformed after the projection ({name})"
    return None
