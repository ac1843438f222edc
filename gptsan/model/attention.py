"""Multi-head self-attention with GPTSAN's prefix-LM mask and an optional preallocated KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptsan.model.config import ModelConfig
from gptsan.model.weights import Kernel, normal


def attention_mask(query_slots: jax.Array, key_slots: jax.Array, key_valid: jax.Array,
                   prefix_end: jax.Array) -> jax.Array:
    """Which keys each query sees: [B, T, S] booleans.

    Slots index the key/value sequence (spout slot, left padding and tokens). Key j is visible to query i
    when it is valid (not padding, already written) and either j <= i (causal) or j < prefix_end (the
    bidirectional prefix of a prefix-LM).
      query_slots [T], key_slots [S], key_valid [B, S], prefix_end [B].
    """
    causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    prefix = key_slots[None, :] < prefix_end[:, None]  # [B, S]
    return key_valid[:, None, :] & (causal[None] | prefix[:, None, :])


class Attention(nn.Module):
    """GPTSAN's `att{l}`: qkv kernel [d, 3, H, dh] and o kernel [H, dh, d], no biases."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, past_k: jax.Array | None = None,
                 past_v: jax.Array | None = None, cache: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | None = None):
        """x [B, T, d]; mask [B, T, S].

        Without a cache, keys are `past ++ new` (past: the spout slot [B, 1, H, dh], or None).
        With a cache (k, v [B, S, H, dh]), `past ++ new` is written at `cache_index` and attention runs over
        the whole cache; the updated cache is returned.
        """
        c = self.config
        dtype = x.dtype
        qkv_kernel, _ = Kernel((c.num_hidden, 3, c.num_header, c.head_dim), ("embed", "qkv", "heads", "kv"),
                               normal(0.02), name="qkv")()
        o_kernel, _ = Kernel((c.num_header, c.head_dim, c.num_hidden), ("heads", "kv", "embed"),
                             normal(0.02), name="o")()
        qkv = jnp.einsum("btd,dnhk->nbthk", x, qkv_kernel.astype(dtype))  # [3, B, T, H, dh]
        q, k, v = qkv[0], qkv[1], qkv[2]
        if past_k is not None:
            k = jnp.concatenate([past_k.astype(dtype), k], axis=1)
            v = jnp.concatenate([past_v.astype(dtype), v], axis=1)
        if cache is not None:
            cache_k, cache_v = cache
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
            cache = (k, v)
        scores = jnp.einsum("bthk,bshk->bhts", q, k.astype(dtype)).astype(jnp.float32)
        scores = scores * (c.head_dim ** -0.5)
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, H, T, S]
        out = jnp.einsum("bhts,bshk->bthk", probs, v.astype(dtype))
        return jnp.einsum("bthk,hkd->btd", out, o_kernel.astype(dtype)), cache
