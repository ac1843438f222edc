"""The extended layers' dense feed-forward: p1 (+bias) -> SiLU -> p2 (+bias)."""

from __future__ import annotations

import flax.linen as nn
import jax

from gptsan.model.config import ModelConfig
from gptsan.model.weights import Kernel, normal


class DenseFF(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.config.num_hidden, self.config.num_ext_hidden
        w1, b1 = Kernel((d, f), ("embed", "mlp"), normal(0.02), with_bias=True, name="p1")()
        w2, b2 = Kernel((f, d), ("mlp", "embed"), normal(0.02), with_bias=True, name="p2")()
        h = nn.silu(x @ w1.astype(x.dtype) + b1.astype(x.dtype))  # [B, T, 4d]
        return h @ w2.astype(x.dtype) + b2.astype(x.dtype)  # [B, T, d]
