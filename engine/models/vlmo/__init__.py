"""VLMo (microsoft/unilm `vlmo`): the family's declaration."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...data.raw import DataError
from ...data.text import TextTokenizer
from ..base import Family, Head, TextIds
from .config import VLMoConfig
from .infer import infer_config, recognises
from .model import VLMo


def tokenizer(cfg: VLMoConfig, tokenizer_path: Optional[Path], vocab: Optional[Path]) -> TextTokenizer:
    """bert-base-uncased WordPiece (shipped), or the vocabulary given by --tokenizer or --vocab."""
    if tokenizer_path is not None and vocab is not None:
        raise DataError("pass the WordPiece vocabulary once, with --tokenizer or --vocab")
    return TextTokenizer(tokenizer_path or vocab, cfg.max_text_len)


HEADS = {"vqa": Head("vqa_classifier", "vlmo_base_patch16_480_vqa.pt"),
         "nlvr2": Head("nlvr2_classifier", "vlmo_base_patch16_384_nlvr2.pt"),
         "irtr": Head("itc_text_proj, itc_image_proj", "vlmo_base_patch16_384_coco.pt")}
EXAMPLE = VLMoConfig(embed_dim=64, depth=2, num_heads=4, vlffn_start_layer_index=1, image_size=32,
                     relative_position_bias=True, abs_pos_embed=False, layer_scale=True, vqa_labels=2)

FAMILY = Family(
    name="vlmo", title="VLMo", config=VLMoConfig, model=VLMo, recognises=recognises, infer_config=infer_config,
    tokenizer=tokenizer, heads=HEADS, example=EXAMPLE, text_mask_input="text_masks",
    text_ids=TextIds(first=101, last=102, pad=0, lowest=1000),  # bert-base-uncased [CLS], [SEP], [PAD]
    unused_tensors=("text_embeddings.position_ids",),
    overrides=("num_heads", "image_size", "max_text_len", "vlffn_start_layer_index"))
