"""The decode step's expert FFN (inference layout: one array per expert, wi and wo as stored or both
transposed) equals the stacked layout's dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.model.moe import chosen_experts_ffn, expert_ffn


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 3, 8])
def test_chosen_experts_ffn_equals_expert_ffn(num_tokens, transposed):
    keys = jax.random.split(jax.random.key(0), 4)
    num_experts, d, f = 4, 16, 64
    x = jax.random.normal(keys[0], (num_tokens, d))
    wi = jax.random.normal(keys[1], (num_experts, d, f)) / d**0.5
    wo = jax.random.normal(keys[2], (num_experts, f, d)) / f**0.5
    expert = jax.random.randint(keys[3], (num_tokens,), 0, num_experts)
    kept = jnp.arange(num_tokens) % 3 != 2  # some tokens dropped (capacity routing)
    expected = expert_ffn(x, expert, kept, wi, wo)
    wi_per_expert, wo_per_expert = (tuple(w[e].T if transposed else w[e] for e in range(num_experts))
                                    for w in (wi, wo))
    got = jax.jit(chosen_experts_ffn, static_argnums=5)(x, expert, kept, wi_per_expert, wo_per_expert, transposed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    magnitude = np.abs(np.asarray(expected)).max(axis=1)
    assert np.all(magnitude[np.asarray(kept)] > 0) and np.all(magnitude[~np.asarray(kept)] == 0)


def test_a_dropped_single_token_gets_zero():
    x = jnp.ones((1, 16))
    wi = tuple(jnp.ones((16, 64)) for _ in range(4))
    wo = tuple(jnp.ones((64, 16)) for _ in range(4))
    kept_out = chosen_experts_ffn(x, jnp.asarray([2]), jnp.asarray([True]), wi, wo)
    dropped_out = chosen_experts_ffn(x, jnp.asarray([2]), jnp.asarray([False]), wi, wo)
    np.testing.assert_array_equal(np.asarray(kept_out), np.full((1, 16), 16 * 64.0))
    np.testing.assert_array_equal(np.asarray(dropped_out), np.zeros((1, 16)))
