"""gptsan-export: a model (any format gptsan reads) as an HF GPTSanJapanese folder or an original TF1
checkpoint, for the tools that read those.

    gptsan-export --model DIR --format hf|gptsan-tf --output OUT [--dtype float32|float16|bfloat16]

hf: `config.json` + `model.safetensors`, loadable by transformers 4.40's
`GPTSanJapaneseForConditionalGeneration.from_pretrained`. gptsan-tf: `checkpoint` + `model.index` +
`model.data-00000-of-00001` under the original variable names, with `parameters.json`. OUT must not exist.
"""

from __future__ import annotations

import argparse
import json
import sys

from gptsan import storage
from gptsan.checkpoint import hf, load_flat, native, tf_checkpoint
from gptsan.checkpoint.staging import refuse_existing, staged_output
from gptsan.convert.cli import source_train_params
from gptsan.errors import UserError, cli_main

EXPORT_FORMATS = ("hf", "gptsan-tf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptsan-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (native, TF or HF)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to write")
    parser.add_argument("--output", required=True, help="new directory (must not exist)")
    parser.add_argument("--dtype", default="float32", choices=hf.STORAGE_DTYPES, help="storage dtype")
    return parser


def export(model: str, fmt: str, output: str, dtype: str = "float32") -> None:
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    refuse_existing(output)  # before the (possibly long) load
    # As gptsan-convert: the source's train_params with output_dir = the export (training from the export used
    # to resume from, and write into, the source's output_dir). Read first: a bad one stops the export at once.
    train_params = source_train_params(model, output) if fmt == "gptsan-tf" else None
    config, flat = load_flat(model)
    with staged_output(output) as tmp:
        if fmt == "hf":
            hf.write(tmp, config, flat, dtype)
            return
        tf_checkpoint.write(tmp, flat, dtype)
        parameters = {"train_params": train_params, "model_params": config.to_model_params()}
        text = json.dumps(parameters, indent=1) + "\n"
        storage.write_text_atomic(storage.join(tmp, native.PARAMETERS), text)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    export(args.model, args.format, args.output, args.dtype)
    print(f"wrote {args.format} model to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
