"""Switch routing on hand-made inputs: capacity drops, aux loss, dropless dispatch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.model import ModelConfig
from gptsan.model.moe import (
    SwitchFF,
    capacity_kept,
    expert_capacity,
    expert_ffn,
    group_count,
    load_balancing_loss,
    positions_in_expert,
    route,
    window_sizes,
)


def reference_expert_ffn(x, expert, wi, wo):
    """Loop over tokens: each through its own expert."""
    return np.stack([np.maximum(x[n] @ wi[e], 0) @ wo[e] for n, e in enumerate(expert)])


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    num_experts, d, f = 3, 4, 8
    wi = rng.normal(size=(num_experts, d, f)).astype(np.float32)
    wo = rng.normal(size=(num_experts, f, d)).astype(np.float32)
    return wi, wo


def test_route_takes_top1_in_float32():
    logits = jnp.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]], jnp.bfloat16)
    expert, gate, probs = route(logits)
    assert probs.dtype == jnp.float32
    np.testing.assert_array_equal(expert, [1, 2])
    expected = np.exp([3.0, 5.0]) / np.array([np.exp([1, 3, 2]).sum(), np.exp([0, 0, 5]).sum()])
    np.testing.assert_allclose(gate, expected, rtol=1e-6)


def test_positions_count_earlier_tokens_of_the_same_expert():
    expert = jnp.array([[0, 1, 0, 0, 2, 1, 0]])
    np.testing.assert_array_equal(positions_in_expert(expert, 3), [[0, 0, 1, 2, 0, 1, 3]])


def test_capacity_drops_exactly_the_tokens_past_capacity_in_each_group(weights):
    wi, wo = weights
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 4)).astype(np.float32)
    # group 0: expert 0 chosen 4 times (tokens 0,1,3,5); capacity 2 keeps tokens 0 and 1 only.
    # group 1: expert 2 chosen 3 times (tokens 0,2,4); keeps 0 and 2.
    expert = np.array([[0, 0, 1, 0, 2, 0], [2, 1, 2, 0, 2, 1]])
    kept = capacity_kept(jnp.asarray(expert), 3, 2)
    expected_kept = np.array([[1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 1]], bool)
    np.testing.assert_array_equal(kept, expected_kept)
    y = expert_ffn(jnp.asarray(x.reshape(12, 4)), jnp.asarray(expert.reshape(-1)), kept.reshape(-1),
                   jnp.asarray(wi), jnp.asarray(wo))
    ref = reference_expert_ffn(x.reshape(12, 4), expert.reshape(-1), wi, wo) * expected_kept.reshape(-1, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 9, 300])
def test_dropless_drops_none_and_equals_loop_over_tokens(weights, num_tokens):
    """Unbalanced routing (one expert takes most tokens), few tokens (one block) and many (several)."""
    wi, wo = weights
    rng = np.random.default_rng(2)
    x = rng.normal(size=(num_tokens, 4)).astype(np.float32)
    expert = np.where(rng.random(num_tokens) < 0.8, 0, rng.integers(0, 3, num_tokens))
    y = expert_ffn(jnp.asarray(x), jnp.asarray(expert), jnp.ones(num_tokens, bool), jnp.asarray(wi),
                   jnp.asarray(wo))
    np.testing.assert_allclose(y, reference_expert_ffn(x, expert, wi, wo), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [200, 40])
def test_expert_ffn_gradients_equal_the_dense_reference(weights, num_tokens):
    """Both paths' gradients (windows with the custom VJP; few tokens) equal autodiff of a per-token loop."""
    wi, wo = (jnp.asarray(w) for w in weights)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(num_tokens, 4)).astype(np.float32))
    expert = jnp.asarray(rng.integers(0, 3, num_tokens))
    kept = jnp.asarray(rng.random(num_tokens) < 0.7)
    target = jnp.asarray(rng.normal(size=(num_tokens, 4)).astype(np.float32))

    def dense(x, wi, wo):
        h = jax.nn.relu(jnp.einsum("nd,ndf->nf", x, wi[expert]))
        return jnp.einsum("nf,nfd->nd", h, wo[expert]) * kept[:, None]

    def loss(ffn):
        return lambda x, wi, wo: jnp.sum((ffn(x, wi, wo) - target) ** 2)

    ours = jax.grad(loss(lambda x, wi, wo: expert_ffn(x, expert, kept, wi, wo)), argnums=(0, 1, 2))(x, wi, wo)
    reference = jax.grad(loss(dense), argnums=(0, 1, 2))(x, wi, wo)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["one_expert_takes_all", "one_expert_empty", "skewed", "last_expert_only"])
