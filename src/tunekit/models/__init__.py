"""Model specs: the embedded default alias, a local Hugging Face folder, or a hub id."""

from tunekit.models.load import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model, tunekit_home

__all__ = ["DEFAULT_MODEL", "load_model", "load_tokenizer", "resolve_model", "tunekit_home"]
