"""Tokenizers with GPTSAN's special-token roles: SWE (the released vocabulary) and SentencePiece."""

from __future__ import annotations

from gptsan.errors import UserError
from gptsan.tokenizer.base import SpecialIds, Tokenizer

KINDS = ("swe", "sentencepiece")


def load_tokenizer(
    kind: str, path: str, *, emoji_file: str | None = None, clean_text: bool = False
) -> Tokenizer:
    """`kind` "swe": `path` is `ja-swe36k.txt` (emoji.json beside it unless `emoji_file`);
    "sentencepiece": `path` is a `.model` file made by `tools/train_tokenizer.py`."""
    if kind == "swe":
        from gptsan.tokenizer.swe import SWETokenizer

        return SWETokenizer(path, emoji_file=emoji_file, clean_text=clean_text)
    if kind == "sentencepiece":
        from gptsan.tokenizer.sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer(path, clean_text=clean_text)
    raise UserError(f"--tokenizer: expected one of {', '.join(KINDS)}, got {kind!r}")


__all__ = ["KINDS", "SpecialIds", "Tokenizer", "load_tokenizer"]
