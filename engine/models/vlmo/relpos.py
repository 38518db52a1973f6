"""Relative-position index matrices (DESIGN.md §3): which table row biases each (query, key) pair.

Nr = (2W-1)² + 3 image distances, then 2·T0 text distances, then 2 text CLS rows
and the text [0,0] row; R = Nr + 2·T0 + 2 rows in all.
"""
from __future__ import annotations

import torch

from .config import VLMoConfig


def image_index(cfg: VLMoConfig) -> torch.Tensor:
    """[n, n] for the CLS token followed by W×W patches."""
    W, Nr = cfg.grid, cfg.num_image_distances
    rows, cols = torch.meshgrid(torch.arange(W), torch.arange(W), indexing="ij")
    h, w = rows.flatten(), cols.flatten()
    patches = (h[:, None] - h[None, :] + W - 1) * (2 * W - 1) + (w[:, None] - w[None, :] + W - 1)
    index = torch.empty(W * W + 1, W * W + 1, dtype=torch.long)
    index[1:, 1:] = patches
    index[0, :] = Nr - 3  # CLS as query
    index[:, 0] = Nr - 2  # CLS as key
    index[0, 0] = Nr - 1
    return index


def text_index(cfg: VLMoConfig) -> torch.Tensor:
    """[T, T]: distance j - i between text tokens, the first token handled like CLS."""
    T, R = cfg.max_text_len, cfg.rel_table_rows
    positions = torch.arange(1, T)
    index = torch.empty(T, T, dtype=torch.long)
    index[1:, 1:] = positions[None, :] - positions[:, None] + cfg.max_text_len_of_initckpt + cfg.num_image_distances
    index[0, :] = R - 3
    index[:, 0] = R - 2
    index[0, 0] = R - 1
    return index


def joint_index(cfg: VLMoConfig) -> torch.Tensor:
    """[T+n, T+n]: text block, image block, and one shared row for each cross direction."""
    T, n, Nr = cfg.max_text_len, cfg.num_image_tokens, cfg.num_image_distances
    index = torch.empty(T + n, T + n, dtype=torch.long)
    index[:T, :T] = text_index(cfg)
    index[T:, T:] = image_index(cfg)
    index[:T, T:] = Nr  # text queries, image keys
    index[T:, :T] = Nr + 1  # image queries, text keys
    return index


INDEX_BUILDERS = {"text": text_index, "image": image_index, "joint": joint_index}
