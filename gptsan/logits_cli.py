"""gptsan-logits: the logits of a model (any checkpoint format) for given token ids, as a .npy file.

    gptsan-logits --model DIR --ids IDS.npy [--num_precontext N.npy] [--spout S.npy] [--dtype float32]
                  --output LOGITS.npy

IDS [B, T] integers in [0, vocabulary); N [B] prefix lengths (prefix-LM: the first N[b] positions of row b
see each other); S [B, num_spout] spout vectors. Output: float32 logits [B, T, vocabulary].
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
from typing import TYPE_CHECKING

import numpy as np

from gptsan import storage
from gptsan.errors import UserError, cli_main

# JAX, Flax and the model are imported inside the functions that use them (seconds of imports): under cli_main,
# so a Ctrl-C while they load ends in `interrupted`, not a traceback.
if TYPE_CHECKING:
    from gptsan.model.config import ModelConfig


def build_parser() -> argparse.ArgumentParser:
    from gptsan.model.config import COMPUTE_DTYPES, ROUTING_MODES  # the gptsan.model package brings JAX and Flax

    parser = argparse.ArgumentParser(prog="gptsan-logits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory: native, original TF or HF folder")
    parser.add_argument("--ids", required=True, help=".npy of token ids [batch, length]")
    parser.add_argument("--num_precontext", help=".npy of prefix lengths [batch] (default: causal)")
    parser.add_argument("--spout", help=".npy of spout vectors [batch, num_spout] (default: no spout)")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="compute dtype")
    parser.add_argument("--routing", default="dropless", choices=ROUTING_MODES, help="expert routing")
    parser.add_argument("--output", required=True, help="where to write the logits .npy")
    return parser


def read_npy(path: str, flag: str) -> np.ndarray:
    try:
        with storage.open_file(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: file not found") from None
    if not data.startswith(np.lib.format.MAGIC_PREFIX):
        raise UserError(f"{flag} {path}: not a .npy file (expected an array written by numpy.save)")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as err:
        raise UserError(f"{flag} {path}: not a readable .npy array ({err})") from None


def check_inputs(config: ModelConfig, ids: np.ndarray, num_precontext: np.ndarray | None,
                 spout: np.ndarray | None) -> None:
    """A UserError naming the flag for inputs the model cannot take."""
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"--ids: expected integer token ids of shape [batch, length], got {ids.dtype} "
                        f"{list(ids.shape)}")
    batch, length = ids.shape
    if length > config.num_contexts:
        raise UserError(f"--ids: length {length} exceeds the model's context of {config.num_contexts}")
    if ids.min() < 0 or ids.max() >= config.num_vocabulary:
        raise UserError(f"--ids: token ids must lie in [0, {config.num_vocabulary}), found "
                        f"{int(ids.min())}..{int(ids.max())}")
    if num_precontext is not None:
        if num_precontext.shape != (batch,) or not np.issubdtype(num_precontext.dtype, np.integer):
            raise UserError(f"--num_precontext: expected integers of shape [{batch}], got "
                            f"{num_precontext.dtype} {list(num_precontext.shape)}")
        if num_precontext.min() < 0 or num_precontext.max() > length:
            raise UserError(f"--num_precontext: prefix lengths must lie in [0, {length}]")
    if spout is not None:
        if spout.shape != (batch, config.num_spout) or not np.issubdtype(spout.dtype, np.number) \
                or np.iscomplexobj(spout):
            raise UserError(f"--spout: expected real numbers of shape [{batch}, {config.num_spout}], got "
                            f"{spout.dtype} {list(spout.shape)}")
        with np.errstate(over="ignore"):
            if not np.all(np.isfinite(spout.astype(np.float32))):  # as the model reads them: 1e40 is inf there
                raise UserError("--spout: values must be finite in float32 (at most 3.4e38 in magnitude)")


@functools.cache
def jitted_forward():
    """The model's forward as one jitted function (`config` static), made on first use: JAX loads then."""
    import jax

    from gptsan.model import GPTSAN

    def forward(config: ModelConfig, params, ids, num_precontext, spout):
        return GPTSAN(config).apply({"params": params}, ids, num_precontext=num_precontext, spout=spout).logits

    return jax.jit(forward, static_argnums=0)


def compute_logits(config: ModelConfig, params, ids, num_precontext=None, spout=None) -> np.ndarray:
    """Float32 logits [B, T, V] of one full forward (compiled once per config and input shapes)."""
    import jax.numpy as jnp

    optional = [None if a is None else jnp.asarray(a, dtype) for a, dtype in
                ((num_precontext, jnp.int32), (spout, jnp.float32))]
    return np.asarray(jitted_forward()(config, params, jnp.asarray(ids, jnp.int32), *optional), np.float32)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ids = read_npy(args.ids, "--ids")
    num_precontext = read_npy(args.num_precontext, "--num_precontext") if args.num_precontext else None
    spout = read_npy(args.spout, "--spout") if args.spout else None
    storage.check_output_file(args.output, "--output")

    from gptsan.checkpoint import load_model

    config, params = load_model(args.model, dtype=args.dtype, routing=args.routing)
    check_inputs(config, ids, num_precontext, spout)
    logits = compute_logits(config, params, ids, num_precontext, spout)
    buffer = io.BytesIO()
    np.save(buffer, logits)
    storage.write_bytes_atomic(args.output, buffer.getvalue())
    print(f"wrote logits {list(logits.shape)} to {args.output}", file=storage.status_stream(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
