"""Speed and memory pieces of training, each exact against the plain path (tested) or not used:
lean activations, the fused LoRA node, padding-free batches, per-layer torch.compile."""
