"""Weights for inference: matrices stored in the compute dtype, so a bfloat16 decode step reads half the
bytes. Vectors (biases, LayerNorm), the float32 router and the spout network stay float32."""

from __future__ import annotations

import jax.numpy as jnp

from gptsan.model import flatten, unflatten

KEEP_FLOAT32 = ("/switch_gating/", "pasts/")


def cast_for_compute(params, dtype: str):
    if jnp.dtype(dtype) == jnp.float32:
        return params
    flat = flatten(params)
    return unflatten({
        name: value if value.ndim < 2 or any(key in name for key in KEEP_FLOAT32) else value.astype(dtype)
        for name, value in flat.items()
    })
