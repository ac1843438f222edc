"""Print a few records of a GPTSAN tfrecord file, decoded: class id, prefix, body, loss targets.
The separator and mask roles in the inputs show as `<|separator|>` and `<|mask|>`.

    python tools/inspect_tfrecord.py lm_0000.tfrecord --vocabulary ja-swe36k.txt --num 3
"""

import argparse
import os
import sys

try:
    import gptsan  # noqa: F401
except ImportError:  # run from a checkout without installing: put the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from gptsan import storage
from gptsan.data.schema import CorruptRecordError, parse_example, read_frames, record_from_example
from gptsan.errors import UserError, cli_main
from gptsan.tokenizer import KINDS, load_tokenizer

SHOWN_ROLES = ("separator", "mask")  # roles that decode to nothing but tell what the model was fed


def readable(tokenizer, ids) -> str:
    """`ids` decoded, with the separator (sentence punctuation in `x`) and mask roles shown by name."""
    names = {getattr(tokenizer.special, role): f"<|{role}|>" for role in SHOWN_ROLES}
    parts, run = [], []
    for token in ids:
        if token in names:
            parts += [tokenizer.decode(run), names[token]]
            run = []
        else:
            run.append(token)
    return "".join(parts) + tokenizer.decode(run)


def describe(record, tokenizer) -> str:
    x, y, start = record.x, record.y, record.num_input
    used = x != tokenizer.pad_id
    targets = y != -1
    prefix_targets = int(targets[:start].sum())
    return "\n".join([
        f"i={record.i} num_input={start} tokens={int(used.sum())}/{len(x)} loss_targets={int(targets.sum())}"
        f" (in prefix: {prefix_targets}, masks in x: {int((x == tokenizer.mask_id).sum())})",
        f"  prefix: {readable(tokenizer, x[1:start].tolist())!r}",
        f"  body:   {readable(tokenizer, x[start + 1:][used[start + 1:]].tolist())!r}",
        f"  ids:    {x[: min(24, len(x))].tolist()}{' ...' if len(x) > 24 else ''}",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a .tfrecord file (local or gs://)")
    p.add_argument("--tokenizer", default="swe", help=" | ".join(KINDS))
    p.add_argument("--vocabulary", required=True)
    p.add_argument("--emoji", default=None)
    p.add_argument("--num", type=int, default=3, help="records to show (at least 1)")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.num < 1:
        raise UserError(f"--num: expected at least 1 record to show, got {args.num}")
    tokenizer = load_tokenizer(args.tokenizer, args.vocabulary, emoji_file=args.emoji)
    if not storage.exists(args.path):
        raise UserError(f"{args.path}: file not found")
    with storage.open_file(args.path, "rb") as stream:
        try:
            for index, data in enumerate(read_frames(stream, args.path)):
                if index >= args.num:
                    break
                try:
                    record = record_from_example(parse_example(data))
                except ValueError as err:
                    raise UserError(f"{args.path}: record {index} is corrupt ({err})") from None
                print(f"[{index}] {describe(record, tokenizer)}")
        except CorruptRecordError as err:
            raise UserError(str(err)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
