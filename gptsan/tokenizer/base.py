"""The interface every gptsan tokenizer offers: encode, decode, and the ids of the special roles.

The roles are GPTSAN's: start of text, segmenter (end of the prefix), separator (sentence punctuation in
training inputs), input mask, not-a-token (padding), bag of tokens (a run of 3+), end of text, newline.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gptsan.errors import UserError

# Sentence punctuation (the original's set): in a model's inputs it appears as `<|separator|>`, as in the
# training data's `x`; the text (and the targets) keep the punctuation.
SENTENCE_PUNCTUATION = "。｡．.？！?!:：;；"


def check_utf8_text(flag: str, text: str) -> None:
    """Command-line text that was not UTF-8 reaches Python as lone surrogates (one per byte), which the
    tokenizers cannot take (SentencePiece: a traceback; SWE: byte tokens of the surrogates, not of the text) nor
    the JSON output: one error line naming the flag and the first such byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = ord(text[err.start])
        byte = f"byte {bad - 0xDC00:#04x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        raise UserError(f"{flag}: not UTF-8 text ({byte} at character {err.start})") from None


@dataclass(frozen=True)
class SpecialIds:
    """The id of each GPTSAN role in one vocabulary."""

    start: int
    segmenter: int
    separator: int
    mask: int
    nottoken: int
    bag: int
    end: int
    newline: int

    @property
    def pad(self) -> int:
        return self.nottoken

    @functools.cached_property
    def control_ids(self) -> frozenset[int]:
        """Every role but the newline, which is ordinary text."""
        return frozenset(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "newline")


def _role_id(role: str) -> property:
    return property(lambda self: getattr(self.special, role), doc=f"The id of the {role} role.")


class Tokenizer(ABC):
    """Text to ids and back. `clean` turns URLs, e-mail addresses, phone numbers, dates, prices and box
    drawing into tag tokens (the GPTSAN clean-text rules); None means the tokenizer's default."""

    special: SpecialIds
    vocab_size: int

    @abstractmethod
    def encode(self, text: str, clean: bool | None = None) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def _is_plain_id(self, token_id: int) -> bool:
        """True for ordinary text pieces: not a role token, not a byte-fallback piece."""

    def plain_token_mask(self) -> np.ndarray:
        """A `[vocab_size]` bool array: ids that run-compression, masking and random replacement may use."""
        if getattr(self, "_plain_mask", None) is None:
            self._plain_mask = np.array([self._is_plain_id(i) for i in range(self.vocab_size)], dtype=bool)
        return self._plain_mask

    def ids_of_chars(self, chars: str) -> frozenset[int]:
        """The ids that the single characters of `chars` encode to (each character on its own)."""
        ids = set()
        for ch in chars:
            encoded = self.encode(ch, clean=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
        return frozenset(ids)

    @functools.cached_property
    def sentence_end_ids(self) -> frozenset[int]:
        return self.ids_of_chars(SENTENCE_PUNCTUATION)

    def model_input_map(self) -> np.ndarray:
        """[vocab_size] int32: the id a model is fed for each token (sentence punctuation -> separator)."""
        feed = np.arange(self.vocab_size, dtype=np.int32)
        feed[sorted(self.sentence_end_ids)] = self.special.separator
        return feed

    @property
    def unknown_ids(self) -> tuple[int, ...]:
        """Ids that stand for text the vocabulary lacks (SentencePiece's `<unk>`): encoded text never holds
        them where the vocabulary has byte pieces, so a model should not generate them. SWE has none."""
        return ()

    def encode_body(self, text: str) -> list[int]:
        """`text` as a training record's body holds it (gptsan/data/layout.py): clean-text on, and each run of 3+
        identical ordinary tokens as the token and `<|bagoftoken|>`. Sentence punctuation is kept (the targets
        keep it; `as_model_input` makes the model's input)."""
        return compress_runs(self.encode(text, clean=True), self.plain_token_mask(), self.bag_id)

    def as_model_input(self, ids: Sequence[int]) -> list[int]:
        """Token ids as a model trained on GPTSAN tfrecords sees them (sentence punctuation -> separator)."""
        return [self.special.separator if i in self.sentence_end_ids else i for i in ids]

    # Role ids as attributes, so callers need not reach into `special`.
    start_id = _role_id("start")
    segmenter_id = _role_id("segmenter")
    separator_id = _role_id("separator")
    mask_id = _role_id("mask")
    pad_id = _role_id("nottoken")
    bag_id = _role_id("bag")
    end_id = _role_id("end")
    newline_id = _role_id("newline")


def compress_runs(ids: Sequence[int], plain: np.ndarray, bag_id: int) -> list[int]:
    """Each run of 3+ identical ordinary tokens → the token and `<|bagoftoken|>`."""
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        j = i + 1
        while j < n and ids[j] == ids[i]:
            j += 1
        if j - i >= 3 and plain[ids[i]]:
            out += [ids[i], bag_id]
        else:
            out += ids[i:j]
        i = j
    return out
