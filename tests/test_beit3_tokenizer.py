"""BEiT-3 tokenisation: SentencePiece pieces through XLM-R's ids, as golden/beit3/tokenization_expected.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _paths import GOLDEN, needs
from engine.data.raw import DataError
from engine.data.spm import SentencePieceTokenizer
from engine.models.beit3.config import BEiT3Config
from engine.models.vlmo.config import VLMoConfig
from engine.data.text import TextTokenizer
from engine.tasks.tokenizers import make_tokenizer

SPM = GOLDEN / "beit3" / "tokenizer.spm"
EXPECTED = GOLDEN / "beit3" / "tokenization_expected.json"

pytestmark = needs(EXPECTED)


def test_every_text_tokenises_as_published() -> None:
    expected = json.loads(EXPECTED.read_text())
    assert (expected["bos"], expected["pad"], expected["eos"], expected["unk"]) == (0, 1, 2, 3)
    tokenizer = SentencePieceTokenizer(SPM, expected["max_len"])
    got = tokenizer(expected["texts"])
    assert got["text_ids"].tolist() == expected["text_ids"]
    assert got["padding_mask"].tolist() == expected["padding_mask"]
    assert torch.equal(got["text_masks"], 1 - got["padding_mask"])
    # a long text is cut to max_len - 2 pieces between <s> and </s>
    assert any(row[-1] == 2 for row in expected["text_ids"])


def test_family_picks_the_tokenizer(tmp_path: Path) -> None:
    beit3 = BEiT3Config(embed_dim=64, depth=1, num_heads=4, ffn_dim=256, image_size=64, max_text_len=32)
    assert isinstance(make_tokenizer(beit3, SPM, None), SentencePieceTokenizer)
    assert make_tokenizer(beit3, SPM, None).max_len == 32
    with pytest.raises(DataError, match="--tokenizer"):
        make_tokenizer(beit3, None, None)
    vlmo = VLMoConfig(embed_dim=64, depth=1, num_heads=4, vlffn_start_layer_index=1, image_size=64,
                      relative_position_bias=False, abs_pos_embed=True, layer_scale=False)
    assert isinstance(make_tokenizer(vlmo, None, None), TextTokenizer)  # the shipped WordPiece stays the default
    bogus = tmp_path / "bogus.spm"
    bogus.write_text("not a model")
    with pytest.raises(DataError, match="bogus.spm"):
        SentencePieceTokenizer(bogus)
