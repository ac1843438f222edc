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


def vocabulary_size(path: str) -> int:
    """Number of ids of a vocabulary: a line-per-id file (`ja-swe36k.txt`) or a SentencePiece `.model`."""
    if path.endswith(".model"):
        return load_tokenizer("sentencepiece", path).vocab_size
    from gptsan.tokenizer.swe import read_vocabulary

    return len(read_vocabulary(path))


def with_vocabulary_size(model_params: dict, vocabulary: str | None) -> dict:
    """`model_params` with num_vocabulary set to `--vocabulary`'s size where it has none (the original's
    parameter files have none: its tools read the vocabulary); a different size is an error."""
    model_params = dict(model_params)
    if vocabulary:
        size = vocabulary_size(vocabulary)
        if model_params.setdefault("num_vocabulary", size) != size:
            raise UserError(f"--vocabulary: {vocabulary} has {size} ids, but model_params.num_vocabulary "
                            f"is {model_params['num_vocabulary']}")
    return model_params


__all__ = ["KINDS", "SpecialIds", "Tokenizer", "load_tokenizer", "vocabulary_size", "with_vocabulary_size"]
