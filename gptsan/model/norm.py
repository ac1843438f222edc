"""GPTSAN's LayerNorm: parameters `g` and `b`, always computed in float32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptsan.model.weights import ones, param, zeros


class LayerNorm(nn.Module):
    size: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        g = param(self, "g", (self.size,), ("embed",), ones)
        b = param(self, "b", (self.size,), ("embed",), zeros)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * g + b
        return y.astype(x.dtype)
