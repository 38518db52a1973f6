"""Offline tools: read published VLMo and BEiT-3 checkpoints safely and cut them into tensor-parallel shards."""
