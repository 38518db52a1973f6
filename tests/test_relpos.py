"""Relative-position indices against values worked out by hand from DESIGN.md §3."""
from __future__ import annotations

import torch

from engine.models.vlmo.config import VLMoConfig
from engine.models.vlmo.relpos import image_index, joint_index, text_index

# W = 2 patches a side: Nr = (2·2-1)² + 3 = 12; T0 = 3 → R = 12 + 6 + 2 = 20; T = 4.
CFG = VLMoConfig(embed_dim=8, depth=1, num_heads=2, vlffn_start_layer_index=1, image_size=32,
                 relative_position_bias=True, abs_pos_embed=False, layer_scale=False,
                 max_text_len=4, max_text_len_of_initckpt=3)


def test_sizes() -> None:
    assert (CFG.grid, CFG.num_image_tokens, CFG.num_image_distances, CFG.rel_table_rows) == (2, 5, 12, 20)


def test_image_index_by_hand() -> None:
    # patches p=(h,w): 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1); index = (h1-h2+1)·3 + (w1-w2+1)
    patches = [[4, 3, 1, 0],
               [5, 4, 2, 1],
               [7, 6, 4, 3],
               [8, 7, 5, 4]]
    expected = torch.tensor([[11] + [9] * 4] + [[10] + row for row in patches])
    assert torch.equal(image_index(CFG), expected)


def test_text_index_by_hand() -> None:
    # i, j ≥ 1: (j - i) + T0 + Nr = j - i + 15; row 0 = R-3 = 17, column 0 = R-2 = 18, [0,0] = R-1 = 19
    expected = torch.tensor([[19, 17, 17, 17],
                             [18, 15, 16, 17],
                             [18, 14, 15, 16],
                             [18, 13, 14, 15]])
    assert torch.equal(text_index(CFG), expected)


def test_joint_index_blocks() -> None:
    joint = joint_index(CFG)
    T = CFG.max_text_len
    assert joint.shape == (T + 5, T + 5)
    assert torch.equal(joint[:T, :T], text_index(CFG))
    assert torch.equal(joint[T:, T:], image_index(CFG))
    assert (joint[:T, T:] == 12).all() and (joint[T:, :T] == 13).all()  # Nr, Nr + 1
    assert int(joint.max()) < CFG.rel_table_rows
