"""The few-token (decoding) expert FFN equals the block-sparse one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.model import moe
from gptsan.model.moe import expert_ffn, streamed_expert_ffn


@pytest.mark.parametrize("num_tokens", [1, 3, 8])
def test_few_token_expert_ffn_equals_expert_ffn(num_tokens, monkeypatch):
    monkeypatch.setattr(moe, "STREAM_CHUNK_BYTES", 1024)  # several chunks per expert matrix
    keys = jax.random.split(jax.random.key(0), 4)
    num_experts, d, f = 4, 16, 64
    x = jax.random.normal(keys[0], (num_tokens, d))
    wi = jax.random.normal(keys[1], (num_experts, d, f)) / d**0.5
    wo = jax.random.normal(keys[2], (num_experts, f, d)) / f**0.5
    expert = jax.random.randint(keys[3], (num_tokens,), 0, num_experts)
    kept = jnp.arange(num_tokens) % 3 != 2  # some tokens dropped (capacity routing)
    expected = expert_ffn(x, expert, kept, wi, wo)
    np.testing.assert_allclose(np.asarray(streamed_expert_ffn(x, expert, kept, wi, wo)), np.asarray(expected),
                               rtol=1e-5, atol=1e-5)