def test_sorted_expert_ffn_values_and_gradients_equal_the_dense_reference(pattern):
    """Window sizes chosen per expert at run time (incl. windows clamped at the buffer's end, experts with no
    tokens and one with all): output and the custom gradients equal autodiff of a per-token computation."""
    rng = np.random.default_rng(4)
    num_experts, d, f, num_tokens = 4, 8, 16, 150
    wi = jnp.asarray(rng.normal(size=(num_experts, d, f)).astype(np.float32))
    wo = jnp.asarray(rng.normal(size=(num_experts, f, d)).astype(np.float32))
    counts = {
        "one_expert_takes_all": [0, 150, 0, 0],
        "one_expert_empty": [40, 0, 77, 33],
        "skewed": [120, 3, 26, 1],
        "last_expert_only": [0, 0, 0, 150],
    }[pattern]
    expert = jnp.asarray(rng.permutation(np.repeat(np.arange(num_experts), counts)))
    x = jnp.asarray(rng.normal(size=(num_tokens, d)).astype(np.float32))
    target = jnp.asarray(rng.normal(size=(num_tokens, d)).astype(np.float32))
    kept = jnp.ones(num_tokens, bool)

    def dense(x, wi, wo):
        return jnp.einsum("nf,nfd->nd", jax.nn.relu(jnp.einsum("nd,ndf->nf", x, wi[expert])), wo[expert])

    def ours(x, wi, wo):
        return expert_ffn(x, expert, kept, wi, wo)

    np.testing.assert_allclose(ours(x, wi, wo), dense(x, wi, wo), rtol=1e-4, atol=1e-4)

    def loss(ffn):
        return lambda x, wi, wo: jnp.sum((ffn(x, wi, wo) - target) ** 2)

    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, wi, wo)
    want = jax.grad(loss(dense), argnums=(0, 1, 2))(x, wi, wo)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    unused = [e for e, c in enumerate(counts) if c == 0]
    np.testing.assert_array_equal(np.asarray(got[1])[unused], 0)
    np.testing.assert_array_equal(np.asarray(got[2])[unused], 0)


def test_window_sizes_keep_decoding_to_one_window_and_padding_small():
    assert window_sizes(1) == (1,)
    assert window_sizes(16) == (16,)
    sizes = window_sizes(2048)
    assert sizes[0] == 32 and sizes[-1] == 2048
    assert all(s % 32 == 0 for s in sizes)
    assert all(b - a <= max(32, a // 8 + 32) for a, b in zip(sizes, sizes[1:], strict=False))


def test_aux_loss_equals_hand_computation():
    probs = jnp.array([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]]])
    expert = jnp.array([[0, 0, 2, 1]])
    # fraction routed: e0 2/4, e1 1/4, e2 1/4; mean prob: e0 0.4, e1 0.275, e2 0.325.
    # 0.01 * E^2 * mean_e(f_e * p_e) = 0.01 * 9 * (0.5*0.4 + 0.25*0.275 + 0.25*0.325) / 3
    expected = 0.01 * 9 * (0.2 + 0.06875 + 0.08125) / 3
    np.testing.assert_allclose(load_balancing_loss(probs, expert), expected, rtol=1e-6)


def test_balanced_routing_gives_the_minimum_aux_loss():
    probs = jnp.full((1, 4, 2), 0.5)
    expert = jnp.array([[0, 1, 0, 1]])
    np.testing.assert_allclose(load_balancing_loss(probs, expert), 0.01, rtol=1e-6)


def test_groups_and_capacity_follow_the_original():
    assert group_count(2048, 1024) == 2
    assert group_count(48, 1024) == 1
    assert group_count(3000, 1024) == 3  # 1000 tokens a group
    assert group_count(1030, 1024) == 2
    assert expert_capacity(1024, 16, 1.25, 4) == 80
    assert expert_capacity(1024, 16, 2.0, 4) == 128
    assert expert_capacity(8, 16, 2.0, 4) == 4


def test_switch_layer_gives_dropped_tokens_only_the_bypass():
    config = ModelConfig(num_contexts=16, num_switch_layers=1, num_ext_layers=0, num_hidden=8, num_header=2,
                         num_experts=2, num_vocabulary=32, num_spout=4, routing="capacity",
                         capacity_factor_eval=0.5, min_capacity=1)
    layer = SwitchFF(config)
    x = jax.random.normal(jax.random.key(0), (1, 8, 8))
    params = nn.meta.unbox(layer.init(jax.random.key(1), x)["params"])
    # Route every token to expert 1: a router kernel that only looks at a constant-positive feature.
    x = x.at[..., 0].set(1.0)
    router = np.zeros((8, 2), np.float32)
    router[0, 1] = 5.0
    params["switch_gating"]["kernel"] = jnp.asarray(router)
    out, stats = layer.apply({"params": params}, x)
    capacity = 2  # max(1, int(8 * 0.5 / 2))
    bypass = jnp.tanh(x @ params["softmlp"]["kernel"])
    np.testing.assert_allclose(out[0, capacity:], bypass[0, capacity:], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[0, :capacity], bypass[0, :capacity])
    np.testing.assert_allclose(stats["dropped_fraction"], 6 / 8)
    np.testing.assert_allclose(stats["expert_load"], [0.0, 1.0])


def test_router_jitter_only_in_training():
    config = ModelConfig(num_contexts=16, num_switch_layers=1, num_ext_layers=0, num_hidden=8, num_header=2,
                         num_experts=4, num_vocabulary=32, num_spout=4, router_jitter=0.5)
    layer = SwitchFF(config)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8))
    params = layer.init(jax.random.key(1), x)["params"]
    eval_a, _ = layer.apply({"params": params}, x)
    eval_b, _ = layer.apply({"params": params}, x)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, _ = layer.apply({"params": params}, x, train=True, rngs={"jitter": jax.random.key(2)})
    train_b, _ = layer.apply({"params": params}, x, train=True, rngs={"jitter": jax.random.key(3)})
    assert not np.allclose(train_a, train_b)
