"""Checkpoint formats and inputs: Hub download, key tables, config.json, loading and saving,
GGUF language models, and the processor (images and prompts in, token ids out)."""
