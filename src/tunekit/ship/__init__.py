"""Ship a fine-tune: export (merged safetensors, GGUF), serve (OpenAI-compatible), chat."""
