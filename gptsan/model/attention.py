"""Multi-head self-attention with GPTSAN's prefix-LM mask and an optional preallocated KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptsan.model.config import ModelConfig
from gptsan.model.dense import InferenceProjection
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


CAUSAL_QUERY_BLOCK = 128


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, past_k: jax.Array | None, past_v: jax.Array | None,
                     query_block: int = CAUSAL_QUERY_BLOCK) -> jax.Array:
    """Causal self-attention over new tokens, after `past` keys every query sees (the spout slot), computed
    by query blocks so that key blocks wholly in a block's future are never touched: about 5/8 of the
    work of the full T x T score matrix for 4 blocks (training's common case; `attention_mask` covers the
    rest). q, k, v [B, T, H, dh]; past_k, past_v [B, P, H, dh] or None. Returns [B, H, T, dh] (heads-major,
    the layout the score matmuls want).
    """
    dtype = q.dtype
    length = q.shape[1]
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q * q.shape[-1] ** -0.5, k, v))  # [B, H, T, dh]
    if past_k is not None:
        past_k, past_v = past_k.astype(dtype), past_v.astype(dtype)
    outs = []
    for start in range(0, length, query_block):
        end = min(start + query_block, length)
        scores = jnp.einsum("bhtk,bhsk->bhts", q[:, :, start:end], k[:, :, :end], preferred_element_type=jnp.float32)
        visible = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        # The mask is added, not selected: an addition's gradient passes through, where a select's is another
        # select over the scores (masked keys get weight 0, so their score gradient is 0 either way).
        scores = scores + jnp.where(visible, 0.0, -jnp.inf)  # every row sees its own key: never all -inf
        row_max = scores.max(axis=-1, keepdims=True)
        if past_k is not None:
            past_scores = jnp.einsum("bhtk,bshk->bhts", q[:, :, start:end], past_k,
                                     preferred_element_type=jnp.float32)
            row_max = jnp.maximum(row_max, past_scores.max(axis=-1, keepdims=True))
        # A shift the softmax does not depend on: no gradient flows through it (autodiff of the max would
        # compare every score with it and route back a gradient that sums to zero; without that, a bench-small
        # layer's forward and backward here took 25.9 instead of 34.0 ms).
        row_max = jax.lax.stop_gradient(row_max)
        weights = jnp.exp(scores - row_max)  # softmax numerators; normalised after the weighted sum
        total = weights.sum(axis=-1, keepdims=True)
        out = jnp.einsum("bhts,bhsk->bhtk", weights.astype(dtype), v[:, :, :end], preferred_element_type=jnp.float32)
        if past_k is not None:
            past_weights = jnp.exp(past_scores - row_max)
            total = total + past_weights.sum(axis=-1, keepdims=True)
            out = out + jnp.einsum("bhts,bshk->bhtk", past_weights.astype(dtype), past_v,
                                   preferred_element_type=jnp.float32)
        outs.append((out / total).astype(dtype))
    return jnp.concatenate(outs, axis=2)


class Attention(nn.Module):
    """GPTSAN's `att{l}`: qkv kernel [d, 3, H, dh] and o kernel [H, dh, d], no biases.

    `causal`: the caller promises the mask is exactly causal over the new tokens after an always-visible
    past (no prefix, no padding, no cache), so `causal_attention` can skip the masked half.
    """

    config: ModelConfig
    causal: bool = False
    inference: bool = False  # the qkv and o kernels as stored or transposed (gptsan/model/inference.py)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, past_k: jax.Array | None = None,
                 past_v: jax.Array | None = None, cache: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | None = None):
        """x [B, T, d]; mask [B, T, S].

        Without a cache, keys are `past ++ new` (past: the spout slot [B, 1, H, dh], or None).
        With a cache (this layer's k, v [B * H, S, dh]), `past ++ new` is written at slot `cache_index` and
        attention runs over the whole cache; the updated cache is returned.
        """
        c = self.config
        dtype = x.dtype
        batch, length, d = x.shape
        qkv_shape = (d, 3, c.num_header, c.head_dim)
        heads_width = c.num_header * c.head_dim
        qkv_width = 3 * heads_width
        # With a cache (a decode step's few tokens read every weight once) the projections are plain matmuls on
        # the kernels as stored or laid out: an einsum into another layout would transpose the kernel every step.
        if self.inference:  # [B, T, 3 * H * dh], through the stored kernel or its transpose
            qkv = InferenceProjection((d, qkv_width), stored_shape=qkv_shape, use_bias=False, name="qkv")(x)
        else:
            qkv_kernel, _ = Kernel(qkv_shape, ("embed", "qkv", "heads", "kv"), normal(0.02), name="qkv")()
            qkv = x @ qkv_kernel.astype(dtype).reshape(d, qkv_width) if cache is not None else None
        o_shape = (c.num_header, c.head_dim, c.num_hidden)
        if self.inference:
            o_projection = InferenceProjection((heads_width, d), stored_shape=o_shape, use_bias=False, name="o")

            def project(out: jax.Array, form: str) -> jax.Array:  # out [B, T, H, dh] or [B, H, T, dh] -> [B, T, d]
                return o_projection(jnp.einsum(f"{form}->bthk", out).reshape(batch, length, -1))
        else:
            o_kernel, _ = Kernel(o_shape, ("heads", "kv", "embed"), normal(0.02), name="o")()

            def project(out: jax.Array, form: str) -> jax.Array:
                return jnp.einsum(f"{form},hkd->btd", out, o_kernel.astype(dtype))

        if cache is not None:
            out, cache = self._attend_with_cache(qkv, mask, past_k, past_v, cache, cache_index)
            return project(out, "bthk"), cache
        if qkv is None:
            qkv = jnp.einsum("btd,dnhk->nbthk", x, qkv_kernel.astype(dtype))  # [3, B, T, H, dh]
        else:
            qkv = qkv.reshape(batch, length, *qkv_shape[1:]).transpose(2, 0, 1, 3, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.causal:
            return project(causal_attention(q, k, v, past_k, past_v), "bhtk"), None
        if past_k is not None:
            k = jnp.concatenate([past_k.astype(dtype), k], axis=1)
            v = jnp.concatenate([past_v.astype(dtype), v], axis=1)
        scores = jnp.einsum("bthk,bshk->bhts", q, k.astype(dtype)).astype(jnp.float32)
        scores = scores * (c.head_dim ** -0.5)
        scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, H, T, S]
        return project(jnp.einsum("bhts,bshk->bthk", probs, v.astype(dtype)), "bthk"), None

    def _attend_with_cache(self, qkv, mask, past_k, past_v, cache, cache_index):
        """The cached path (prefill and decoding), from qkv [B, T, 3 * H * dh] to the heads' outputs
        [B, T, H, dh] (before the o projection) and the updated cache. The new keys/values are written in place
        into the layer's [B * H, S, dh] cache, which the score and value matmuls read as it is (one batch axis,
        each head's keys and values contiguous)."""
        c = self.config
        dtype = qkv.dtype
        batch, length, _ = qkv.shape
        heads, head_dim = c.num_header, c.head_dim
        qkv = qkv.reshape(batch, length, 3, heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if past_k is not None:
            k = jnp.concatenate([past_k.astype(dtype), k], axis=1)
            v = jnp.concatenate([past_v.astype(dtype), v], axis=1)

        def by_head(x):  # [B, T, H, dh] -> [B * H, T, dh]
            return x.transpose(0, 2, 1, 3).reshape(batch * heads, x.shape[1], head_dim)

        cache_k, cache_v = cache
        cache_k = jax.lax.dynamic_update_slice(cache_k, by_head(k).astype(cache_k.dtype), (0, cache_index, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, by_head(v).astype(cache_v.dtype), (0, cache_index, 0))
        per_head = ((0,), (0,))
        scores = jax.lax.dot_general(cache_k.astype(dtype), by_head(q), (((2,), (2,)), per_head))  # [B * H, S, T]
        scores = scores.reshape(batch, heads, -1, length).transpose(0, 1, 3, 2).astype(jnp.float32)
        scores = jnp.where(mask[:, None], scores * head_dim ** -0.5, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, H, T, S]
        out = jax.lax.dot_general(probs.reshape(batch * heads, length, -1), cache_v.astype(dtype),
                                  (((2,), (1,)), per_head))  # [B * H, T, dh]
        return out.reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3), (cache_k, cache_v)
