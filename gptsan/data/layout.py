"""How one document (the lines of one file) becomes training records (spec section 4).

Layout of `x`: `[SOT] + lead + prefix + [SEG] + body + [EOT]`, padded with `<|nottoken|>`; `num_input` is
the index of SEG (= 1 + len(lead) + len(prefix): the prefix length including the start token).
`y[p]` is the token that follows `x[p]`, written with the real punctuation and -1 where there is no loss:
on SOT, lead and prefix (except mask and next-sentence targets), from the end of text on, and on padding.

- Every source line is stripped (as the original did) and ends with `<BR>`; a blank line is a lone `<BR>`.
- Body lines are encoded with clean-text on and runs of 3+ identical ordinary tokens become
  `token, <|bagoftoken|>` (in `x` and `y`); prefix and lead lines are encoded as written (clean-text off,
  no compression), as the original did. A line cut by the prefix/body boundary or by the end of a record
  keeps the encoding it was started with.
- In the body of `x` only, sentence punctuation (the ids of `SENTENCE_PUNCTUATION`, the original's set)
  becomes `<|separator|>`; `y` keeps the punctuation.
- A document longer than one record continues in the next record with no token lost: a full record has
  no EOT and the target at its last position is the first token of the continuation; the record that
  holds the document's end has `y = EOT` after its last token (and EOT in `x` when there is room).
- lm: no prefix. hybrid: with probability `hybrid_rate` a prefix of uniform random length (lm otherwise);
  when the document ends inside the drawn prefix, the split point is drawn again inside what was read, so
  short documents still give a body (the original dropped such records). mlm: the prefix fills the record
  but for one body slot.
- Masking (mlm, and hybrid records with a prefix, as the original): `min(int(num_mask * len(prefix)),
  max_mask)` prefix positions (one fewer with a lead sentence) are drawn; an ordinary token there is
  replaced by `<|inputmask|>` 80%, a random ordinary token 10%, kept 10%, and its original id is the target
  at the preceding position (at the position itself with `no_offset_mlm` in mlm mode; the original read
  that flag in mlm mode only, and so does this. It got there by shifting the whole of `x` left by one,
  which also moved SEG inside the bidirectional prefix; we keep the layout and move only the targets).
- Next sentence (`use_nextsent`, records with a prefix): a lead sentence ended by `<|separator|>` goes
  right after SOT. Half the time it is the document's next text and the record's text continues after it
  (target `<|separator|>`: "continues"): the next line, or in a record that continues a document, the rest
  of the line the previous record cut (its `<BR>` becomes the separator, as a lead line's does); otherwise
  it is a line from an earlier document of the same worker (target `<|endoftext|>`: "unrelated"). The
  target sits at the position before the separator (at the separator with `no_offset_mlm`, mlm). Lead length is
  capped at `num_context // 2 - 2` tokens. (Continuation records never had a "continues" lead: the rest of
  the cut line, or the next line already read ahead, was always in the way, so nearly every lead of a long
  document was "unrelated".)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gptsan.tokenizer.base import Tokenizer

MODES = ("lm", "hybrid", "mlm")
FIXED_OVERHEAD = 3  # SOT, SEG, EOT
MIN_CONTEXT = FIXED_OVERHEAD + 5  # room for a lead sentence and at least one text token
LEAD_POOL_SIZE = 1024


@dataclass(frozen=True)
class LayoutSettings:
    mode: str = "lm"
    num_context: int = 1280
    num_mask: float = 0.08
    max_mask: int = 100
    use_nextsent: bool = False
    hybrid_rate: float = 1.0
    no_offset_mlm: bool = False


class LineStream:
    """The tokens of a document's lines, each line encoded when first needed, for the prefix (as written)
    or for the body (clean-text, compressed runs); what a record does not use is carried to the next."""

    def __init__(self, lines: Sequence[str], tokenizer: Tokenizer):
        self.lines, self.next_line, self.tokenizer = lines, 0, tokenizer
        self.carry: list[int] = []
        self.carry_whole = False  # the carry is a whole line (peeked), not the rest of one a record cut

    def has_line(self) -> bool:
        return self.next_line < len(self.lines)

    def lines_left(self) -> int:
        return len(self.lines) - self.next_line

    def exhausted(self) -> bool:
        return not self.carry and not self.has_line()

    def pop_line(self) -> str:
        self.next_line += 1
        return self.lines[self.next_line - 1]

    def _refill(self, for_body: bool) -> bool:
        if self.carry or not self.has_line():
            return bool(self.carry)
        line = self.pop_line()
        ids = self.tokenizer.encode_body(line) if for_body else self.tokenizer.encode(line, clean=False)
        self.carry, self.carry_whole = ids + [self.tokenizer.newline_id], True
        return True

    def take(self, count: int, for_body: bool) -> list[int]:
        taken: list[int] = []
        while len(taken) < count and self._refill(for_body):
            room = count - len(taken)
            taken += self.carry[:room]
            self.carry, self.carry_whole = self.carry[room:], False
        return taken

    def next_sentence(self, limit: int) -> list[int] | None:
        """The document's next sentence, taken out of the stream for a "continues" lead (at most `limit` tokens,
        without its `<BR>`): the rest of the line the previous record cut, else the next line (encoded with
        clean-text). None, taking nothing, unless text follows it.

        A record that does not end the document ends with a peek at the next token, which encodes the next
        line when the record ended at a line end: the carry is then a whole line, and is that line."""
        rest = self.carry[:-1]  # a carry always ends with the line's <BR>
        if rest and not self.carry_whole:
            if not self.has_line():
                return None
            self.carry = []
            return rest[:limit]
        if self.lines_left() < (1 if self.carry_whole else 2):  # the lead line and a line after it
            return None
        if not self.carry_whole:
            self.pop_line()
        self.carry, self.carry_whole = [], False  # the peeked line, or the <BR> left of a cut line, goes
        return self.tokenizer.encode(self.lines[self.next_line - 1], clean=True)[:limit]

    def peek(self) -> int | None:
        return self.carry[0] if self._refill(for_body=True) else None


class DocumentEncoder:
    """Turns documents into records for one worker; `rng` drives every random choice."""

    def __init__(self, tokenizer: Tokenizer, settings: LayoutSettings, rng: np.random.Generator):
        self.tok, self.settings, self.rng = tokenizer, settings, rng
        self.plain_ids = np.flatnonzero(tokenizer.plain_token_mask())
        self.plain = tokenizer.plain_token_mask()
        self.dot_ids = np.array(sorted(tokenizer.sentence_end_ids), dtype=np.int64)
        self.lead_pool: list[str] = []
        self.lines_seen = 0

    def records(self, lines: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """(x, y, num_input) for each record of one document."""
        lines = [line.strip() for line in lines]
        stream = LineStream(lines, self.tok)
        while not stream.exhausted():
            record = self._next_record(stream)
            if record is not None:
                yield record
        self._remember_lines(lines)

    def _next_record(self, stream: LineStream):
        s, ctx = self.settings, self.settings.num_context
        with_prefix = s.mode == "mlm" or (s.mode == "hybrid" and self.rng.random() < s.hybrid_rate)
        lead, lead_target = self._lead(stream) if (with_prefix and s.use_nextsent) else ([], None)
        room = ctx - FIXED_OVERHEAD - len(lead)  # prefix + body tokens, EOT slot kept
        if not with_prefix:
            prefix_len = 0
        elif s.mode == "mlm":
            prefix_len = room
        else:
            prefix_len = int(self.rng.integers(0, room + 1))
        prefix = stream.take(prefix_len, for_body=False)
        body_y = []
        if len(prefix) < prefix_len and s.mode == "hybrid" and prefix:  # document ended inside the prefix
            split = int(self.rng.integers(0, len(prefix)))
            prefix, body_y = prefix[:split], prefix[split:]
        body_room = ctx - 2 - len(lead) - len(prefix) - len(body_y)  # body slots, SOT and SEG kept
        body_y = body_y + stream.take(body_room, for_body=True)
        if not prefix and not body_y:
            return None
        following = stream.peek()
        return self._assemble(lead, lead_target, prefix, body_y, following)

    def _lead(self, stream: LineStream) -> tuple[list[int], int | None]:
        """A lead sentence and its target (SEP: the text continues it, EOT: it is unrelated)."""
        limit = self.settings.num_context // 2 - 2
        continues = self.rng.random() < 0.5
        if continues or not self.lead_pool:
            ids = stream.next_sentence(limit)
            if ids is not None:
                return ids + [self.tok.separator_id], self.tok.separator_id
        if not self.lead_pool:
            return [], None
        text = self.lead_pool[int(self.rng.integers(0, len(self.lead_pool)))]
        return self.tok.encode(text, clean=True)[:limit] + [self.tok.separator_id], self.tok.end_id

    def _assemble(self, lead, lead_target, prefix, body_y, following):
        ctx, tok = self.settings.num_context, self.tok
        body_x = np.array(body_y, dtype=np.int64)
        body_x[np.isin(body_x, self.dot_ids)] = tok.separator_id
        ends_document = following is None
        x_tokens = [tok.start_id, *lead, *prefix, tok.segmenter_id, *body_x.tolist()]
        if ends_document and len(x_tokens) < ctx:
            x_tokens.append(tok.end_id)
        x = np.full(ctx, tok.pad_id, dtype=np.int64)
        x[: len(x_tokens)] = x_tokens
        y = np.full(ctx, -1, dtype=np.int64)
        seg = 1 + len(lead) + len(prefix)
        targets = body_y + [tok.end_id if ends_document else following]
        y[seg : seg + len(targets)] = targets[: ctx - seg]
        offset = 0 if self.settings.no_offset_mlm and self.settings.mode == "mlm" else 1
        if lead_target is not None:
            y[len(lead) - offset] = lead_target  # the separator ending the lead sits at index len(lead)
        self._mask_prefix(x, y, start=1 + len(lead), length=len(prefix), offset=offset, has_lead=bool(lead))
        return x, y, seg

    def _mask_prefix(self, x, y, *, start: int, length: int, offset: int, has_lead: bool) -> None:
        s = self.settings
        count = min(int(s.num_mask * length), s.max_mask) - int(has_lead)
        if count <= 0:
            return
        for pos in self.rng.permutation(length)[:count] + start:
            original = int(x[pos])
            if not self.plain[original]:
                continue
            y[pos - offset] = original
            draw = self.rng.random()
            if draw < 0.8:
                x[pos] = self.tok.mask_id
            elif draw < 0.9:
                x[pos] = self.plain_ids[int(self.rng.integers(0, len(self.plain_ids)))]

    def _remember_lines(self, lines: Sequence[str]) -> None:
        """Reservoir sample of non-empty lines from finished documents, for unrelated lead sentences."""
        if not self.settings.use_nextsent:
            return
        for line in lines:
            if not line:
                continue
            self.lines_seen += 1
            if len(self.lead_pool) < LEAD_POOL_SIZE:
                self.lead_pool.append(line)
            else:
                slot = int(self.rng.integers(0, self.lines_seen))
                if slot < LEAD_POOL_SIZE:
                    self.lead_pool[slot] = line
