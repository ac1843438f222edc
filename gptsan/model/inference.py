"""The inference layout: the same weights, stored the way a decode step reads them fastest.

A decode step multiplies a few token vectors by every weight matrix it uses, so it is bound by how fast the
matrices stream from memory. On CPU (XLA's matrix-vector kernels) that speed depends on the layout: a
matrix whose rows are long (4096 or 36000 floats) streams at ~30-40 GB/s on the bench machine, one whose rows
are 512 floats at ~20 GB/s; and `w[e]` of a stacked [E, d, f] expert array is copied before its matmul
(read + write + read). So generation (`GPTSAN(config, inference=True)`: Decoder, BeamDecoder) reads:

  model/wte_t             [d, V]  model/wte transposed: the tied head is h @ wte_t, the embedding a column
  moe{l}/wi/expert{e}     [d, f]  moe{l}/wi/kernel[e], one array per expert (a lax.switch picks it, no copy)
  moe{l}/wo/expert{e}_t   [d, f]  moe{l}/wo/kernel[e] transposed
  mlp{l}/p2/kernel_t      [d, f]  mlp{l}/p2/kernel transposed

and every other parameter as stored. Checkpoints, training and `ignore-params.json` keep GPTSAN's names and
shapes; this layout exists only in memory, made by `to_inference_layout` after loading.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from gptsan.model.params import Params, flatten, unflatten

_EXPERTS_IN = re.compile(r"model/moe\d+/wi/kernel")
_EXPERTS_OUT = re.compile(r"model/moe\d+/wo/kernel")
_DENSE_OUT = re.compile(r"model/mlp\d+/p2/kernel")


def to_inference_layout(params: Params) -> Params:
    """GPTSAN's parameter tree -> the inference layout (module docstring). Values are unchanged; the input
    is not modified (the converted matrices exist twice until the caller drops it)."""
    out = {}
    for name, value in flatten(params).items():
        scope = name.rsplit("/", 1)[0]
        if name == "model/wte":
            out["model/wte_t"] = jnp.asarray(value).T
        elif _EXPERTS_IN.fullmatch(name):
            out.update({f"{scope}/expert{e}": jnp.asarray(value[e]) for e in range(value.shape[0])})
        elif _EXPERTS_OUT.fullmatch(name):
            out.update({f"{scope}/expert{e}_t": jnp.asarray(value[e]).T for e in range(value.shape[0])})
        elif _DENSE_OUT.fullmatch(name):
            out[f"{scope}/kernel_t"] = jnp.asarray(value).T
        else:
            out[name] = value
    return unflatten(out)

