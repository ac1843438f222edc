"""The blocked causal attention (training's path) against the masked full score matrix (the general path):
outputs and gradients, across several query blocks, with and without the spout's past slot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.model.attention import attention_mask, causal_attention

BATCH, HEADS, HEAD_DIM = 2, 3, 8


def full_attention(q, k, v, past_k, past_v):
    """Softmax over the whole masked score matrix, as `Attention` does for prefix, padding or a cache."""
    past = 0 if past_k is None else past_k.shape[1]
    if past:
        k, v = jnp.concatenate([past_k, k], axis=1), jnp.concatenate([past_v, v], axis=1)
    slots = jnp.arange(k.shape[1])
    mask = attention_mask(slots[past:], slots, jnp.ones((BATCH, k.shape[1]), bool),
                          jnp.full((BATCH,), past, jnp.int32))
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshk->bhtk", probs, v)


def qkv(length, with_past, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(keys[i], (BATCH, length, HEADS, HEAD_DIM)) for i in range(3))
    past = [jax.random.normal(keys[i], (BATCH, 1, HEADS, HEAD_DIM)) for i in (3, 4)] if with_past else [None, None]
    return q, k, v, *past


@pytest.mark.parametrize("length,block", [(50, 16), (48, 16), (7, 128), (33, 1)])
@pytest.mark.parametrize("with_past", [False, True])
def test_blocked_equals_masked_full_attention(length, block, with_past):
    q, k, v, past_k, past_v = qkv(length, with_past)
    want = full_attention(q, k, v, past_k, past_v)
    # jitted: run op by op, block 1's 33 blocks of growing key prefixes compiled hundreds of small programs (74 s)
    got = jax.jit(causal_attention, static_argnames="query_block")(q, k, v, past_k, past_v, query_block=block)
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("with_past", [False, True])
def test_blocked_gradients_equal_autodiff_of_the_full_matrix(with_past):
    q, k, v, past_k, past_v = qkv(40, with_past, seed=1)
    weights = jax.random.normal(jax.random.key(9), (BATCH, HEADS, 40, HEAD_DIM))
    arguments = (0, 1, 2, 3, 4) if with_past else (0, 1, 2)

    def loss(attention):
        return lambda *a: jnp.sum(attention(*a) * weights)

    blocked = lambda q, k, v, pk=None, pv=None: causal_attention(q, k, v, pk, pv, query_block=16)  # noqa: E731
    full = lambda q, k, v, pk=None, pv=None: full_attention(q, k, v, pk, pv)  # noqa: E731
    inputs = (q, k, v, past_k, past_v)[:len(arguments)]
    want = jax.grad(loss(full), argnums=arguments)(*inputs)
    got = jax.grad(loss(blocked), argnums=arguments)(*inputs)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5)
