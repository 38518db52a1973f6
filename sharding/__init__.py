"""Offline tools: read published VLMo checkpoints safely and cut them into tensor-parallel shards."""
