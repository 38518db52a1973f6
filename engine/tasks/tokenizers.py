"""The text tokenizer a task front end uses: the checkpoint family's (VLMo: WordPiece, BEiT-3: SentencePiece)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import click

from ..models import ModelConfig, family_of
from ..data.raw import DataError
from ..models.base import Tokenizer


def tokenizer_option(only_with: Optional[str] = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--tokenizer: the checkpoint family's tokenizer file. A command that reads text takes it (BEiT-3: required),
    beside --vocab; one whose own inputs hold no text (token ids, synthetic inputs) needs it only to read the text
    of the file another option names: `only_with` is that option."""
    needed = "required" if only_with is None else f"needed only with {only_with}, whose texts it tokenises"
    vocab = ", like --vocab" if only_with is None else ""
    return click.option(
        "--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
        help=f"BEiT-3: its SentencePiece model (beit3.spm; {needed}). VLMo: a WordPiece vocabulary{vocab} "
             f"[default: bert-base-uncased, shipped with the engine].")


def make_tokenizer(cfg: ModelConfig, tokenizer_path: Optional[Path], vocab: Optional[Path]) -> Tokenizer:
    """The tokenizer for checkpoints of cfg's family, padding to its text length, checked against the checkpoint."""
    tokenizer = family_of(cfg).tokenizer(cfg, tokenizer_path, vocab)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(f"{tokenizer.file}: gives token ids up to {tokenizer.vocab_size - 1} but the checkpoint's "
                        f"text embedding has {cfg.vocab_size} rows (ids 0 to {cfg.vocab_size - 1}): pass the "
                        f"tokenizer the checkpoint was trained with")
    return tokenizer
