"""bert-base-uncased WordPiece tokenisation as the published pipeline does it.

The published code calls HuggingFace ``BertTokenizer`` (lower-cased) with
``padding="max_length", truncation=True, max_length=40``: ``[CLS] ... [SEP]``,
cut to 40 tokens, then padded with [PAD] (id 0) and mask 0.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tokenizers import BertWordPieceTokenizer

from .raw import DataError

DEFAULT_VOCAB = Path(__file__).resolve().parent / "vocab" / "bert-base-uncased-vocab.txt"
MAX_TEXT_LEN = 40
# The tokens the published tokenisation writes (and pads with, and maps unknown pieces to).
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")


class TextTokenizer:
    """Texts to ``text_ids`` and ``text_masks`` (int64, [B, max_len])."""

    def __init__(self, vocab: Optional[Union[str, Path]] = None, max_len: int = MAX_TEXT_LEN) -> None:
        path = Path(vocab) if vocab is not None else DEFAULT_VOCAB
        if not path.is_file():
            raise DataError(f"missing vocabulary file {path}")
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        self.vocab = self.file = path
        self.max_len = max_len
        self.vocab_size = _check_vocabulary(path)
        try:
            self._tokenizer = BertWordPieceTokenizer(str(path), lowercase=True)
        except Exception as exc:  # the tokenizers library's own errors carry no file name
            raise DataError(f"{path}: not a usable WordPiece vocabulary ({exc})") from None
        self._tokenizer.enable_truncation(max_length=max_len)
        self._tokenizer.enable_padding(length=max_len, pad_id=self._tokenizer.token_to_id("[PAD]"))

    @cached_property
    def _untruncated(self) -> BertWordPieceTokenizer:
        # Only the server counts what truncation cut; evaluation never builds this second tokenizer.
        return BertWordPieceTokenizer(str(self.vocab), lowercase=True)

    def count(self, text: str) -> int:
        """The text's length in tokens before truncation, [CLS] and [SEP] included."""
        return len(self._untruncated.encode(text).ids)

    def __call__(self, texts: Sequence[str]) -> dict:
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = [e.ids for e in encodings]
        masks = [e.attention_mask for e in encodings]
        # reshape keeps [0, max_len] for an empty batch
        return {
            "text_ids": torch.tensor(ids, dtype=torch.int64).reshape(-1, self.max_len),
            "text_masks": torch.tensor(masks, dtype=torch.int64).reshape(-1, self.max_len),
        }


def _check_vocabulary(path: Path) -> int:
    """The number of tokens of a WordPiece vocabulary file (one token a line), after checking that it is one."""
    data = path.read_bytes()
    try:
        tokens = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        kind = "a SentencePiece model (BEiT-3's tokenizer)" if _is_sentencepiece(path) else "binary data"
        raise DataError(f"{path}: not a WordPiece vocabulary (one token a line, UTF-8 text) but {kind}; VLMo "
                        f"checkpoints take the vocabulary they were trained with, such as bert-base-uncased's "
                        f"vocab.txt") from None
    missing = [token for token in SPECIAL_TOKENS if token not in set(tokens)]
    if missing:
        raise DataError(f"{path}: not a BERT WordPiece vocabulary: it lacks {', '.join(missing)} (of "
                        f"{len(tokens)} lines), which the published tokenisation writes")
    return len(tokens)


def _is_sentencepiece(path: Path) -> bool:
    try:
        import sentencepiece

        sentencepiece.SentencePieceProcessor(model_file=str(path))
        return True
    except Exception:
        return False
