"""Train a SentencePiece tokenizer with GPTSAN's special pieces reserved (see
`gptsan/tokenizer/sentencepiece.py`). Use the model with `--tokenizer sentencepiece --vocabulary X.model`.

    python tools/train_tokenizer.py --input_files 'corpus/*.txt' --model_prefix ja-sp32k --vocab_size 32000
"""

import argparse
import os
import sys

try:
    import gptsan  # noqa: F401
except ImportError:  # run from a checkout without installing: put the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptsan import storage
from gptsan.errors import UserError, cli_main
from gptsan.tokenizer.sentencepiece import MODEL_TYPES, SentencePieceTokenizer, train_sentencepiece


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_files", required=True, help="glob of .txt or .jsonl files")
    p.add_argument("--model_prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--model_type", default="unigram", help=" | ".join(MODEL_TYPES))
    p.add_argument("--character_coverage", type=float, default=0.9995, help="0.9995 suits Japanese")
    p.add_argument("--text_field", default="text", help="field holding the text in .jsonl records")
    p.add_argument("--max_sentences", type=int, default=2_000_000, help="sentences sampled for training")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if storage.is_remote(args.model_prefix):  # SentencePiece writes local files only
        raise UserError(f"--model_prefix: {args.model_prefix} is not a local path; SentencePiece writes its model "
                        "to local files (copy PREFIX.model and PREFIX.vocab to the bucket afterwards)")
    files = storage.glob(args.input_files)
    if not files:
        raise UserError(f"--input_files: no file matches {args.input_files!r}")
    model = train_sentencepiece(
        files, args.model_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
        character_coverage=args.character_coverage, text_field=args.text_field,
        max_sentences=args.max_sentences,
    )
    tokenizer = SentencePieceTokenizer(model)
    roles = ", ".join(f"{role} {token_id}" for role, token_id in vars(tokenizer.special).items())
    short = ""
    if tokenizer.vocab_size < args.vocab_size:
        short = f" (not the {args.vocab_size} asked for: the corpus has no more)"
    print(f"wrote {model}: {tokenizer.vocab_size} pieces{short}; {roles}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
