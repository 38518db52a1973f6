"""BEiT-3 (microsoft/unilm `beit3`, torchscale's Multiway encoder): the family's declaration."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...data.raw import DataError
from ...data.spm import SentencePieceTokenizer
from ..base import Family, Head, TextIds
from .config import PREFIX, BEiT3Config
from .infer import infer_config, recognises
from .model import BEiT3


def tokenizer(cfg: BEiT3Config, tokenizer_path: Optional[Path], vocab: Optional[Path]) -> SentencePieceTokenizer:
    """The SentencePiece model the checkpoint was trained with (beit3.spm), which the user passes."""
    if vocab is not None:
        raise DataError("--vocab names a WordPiece vocabulary (VLMo); BEiT-3 reads its SentencePiece model: "
                        "pass --tokenizer beit3.spm")
    if tokenizer_path is None:
        raise DataError("BEiT-3 checkpoints read text through the SentencePiece model they were trained with: "
                        "pass --tokenizer beit3.spm")
    return SentencePieceTokenizer(tokenizer_path, cfg.max_text_len)


FAMILY = Family(
    name="beit3", title="BEiT-3", config=BEiT3Config, model=BEiT3, recognises=recognises, infer_config=infer_config,
    tokenizer=tokenizer, text_mask_input="padding_mask",  # beit3's convention: 1 on padding
    heads={"vqa": Head("pooler, head", "beit3_base_patch16_480_vqa.pth"),
           "nlvr2": Head("head", "beit3_base_patch16_224_nlvr2.pth"),
           "irtr": Head("vision_head, language_head", "beit3_base_patch16_384_coco_retrieval.pth")},
    text_ids=TextIds(first=0, last=2, pad=1, lowest=4),  # XLM-R <s>, </s>, <pad>; ids 0-3 are special
    unused_tensors=(PREFIX + "vision_embed.mask_token",), overrides=("num_heads", "image_size", "max_text_len"),
    example=BEiT3Config(embed_dim=64, depth=2, num_heads=4, ffn_dim=256, image_size=32, vqa_labels=2))
