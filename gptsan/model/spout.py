"""The spout network: a class vector [B, P] -> one extra key/value slot for every layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptsan.model.config import ModelConfig
from gptsan.model.weights import Kernel, normal

NUM_SPOUT_MLP = 8


class Spout(nn.Module):
    """GPTSAN's `pasts/*`: 8 x (P x P kernel, tanh), then `out` [P, L*2*d], no biases."""

    config: ModelConfig

    @nn.compact
    def __call__(self, spout: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns keys and values [L, B, 1, H, dh] in float32."""
        c = self.config
        p = c.num_spout
        h = spout.astype(jnp.float32)
        for i in range(NUM_SPOUT_MLP):
            kernel, _ = Kernel((p, p), ("spout", "spout_out"), normal(0.01), name=f"mlp{i}")()
            h = jnp.tanh(h @ kernel)
        out, _ = Kernel((p, c.num_layers * 2 * c.num_hidden), ("spout", "spout_kv"), normal(0.01),
                        name="out")()
        kv = (h @ out).reshape(-1, c.num_layers, 2, c.num_header, 1, c.head_dim)  # [B, L, 2, H, 1, dh]
        kv = kv.transpose(1, 2, 0, 4, 3, 5)  # [L, 2, B, 1, H, dh]
        return kv[:, 0], kv[:, 1]
