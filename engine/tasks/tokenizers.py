"""The text tokenizer a task front end uses: the checkpoint family's (VLMo: WordPiece, BEiT-3: SentencePiece)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import click

from ..models import ModelConfig, family_of
from ..models.base import Tokenizer


def tokenizer_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--tokenizer: the checkpoint family's tokenizer file."""
    return click.option(
        "--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
        help="BEiT-3: its SentencePiece model (beit3.spm; required). VLMo: a WordPiece vocabulary, like --vocab "
             "[default: bert-base-uncased, shipped with the engine].")(command)


def make_tokenizer(cfg: ModelConfig, tokenizer_path: Optional[Path], vocab: Optional[Path]) -> Tokenizer:
    """The tokenizer for checkpoints of cfg's family, padding to its text length."""
    return family_of(cfg).tokenizer(cfg, tokenizer_path, vocab)
