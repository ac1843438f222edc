"""The extended layers' dense feed-forward: p1 (+bias) -> SiLU -> p2 (+bias)."""

from __future__ import annotations

import flax.linen as nn
import jax

from gptsan.model.config import ModelConfig
from gptsan.model.weights import Kernel, normal, param


def matmul(x: jax.Array, w: jax.Array, transposed: bool = False) -> jax.Array:
    """x @ w for w [k, n]; `transposed`: w is stored as its transpose [n, k] and x @ w.T is computed as
    (w @ x.T).T, so that the weight is the left operand read along its rows (the fast matrix-vector form when
    they are long; gptsan/model/inference.py)."""
    if not transposed:
        return x @ w
    rows = x.reshape(-1, x.shape[-1])
    return (w @ rows.T).T.reshape(*x.shape[:-1], w.shape[0])


class InferenceProjection(nn.Module):
    """x @ kernel (+ bias) in the inference layout: `kernel` as stored (`stored_shape`, default [k, n]), or
    `kernel_t` [n, k] where the weights were laid out for one-row decoding (gptsan/model/inference.py)."""

    shape: tuple[int, int]
    stored_shape: tuple[int, ...] | None = None
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, n = self.shape
        transposed = self.has_variable("params", "kernel_t")
        shape, name = ((n, k), "kernel_t") if transposed else (self.stored_shape or (k, n), "kernel")
        kernel = param(self, name, shape, ("embed", "mlp") if len(shape) == 2 else (None,) * len(shape), normal(0.02))
        y = matmul(x, kernel.astype(x.dtype).reshape((n, k) if transposed else (k, n)), transposed)
        if self.use_bias:
            y = y + param(self, "bias", (n,), ("embed",), nn.initializers.zeros).astype(x.dtype)
        return y


class DenseFF(nn.Module):
    """`inference`: p1 and p2 in the inference layout (`InferenceProjection`)."""

    config: ModelConfig
    inference: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.config.num_hidden, self.config.num_ext_hidden
        if self.inference:
            h = nn.silu(InferenceProjection((d, f), name="p1")(x))
            return InferenceProjection((f, d), name="p2")(h)
        w1, b1 = Kernel((d, f), ("embed", "mlp"), normal(0.02), with_bias=True, name="p1")()
        h = nn.silu(x @ w1.astype(x.dtype) + b1.astype(x.dtype))  # [B, T, 4d]
        w2, b2 = Kernel((f, d), ("mlp", "embed"), normal(0.02), with_bias=True, name="p2")()
        return h @ w2.astype(x.dtype) + b2.astype(x.dtype)  # [B, T, d]
