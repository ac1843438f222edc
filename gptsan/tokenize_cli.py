"""`gptsan-tokenize`: encode text to ids, decode ids to text, or count a corpus's tokens.

    gptsan-tokenize --vocabulary ja-swe36k.txt --text "こんにちは"                 → [469, 1957, 30647]
    gptsan-tokenize --vocabulary ja-swe36k.txt --decode --text "[469, 1957, 30647]" → こんにちは
    gptsan-tokenize --vocabulary ja-swe36k.txt --count --files 'corpus/*.txt'

Encoding prints one JSON list per text (per line with --files); decoding reads one JSON list per text.
`--count` prints one JSON object: files, lines, characters and tokens, counting each line as the encoder
writes a document's body: stripped, clean-text, one `<BR>` after it, before run compression.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from gptsan import storage
from gptsan.errors import UserError, cli_main
from gptsan.tokenizer import KINDS, Tokenizer, load_tokenizer
from gptsan.tokenizer.base import check_utf8_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptsan-tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="swe", help=" | ".join(KINDS))
    p.add_argument("--vocabulary", required=True, help="ja-swe36k.txt (swe) or a .model file (sentencepiece)")
    p.add_argument("--emoji", default=None, help="emoji.json (swe; default: beside the vocabulary)")
    p.add_argument("--clean_text", action="store_true", help="URL, e-mail, phone, date, price → tags")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one text (with --decode: a JSON list of ids)")
    source.add_argument("--files", help="glob of UTF-8 files, one text per line")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--decode", action="store_true", help="ids → text")
    action.add_argument("--count", action="store_true", help="count the input's tokens as the encoder writes them")
    return p


def input_texts(args) -> Iterator[tuple[str, str]]:
    """(where, text) for the --text or for each line of each --files match."""
    if args.text is not None:
        yield "--text", args.text
        return
    yield from file_lines(matched_files(args.files))


def matched_files(pattern: str) -> list[str]:
    files = storage.glob(pattern)
    if not files:
        raise UserError(f"--files: no file matches {pattern!r}")
    return files


def file_lines(files: list[str]) -> Iterator[tuple[str, str]]:
    """(PATH:LINE, text) for each line of each file."""
    from gptsan.data.encode import read_document

    for path in files:
        for number, line in enumerate(read_document(path), start=1):
            yield f"{path}:{number}", line


def parse_ids(where: str, text: str) -> list[int]:
    if not text.strip():  # a blank line decodes to an empty one, so the output keeps the input's lines
        return []
    try:
        ids = json.loads(text)
    except json.JSONDecodeError:
        ids = None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):  # not true/false (bool is an int)
        raise UserError(f"{where}: expected a JSON list of integer ids, got {text[:40]!r}")
    return ids


def count_tokens(tokenizer: Tokenizer, args) -> dict[str, int]:
    if args.text is not None:
        files, texts = [], input_texts(args)
    else:
        files = matched_files(args.files)
        texts = file_lines(files)
    totals = {"files": len(files), "lines": 0, "characters": 0, "tokens": 0}  # empty files count too
    for _, line in texts:
        totals["lines"] += 1
        totals["characters"] += len(line)
        totals["tokens"] += len(tokenizer.encode(line.strip(), clean=True)) + 1
    return totals


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.text is not None:
        check_utf8_text("--text", args.text)
    tokenizer = load_tokenizer(
        args.tokenizer, args.vocabulary, emoji_file=args.emoji, clean_text=args.clean_text
    )
    if args.count:
        print(json.dumps(count_tokens(tokenizer, args)))
        return 0
    for where, text in input_texts(args):
        if args.decode:
            ids = parse_ids(where, text)
            try:
                decoded = tokenizer.decode(ids)
            except UserError as err:  # an id outside the vocabulary: say where it was
                raise UserError(f"{where}: {err}") from None
            print(decoded)
        else:
            print(json.dumps(tokenizer.encode(text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
