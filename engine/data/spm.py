"""BEiT-3's text tokenisation: SentencePiece pieces through XLM-R's id mapping, as the published beit3 does it.

beit3 builds transformers' `XLMRobertaTokenizer` on its `beit3.spm`, then per text: `tokenize` (the
SentencePiece pieces), `convert_tokens_to_ids`, truncation to `max_len - 2`, `<s>` + ids + `</s>`, padding
with `<pad>`, and `padding_mask` 1 on padding. XLM-R's ids are fairseq's: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3,
and every other piece's SentencePiece id plus one; SentencePiece's own unknown (id 0) becomes `<unk>`.
The `sentencepiece` library reproduces the pieces exactly; the model file is the user's, never downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Union

import torch

from .raw import DataError

BOS, PAD, EOS, UNK = 0, 1, 2, 3
FAIRSEQ_OFFSET = 1


class SentencePieceTokenizer:
    """Texts to ``text_ids``, ``padding_mask`` (1 on padding) and ``text_masks`` (1 on tokens), int64 [B, max_len]."""

    def __init__(self, model: Union[str, Path], max_len: int = 64) -> None:
        import sentencepiece  # only BEiT-3 needs it

        path = Path(model)
        if not path.is_file():
            raise DataError(f"missing SentencePiece model {path}")
        if max_len < 2:
            raise ValueError(f"max_len must leave room for <s> and </s>, got {max_len}")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise DataError(f"{path}: not a SentencePiece model ({str(exc).strip().splitlines()[0]})") from None
        self.model, self.max_len = path, max_len
        self._unk = self._sp.unk_id()

    def ids(self, text: str) -> list:
        """<s>, the XLM-R ids of the text's pieces (cut to max_len - 2), </s>; no padding."""
        pieces = self._sp.encode(text)[: self.max_len - 2]
        unk = self._unk
        return [BOS] + [p + FAIRSEQ_OFFSET if p != unk else UNK for p in pieces] + [EOS]

    def count(self, text: str) -> int:
        """The text's length in tokens before truncation, <s> and </s> included."""
        return len(self._sp.encode(text)) + 2

    def __call__(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        rows = [self.ids(text) for text in texts]
        ids = torch.tensor([row + [PAD] * (self.max_len - len(row)) for row in rows], dtype=torch.int64)
        ids = ids.reshape(len(rows), self.max_len)  # also for no texts
        padding = (torch.arange(self.max_len) >= torch.tensor([len(row) for row in rows]).reshape(-1, 1)).long()
        return {"text_ids": ids, "padding_mask": padding, "text_masks": 1 - padding}
