"""A SentencePiece model with GPTSAN's roles, for users who train their own vocabulary.

`train_sentencepiece` reserves the role pieces (and the clean-text tags) as user-defined symbols, so
each role has a fixed id right after `<unk>` (id 0): `<|startoftext|>` 1, `<|segmenter|>` 2, ... in the
order of `RESERVED_PIECES`. Newline and tab are written as `<BR>` and `<TAB>` before SentencePiece sees the
text (its normaliser would fold them into spaces), and decoded back. Training defaults suit Japanese:
NFKC normalisation, character coverage 0.9995, byte fallback, no dummy-prefix space, digits split.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

from gptsan import storage
from gptsan.errors import UserError
from gptsan.tokenizer.base import SpecialIds, Tokenizer
from gptsan.tokenizer.cleaning import clean_text
from gptsan.tokenizer.swe import ROLE_PIECES

CLEAN_TEXT_TAGS = ("<TAB>", "<URL>", "<EMAIL>", "<TEL>", "<DATE>", "<PRICE>", "<BLOCK>")
RESERVED_PIECES = tuple(ROLE_PIECES.values()) + CLEAN_TEXT_TAGS
DECODED_TAGS = {"<BR>": "\n", "<TAB>": "\t"}
MODEL_TYPES = ("unigram", "bpe", "char", "word")
MIN_CHARACTER_COVERAGE = 0.98


def _to_pieces_text(text: str) -> str:
    return text.replace("\r\n", "<BR>").replace("\n", "<BR>").replace("\r", "<BR>").replace("\t", "<TAB>")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str, clean_text: bool = False):
        import sentencepiece as spm

        try:
            serialized = storage.read_bytes(model_file)
        except FileNotFoundError:
            raise UserError(f"{model_file}: SentencePiece model not found") from None
        except IsADirectoryError:
            raise UserError(f"{model_file}: is a folder; expected a SentencePiece .model file") from None
        self.model_file, self.clean_text = str(model_file), clean_text
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(serialized)
        except (OSError, RuntimeError) as err:
            raise UserError(f"{model_file}: not a SentencePiece model ({err})") from None
        self.vocab_size = self.sp.GetPieceSize()
        roles = {role: self._reserved_id(piece) for role, piece in ROLE_PIECES.items()}
        self.special = SpecialIds(**roles)
        self._decoded_tag = {self.sp.PieceToId(p): text for p, text in DECODED_TAGS.items()}

    def _reserved_id(self, piece: str) -> int:
        token_id = self.sp.PieceToId(piece)
        if token_id == self.sp.unk_id() or self.sp.IdToPiece(token_id) != piece:
            hint = "train the model with tools/train_tokenizer.py"
            raise UserError(f"{self.model_file}: no reserved piece {piece} ({hint})")
        return token_id

    @property
    def unknown_ids(self) -> tuple[int, ...]:
        return (self.sp.unk_id(),)

    def _is_plain_id(self, token_id: int) -> bool:
        sp = self.sp
        return not (sp.IsByte(token_id) or sp.IsControl(token_id) or sp.IsUnknown(token_id)
                    or token_id in self.special.control_ids)

    def encode(self, text: str, clean: bool | None = None) -> list[int]:
        clean = self.clean_text if clean is None else clean
        text = _to_pieces_text(text)
        return self.sp.EncodeAsIds(clean_text(text) if clean else text)

    def decode(self, ids: Sequence[int]) -> str:
        words: list[str] = []
        run: list[int] = []
        for token_id in map(int, ids):
            if not 0 <= token_id < self.vocab_size:
                raise UserError(f"token id {token_id}: outside the vocabulary (0..{self.vocab_size - 1})")
            if token_id in self.special.control_ids or token_id in self._decoded_tag:
                if run:
                    words.append(self._decode_run(run))
                words.append(self._decode_role(token_id, run, words))
                run = []
            else:
                run.append(token_id)
        if run:
            words.append(self._decode_run(run))
        return "".join(words)

    def _decode_run(self, run: list[int]) -> str:
        """Text of plain pieces. A model trained on text without spaces has no `▁` piece, so a space is encoded
        as the three byte pieces of `▁` (U+2581, SentencePiece's space mark), which SentencePiece decodes to
        that mark rather than to the space it stands for."""
        return self.sp.DecodeIds(run).replace("\u2581", " ")

    def _decode_role(self, token_id: int, run: list[int], words: list[str]) -> str:
        if token_id in self._decoded_tag:
            return self._decoded_tag[token_id]
        if token_id == self.special.bag:  # the previous piece three more times
            last = self._decode_run(run[-1:]) if run else (words[-1] if words else "")
            return last * 3
        return ""


def read_training_lines(paths: Iterable[str], text_field: str = "text") -> Iterable[str]:
    """Non-empty lines of UTF-8 `.txt` files, or of the `text_field` of each `.jsonl` record (a leading BOM
    is dropped)."""
    for path in paths:
        try:
            with storage.open_file(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig") as f:
                for line_number, line in enumerate(f, start=1):
                    if path.endswith(".jsonl"):
                        line = _jsonl_text(path, line_number, line, text_field)
                    for piece in line.splitlines():
                        if piece.strip():
                            yield piece.strip()
        except FileNotFoundError:
            raise UserError(f"{path}: file not found") from None
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 (offset {err.start})") from None


def _jsonl_text(path: str, line_number: int, line: str, text_field: str) -> str:
    if not line.strip():
        return ""
    try:
        value = json.loads(line)[text_field]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}:{line_number}: expected a JSON object with a {text_field!r} field") from None
    if not isinstance(value, str):
        raise UserError(f"{path}:{line_number}: {text_field!r} is not a string")
    return value


def train_sentencepiece(paths: Sequence[str], model_prefix: str, *, vocab_size: int = 32000,
                        model_type: str = "unigram", character_coverage: float = 0.9995,
                        text_field: str = "text", max_sentences: int = 2_000_000, log=None) -> str:
    """Train a model from text/jsonl files; returns the `.model` path."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise UserError(f"--model_type: expected one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if vocab_size <= len(RESERVED_PIECES) + 256 + 1:
        raise UserError(f"--vocab_size: must exceed {len(RESERVED_PIECES) + 257} (reserved + byte pieces)")
    if not MIN_CHARACTER_COVERAGE <= character_coverage <= 1:  # SentencePiece's own "INTERNAL: ..." line otherwise
        raise UserError(f"--character_coverage: expected {MIN_CHARACTER_COVERAGE} to 1 (SentencePiece's range), "
                        f"got {character_coverage}")
    with tempfile.TemporaryDirectory(prefix="gptsan-spm-") as tmp:
        corpus = os.path.join(tmp, "sentences.txt")
        with open(corpus, "w", encoding="utf-8") as out:
            count = 0
            for line in read_training_lines(paths, text_field):
                out.write(_to_pieces_text(line) + "\n")
                count += 1
        if count == 0:
            raise UserError("--input_files: no text to train on")
        trained = os.path.join(tmp, "trained")  # moved beside model_prefix only once training succeeded
        try:
            with open(os.devnull, "w") as devnull:
                spm.SentencePieceTrainer.Train(
                    input=corpus, model_prefix=trained, vocab_size=vocab_size, model_type=model_type,
                    character_coverage=character_coverage, byte_fallback=True,
                    user_defined_symbols=list(RESERVED_PIECES), unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
                    remove_extra_whitespaces=False, split_digits=True, input_sentence_size=max_sentences,
                    shuffle_input_sentence=True, hard_vocab_limit=False, logstream=log or devnull,
                )
        except RuntimeError as err:
            raise UserError(f"sentencepiece training failed: {err}") from None
        os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
        for suffix in (".vocab", ".model"):  # the .model last: its presence means both are whole
            partial = f"{model_prefix}{suffix}.partial-{os.getpid()}"
            try:
                shutil.copyfile(trained + suffix, partial)
                os.replace(partial, model_prefix + suffix)
            finally:
                if os.path.exists(partial):
                    os.remove(partial)
    return model_prefix + ".model"
