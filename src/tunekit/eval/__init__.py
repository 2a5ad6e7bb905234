"""Held-out evaluation: the base model against the fine-tuned one on the same test examples."""
