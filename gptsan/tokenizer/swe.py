"""GPTSAN's sub-word encoder (SWE): `ja-swe36k.txt` + `emoji.json`, with the exact rules of the original
encoder as kept by the Hugging Face port (`GPTSanJapaneseTokenizer`):

1. The role tokens `<|startoftext|>`, `<|endoftext|>`, `<|segmenter|>`, `<|separator|>`, `<|nottoken|>`
   written in the text are split off first and kept whole (the port treats them as special tokens).
2. Spaces (ASCII and full-width) → `<SP>`, CR LF / LF / CR → `<BR>`, tab → `<TAB>`, `—` and `−` → `ー`.
3. Emoji and kaomoji → `<|emoji1|>`..`<|emoji12|>`, replaced key by key in `emoji.json` order.
4. Optionally the clean-text rules (`cleaning.py`).
5. At each position the spellings of length 1–3 that are in the vocabulary are candidates and the lowest id
   wins (a tie goes to the longest); at a `<`, the longest spelling of 3+ characters wins at once (tags).
   A character with no candidate becomes `<KIGOU>` (U+00A1–00BF, 01C0–01C3, 02B9–0362), `<U2000U2BFF>`
   (U+2000–2BFF) or its UTF-8 bytes as `<|byteN|>`.

Speed: the port scans every emoji key over every text (4,314 substring searches per call) and builds,
sorts and discards a candidate list per position. Here the emoji keys are bucketed by a character that
must occur in the text for the key to match, and each position does two dict look-ups (the character;
the pair, which also says whether a 3-character spelling can start there) and a third only when it can.
`swe_reference.py` keeps the straightforward version; tests check both agree and `bench/encode.py` times them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from gptsan import storage
from gptsan.errors import UserError
from gptsan.tokenizer.base import SpecialIds, Tokenizer
from gptsan.tokenizer.cleaning import clean_text

ROLE_PIECES = {
    "start": "<|startoftext|>",
    "segmenter": "<|segmenter|>",
    "separator": "<|separator|>",
    "mask": "<|inputmask|>",
    "nottoken": "<|nottoken|>",
    "bag": "<|bagoftoken|>",
    "end": "<|endoftext|>",
    "newline": "<BR>",
}
# The port splits these off before encoding (its unk, pad, bos, eos and sep tokens).
SPLIT_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|segmenter|>", "<|separator|>", "<|nottoken|>")
WHITESPACE_RULES = (
    (" ", "<SP>"),
    ("\u3000", "<SP>"),
    ("\r\n", "<BR>"),
    ("\n", "<BR>"),
    ("\r", "<BR>"),
    ("\t", "<TAB>"),
    ("—", "ー"),
    ("−", "ー"),
)
DECODED_TAGS = {"<SP>": " ", "<BR>": "\n", "<TAB>": "\t", "<BLOCK>": "▀", "<KIGOU>": "ǀ", "<U2000U2BFF>": "‖"}
_BYTE_PREFIX = "<|byte"


def read_vocabulary(path: str) -> list[list[str]]:
    """The spellings of each id, one line per id; a line that is just `,` is the comma itself. A leading
    UTF-8 BOM (an editor's) is dropped: kept, it made id 0 a spelling nothing matches."""
    try:
        text = storage.read_text(path)  # universal newlines, as open() in text mode
    except FileNotFoundError:
        raise UserError(f"{path}: vocabulary file not found") from None
    except UnicodeDecodeError as err:
        hint = " (a SentencePiece model? give --tokenizer sentencepiece)" if str(path).endswith(".model") else ""
        raise UserError(f"{path}: vocabulary is not UTF-8 ({err.reason} at byte {err.start}){hint}") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise UserError(f"{path}: vocabulary file is empty (expected one token's spellings per line)")
    return [[line] if line == "," or "," not in line else line.split(",") for line in lines]


def read_emoji(path: str) -> dict:
    try:
        emoji = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise UserError(f"{path}: emoji.json not found (give --emoji, or put it beside)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a JSON emoji table ({err})") from None
    if not isinstance(emoji, dict) or "emoji" not in emoji or "emoji_inv" not in emoji:
        raise UserError(f"{path}: expected an object with 'emoji' and 'emoji_inv'")
    return emoji


def is_kigou(ch: str) -> bool:
    cp = ord(ch)
    return 0xA1 <= cp <= 0xBF or 0x1C0 <= cp <= 0x1C3 or 0x2B9 <= cp <= 0x362


def is_u2000_u2bff(ch: str) -> bool:
    return 0x2000 <= ord(ch) <= 0x2BFF


class EmojiReplacer:
    """Replaces emoji keys by their class tag exactly as a loop over all keys in file order would, but only
    tries the keys whose anchor (a character of the key that no replacement tag contains) is in the text."""

    def __init__(self, emoji_table: dict[str, str]):
        self.items = list(emoji_table.items())
        tag_chars = set("".join(emoji_table.values()))
        self.buckets: dict[str, list[int]] = {}
        self.unanchored: list[int] = []
        for index, (key, _) in enumerate(self.items):
            anchors = [ch for ch in key if ch not in tag_chars]
            if anchors:
                self.buckets.setdefault(max(anchors), []).append(index)
            else:
                self.unanchored.append(index)
        self.anchor_chars = frozenset(self.buckets)

    def __call__(self, text: str) -> str:
        present = self.anchor_chars.intersection(text)
        if not present and not self.unanchored:
            return text
        indices = sorted([i for ch in present for i in self.buckets[ch]] + self.unanchored)
        for i in indices:
            key, tag = self.items[i]
            if key in text:
                text = text.replace(key, tag)
        return text


class SWETokenizer(Tokenizer):
    """GPTSAN's tokenizer: `vocab_file` is `ja-swe36k.txt`, `emoji_file` defaults to emoji.json beside it."""

    def __init__(self, vocab_file: str, emoji_file: str | None = None, clean_text: bool = False):
        if emoji_file is None:
            emoji_file = storage.join(storage.parent(vocab_file), "emoji.json")
        self.vocab_file, self.emoji_file, self.clean_text = str(vocab_file), str(emoji_file), clean_text
        self.spellings = read_vocabulary(self.vocab_file)
        self.emoji = read_emoji(self.emoji_file)
        self.vocab_size = len(self.spellings)
        self.lookup: dict[str, int] = {}
        for token_id, spellings in enumerate(self.spellings):
            for spelling in spellings:
                self.lookup[spelling] = token_id  # a later line wins, as in the port
        self.max_spelling = max(len(s) for s in self.lookup)
        self.pairs = self._index_pairs()
        tag_lengths = {len(s) for s in self.lookup if s.startswith("<") and len(s) > 2}
        self.tag_lengths = sorted(tag_lengths, reverse=True)
        self.special = SpecialIds(**{role: self._required_id(piece) for role, piece in ROLE_PIECES.items()})
        self.byte_ids = [self.lookup.get(f"{_BYTE_PREFIX}{b}|>", self.special.nottoken) for b in range(256)]
        self.kigou_id = self._required_id("<KIGOU>")
        self.u2000_id = self._required_id("<U2000U2BFF>")
        self.replace_emoji = EmojiReplacer(self.emoji["emoji"])
        self._decode_table = self._build_decode_table()

    def _index_pairs(self) -> dict[str, tuple[int | None, bool]]:
        """For each 2-character string that is a spelling or begins a 3-character one: (its id or None,
        whether a 3-character spelling begins with it). One look-up then settles two candidate lengths."""
        pairs: dict[str, tuple[int | None, bool]] = {}
        for spelling, token_id in self.lookup.items():
            if len(spelling) == 2:
                pairs[spelling] = (token_id, pairs.get(spelling, (None, False))[1])
            elif len(spelling) == 3:
                pairs[spelling[:2]] = (pairs.get(spelling[:2], (None, False))[0], True)
        return pairs

    def _required_id(self, piece: str) -> int:
        if piece not in self.lookup:
            raise UserError(f"{self.vocab_file}: no {piece} in the vocabulary (not a GPTSAN SWE vocabulary?)")
        return self.lookup[piece]

    def _is_plain_id(self, token_id: int) -> bool:
        first = self.spellings[token_id][0]
        return not (first.startswith(_BYTE_PREFIX) or token_id in self.special.control_ids)

    # ---- encoding -------------------------------------------------------------------------------------

    def encode(self, text: str, clean: bool | None = None) -> list[int]:
        clean = self.clean_text if clean is None else clean
        ids: list[int] = []
        for chunk in split_specials(text):
            if chunk in SPLIT_SPECIALS:
                ids.append(self.lookup[chunk])
            else:
                ids.extend(self.scan(self.normalise(chunk, clean)))
        return ids

    def normalise(self, text: str, clean: bool) -> str:
        """Steps 2–4 of the module docstring: whitespace tags, emoji classes, clean-text."""
        for old, new in WHITESPACE_RULES:
            if old in text:
                text = text.replace(old, new)
        text = self.replace_emoji(text)
        return clean_text(text) if clean else text

    def scan(self, text: str) -> list[int]:
        """Step 5: the lowest-id candidate at each position."""
        get, get_pair, result, pos, n = self.lookup.get, self.pairs.get, [], 0, len(text)
        while pos < n:
            if text[pos] == "<":
                tag_length = self._tag_at(text, pos)
                if tag_length:
                    result.append(self.lookup[text[pos : pos + tag_length]])
                    pos += tag_length
                    continue
            best_id, best_length = None, 0
            pair = get_pair(text[pos : pos + 2]) if pos + 1 < n else None
            if pair is not None:
                pair_id, starts_triple = pair
                if starts_triple and pos + 2 < n:
                    best_id = get(text[pos : pos + 3])
                    best_length = 3 if best_id is not None else 0
                if pair_id is not None and (best_id is None or pair_id < best_id):
                    best_id, best_length = pair_id, 2
            single_id = get(text[pos])
            if single_id is not None and (best_id is None or single_id < best_id):
                best_id, best_length = single_id, 1
            if best_id is None:
                result.extend(self.unknown_char_ids(text[pos]))
                pos += 1
            else:
                result.append(best_id)
                pos += best_length
        return result

    def _tag_at(self, text: str, pos: int) -> int:
        """Length of the longest 3+ character spelling starting with `<` at `pos`, or 0."""
        for length in self.tag_lengths:
            if pos + length <= len(text) and text[pos : pos + length] in self.lookup:
                return length
        return 0

    def unknown_char_ids(self, ch: str) -> list[int]:
        if is_kigou(ch):
            return [self.kigou_id]
        if is_u2000_u2bff(ch):
            return [self.u2000_id]
        return [self.byte_ids[b] for b in ch.encode("utf-8", errors="surrogatepass")]

    # ---- decoding -------------------------------------------------------------------------------------

    def _build_decode_table(self) -> list[str | int | None]:
        """Per id: the text it decodes to, a byte value (int) for byte tokens, or None for the bag token."""
        table: list[str | int | None] = []
        for token_id, spellings in enumerate(self.spellings):
            word = spellings[0]
            if word.startswith(_BYTE_PREFIX) and word.endswith("|>"):
                table.append(int(word[len(_BYTE_PREFIX) : -2]))
            elif word.startswith("<|emoji") and word.endswith("|>"):
                table.append(self.emoji["emoji_inv"].get(word, ""))
            elif token_id == self.special.bag:
                table.append(None)
            elif word in DECODED_TAGS:
                table.append(DECODED_TAGS[word])
            elif word.startswith("<|") and word.endswith("|>"):
                table.append("")
            else:
                table.append(word)
        return table

    def decode(self, ids: Sequence[int]) -> str:
        words: list[str] = []
        pending_bytes = bytearray()
        for token_id in ids:
            entry = self._decode_entry(int(token_id))
            if isinstance(entry, int):
                pending_bytes.append(entry)
                continue
            if pending_bytes:
                words.append(pending_bytes.decode("utf-8", errors="replace"))
                pending_bytes = bytearray()
            if entry is None:  # <|bagoftoken|>: the previous piece three more times
                words.extend(words[-1:] * 3)
            else:
                words.append(entry)
        if pending_bytes:
            words.append(pending_bytes.decode("utf-8", errors="replace"))
        return "".join(words)

    def _decode_entry(self, token_id: int) -> str | int | None:
        if not 0 <= token_id < self.vocab_size:
            raise UserError(f"token id {token_id}: outside the vocabulary (0..{self.vocab_size - 1})")
        return self._decode_table[token_id]


def split_specials(text: str) -> list[str]:
    """`text` cut around the role tokens the port keeps whole; empty pieces dropped."""
    if "<|" not in text:
        return [text] if text else []
    pieces = [text]
    for special in SPLIT_SPECIALS:
        next_pieces = []
        for piece in pieces:
            if piece in SPLIT_SPECIALS or special not in piece:
                next_pieces.append(piece)
                continue
            parts = piece.split(special)
            for k, part in enumerate(parts):
                if k:
                    next_pieces.append(special)
                if part:
                    next_pieces.append(part)
        pieces = next_pieces
    return pieces
