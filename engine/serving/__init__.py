"""The HTTP inference server (engine.serve): request parsing and preprocessing, the dynamic batcher that feeds
the tensor-parallel group, the per-task model calls, the FastAPI app, metrics and the web page."""
