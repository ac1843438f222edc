"""gptsan-export: a model (any format gptsan reads) as an HF GPTSanJapanese folder or an original TF1
checkpoint, for the tools that read those.

    gptsan-export --model DIR --format hf|gptsan-tf --output OUT [--dtype float32|float16|bfloat16]

hf: `config.json` + `model.safetensors`, loadable by transformers 4.40's
`GPTSanJapaneseForConditionalGeneration.from_pretrained`. gptsan-tf: `checkpoint` + `model.index` +
`model.data-00000-of-00001` under the original variable names, with `parameters.json`; always float32, as the
original's variables are (its trainer cannot restore a float16 or bfloat16 one). OUT must not exist.
A --dtype whose range a parameter's values exceed (float16's ends at 65504) is refused: they would be inf.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from gptsan import storage
from gptsan.checkpoint.dtypes import FLOAT_STORAGE_DTYPES
from gptsan.convert.cli import source_train_params
from gptsan.errors import UserError, cli_main

# The checkpoint formats bring JAX and Flax (seconds of imports): they are imported inside the functions, under
# cli_main, so a Ctrl-C while they load ends in `interrupted`, not a traceback.

EXPORT_FORMATS = ("hf", "gptsan-tf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptsan-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (native, TF or HF)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to write")
    parser.add_argument("--output", required=True, help="new directory (must not exist)")
    parser.add_argument("--dtype", default="float32", choices=FLOAT_STORAGE_DTYPES, help="storage dtype")
    return parser


def export(model: str, fmt: str, output: str, dtype: str = "float32") -> None:
    from gptsan.checkpoint import hf, load_flat, native, tf_checkpoint
    from gptsan.checkpoint.staging import refuse_existing, staged_output

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if fmt == "gptsan-tf" and dtype != "float32":
        raise UserError(f"--dtype {dtype}: --format gptsan-tf writes float32, as the original's variables are (its "
                        "trainer cannot restore another dtype); use --format hf for a smaller copy")
    refuse_existing(output)  # before the (possibly long) load
    # As gptsan-convert: the source's train_params with output_dir = the export (training from the export used
    # to resume from, and write into, the source's output_dir). Read first: a bad one stops the export at once.
    train_params = source_train_params(model, output) if fmt == "gptsan-tf" else None
    config, flat = load_flat(model)
    refuse_overflow(flat, dtype)  # before anything is written
    with staged_output(output) as tmp:
        if fmt == "hf":
            hf.write(tmp, config, flat, dtype)
            return
        tf_checkpoint.write(tmp, flat, dtype)
        parameters = {"train_params": train_params, "model_params": config.to_model_params()}
        text = json.dumps(parameters, indent=1) + "\n"
        storage.write_text_atomic(storage.join(tmp, native.PARAMETERS), text)


def refuse_overflow(flat: dict[str, Any], dtype: str) -> None:
    """A UserError when a parameter holds values too large for `dtype` (float16's largest is 65504): the cast
    would store them as inf. Values that only lose precision are fine."""
    import jax.numpy as jnp  # bfloat16 is a numpy dtype once jax is imported

    if dtype == "float32":  # what the parameters are
        return
    target = jnp.dtype(dtype)
    peaks = {name: largest_magnitude(value) for name, value in flat.items()}
    # Rounding is monotonic, so a parameter overflows exactly when its largest magnitude does.
    with np.errstate(over="ignore"):
        over = sorted(name for name, peak in peaks.items() if np.isinf(np.float32(peak).astype(target)))
    if over:
        more = f" (and {len(over) - 1} more parameters)" if len(over) > 1 else ""
        raise UserError(f"--dtype {dtype}: {over[0]}{more} holds values up to {peaks[over[0]]:g} in magnitude, "
                        f"beyond {dtype}'s maximum {float(jnp.finfo(target).max):g} (they would be stored as "
                        f"inf); export in {'bfloat16 or ' if dtype == 'float16' else ''}float32")


def largest_magnitude(value: Any) -> float:
    """The largest absolute value among the finite values of `value` (0.0 when it has none)."""
    value = np.asarray(value, np.float32)
    if value.size == 0:
        return 0.0
    high, low = float(value.max()), float(value.min())  # no |value| copy of a large tensor
    if np.isfinite(high) and np.isfinite(low):
        return max(high, -low)
    finite = value[np.isfinite(value)]  # an inf or nan already there is kept as it is, not an overflow
    return float(np.abs(finite).max()) if finite.size else 0.0


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    export(args.model, args.format, args.output, args.dtype)
    print(f"wrote {args.format} model to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
