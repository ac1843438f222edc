"""The inference layout: the same weights, stored the way a decode step reads them fastest.

A decode step multiplies a few token vectors by every weight matrix it uses, so it is bound by how fast the
matrices stream from memory, and on CPU (XLA's kernels) that depends on the layout:
  - `w[e]` of a stacked [E, d, f] expert array is copied before its matmul (read + write + read again);
  - with one token row, the product read as `(w_t @ x.T).T` from the transposed matrix is 5-8% faster over a
    whole step than `x @ w` (bench-small, 2-vCPU bench machine, 2026-12-01: a chain of the step's products,
    4.15 -> 3.95 ms at 40-48 GB/s, 3.6 -> 3.3 ms at 70-77 GB/s); with 2-8 token rows, XLA's matrix-matrix
    kernels read the stored form faster than its transpose (13-14 vs 9 GB/s on the first bench machine).
So generation (`GPTSAN(config, inference=True)`: Decoder, BeamDecoder) reads:

  model/wte_t             [d, V]  model/wte transposed: the tied head is h @ wte_t, the embedding a column
  moe{l}/w[io]/expert{e}  [d, f] / [f, d]  moe{l}/w[io]/kernel[e], one array per expert (a lax.switch picks
                          it, no copy); for one-row decoding `expert{e}_t`, transposed
  att{l}/qkv/kernel_t     [3*H*dh, d]  one-row decoding only: att{l}/qkv/kernel [d, 3, H, dh] as a matrix,
                          transposed (otherwise the kernel as stored)
  att{l}/o/kernel_t       [d, H*dh]  one-row decoding only: att{l}/o/kernel [H, dh, d] as a matrix, transposed
  mlp{l}/p[12]/kernel_t   [f, d] / [d, f]  one-row decoding only: mlp{l}/p[12]/kernel transposed
  moe{l}/softmlp/kernel_t, dense/kernel_t  [d, d]  one-row decoding only: the kernel transposed

and every other parameter as stored. Checkpoints, training and `ignore-params.json` keep GPTSAN's names and
shapes; this layout exists only in memory, made by `to_inference_layout` from loaded weights (the inference
modules are never initialised). They read whichever form of each matrix they find.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp

from gptsan.model.params import Params, flatten, unflatten

_EXPERTS = re.compile(r"model/moe\d+/w[io]/kernel")
_PROJECTIONS = re.compile(r"model/(att\d+/(qkv|o)|mlp\d+/p[12]|moe\d+/softmlp|dense)/kernel")


def to_inference_layout(params: Params, rows: int = 1, release_input: bool = False) -> Params:
    """GPTSAN's parameter tree -> the inference layout (module docstring). `rows`: the token rows each decode
    step multiplies (batch x beam width); with 1, the other projections are stored transposed too. Values are unchanged.

    `release_input`: each leaf is removed from `params` as it is converted (`params` ends empty), so a caller
    that holds no other reference to the weights has both layouts of at most one matrix at a time, not of the
    whole model (gptsan-generate; GPTSAN-2.8B in float32 is 11 GB). Otherwise `params` is left as it is."""
    one_row = rows == 1
    out = {}
    for name, value in (_take_leaves(params) if release_input else flatten(params).items()):
        scope = name.rsplit("/", 1)[0]
        if name == "model/wte":
            out["model/wte_t"] = jnp.asarray(value).T
        elif _EXPERTS.fullmatch(name):
            for e in range(value.shape[0]):
                if one_row:
                    out[f"{scope}/expert{e}_t"] = jnp.asarray(value[e]).T
                else:
                    out[f"{scope}/expert{e}"] = jnp.asarray(value[e])
        elif _PROJECTIONS.fullmatch(name) and one_row:
            matrix = jnp.asarray(value)
            inputs = 2 if scope.endswith("/o") else 1  # o [H, dh, d] reads every head's output
            out[f"{scope}/kernel_t"] = matrix.reshape(math.prod(matrix.shape[:inputs]), -1).T
        else:
            out[name] = value
    return unflatten(out)


def _take_leaves(tree: Params) -> Iterator[tuple[str, Any]]:
    """(name, leaf) of every leaf of `tree`, which is emptied first; each leaf is let go once yielded."""
    flat = flatten(tree)
    tree.clear()
    for name in list(flat):
        yield name, flat.pop(name)
