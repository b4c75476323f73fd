"""Stage 4: the density model: per-task adapters and LoRA experts around the shared flow; loss; model files."""
