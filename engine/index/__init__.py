"""Image search over your own collections with a retrieval checkpoint (`python -m engine.index`).

sources: what is indexed (a folder walked recursively, or a benchmark split's arrow file); build: the hash,
embed (resumable, in chunks) and write passes; store: the on-disk index (FAISS vectors, per-image metadata, the
checkpoint's identity); search: queries embedded by the model and looked up.
"""
