"""The extended layers' dense feed-forward: p1 (+bias) -> SiLU -> p2 (+bias)."""

from __future__ import annotations

import flax.linen as nn
import jax

from gptsan.model.config import ModelConfig
from gptsan.model.weights import Kernel, normal, param


def times_transposed(x: jax.Array, w_t: jax.Array) -> jax.Array:
    """x @ w_t.T for x [..., k], w_t [n, k], computed as (w_t @ x.T).T: the weight is the left operand, read
    along its rows, the fast matrix-vector form when they are long (gptsan/model/inference.py)."""
    rows = x.reshape(-1, x.shape[-1])
    return (w_t @ rows.T).T.reshape(*x.shape[:-1], w_t.shape[0])


class TransposedKernel(nn.Module):
    """The inference layout's `kernel_t` [n, k] of a [k, n] kernel, with its `bias` [n]."""

    shape_t: tuple[int, int]

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel_t = param(self, "kernel_t", self.shape_t, ("embed", "mlp"), normal(0.02))
        return kernel_t, param(self, "bias", self.shape_t[:1], ("embed",), nn.initializers.zeros)


class DenseFF(nn.Module):
    """`inference`: p2's kernel is read transposed, as `p2/kernel_t` [d, 4d] (gptsan/model/inference.py)."""

    config: ModelConfig
    inference: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.config.num_hidden, self.config.num_ext_hidden
        w1, b1 = Kernel((d, f), ("embed", "mlp"), normal(0.02), with_bias=True, name="p1")()
        h = nn.silu(x @ w1.astype(x.dtype) + b1.astype(x.dtype))  # [B, T, 4d]
        if self.inference:
            w2_t, b2 = TransposedKernel((d, f), name="p2")()
            return times_transposed(h, w2_t.astype(x.dtype)) + b2.astype(x.dtype)
        w2, b2 = Kernel((f, d), ("mlp", "embed"), normal(0.02), with_bias=True, name="p2")()
        return h @ w2.astype(x.dtype) + b2.astype(x.dtype)  # [B, T, d]

