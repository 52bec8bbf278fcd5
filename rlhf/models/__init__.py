"""Model loading, LoRA and the quickstart model preparation."""
