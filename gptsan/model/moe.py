"""Switch feed-forward (`moe{l}`): a float32 top-1 router, experts, and the always-on tanh bypass.

Routing is written as small pure functions (router, positions in expert, aux loss, dispatch), with two
dispatch modes chosen by `ModelConfig.routing`:
  - "capacity": the original Mesh-TensorFlow grouped capacity. Tokens (batch x length, flattened) are split
    into groups of at most `group_size`; each expert takes at most `max(min_capacity, int(S * cf / E))`
    tokens per group, in token order; tokens past capacity get MoE output 0 (the bypass still applies).
  - "dropless": every token reaches its expert (tokens sorted by expert, one ragged matmul per weight).
Both dispatch by indices (gather/scatter), never by one-hot einsums.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptsan.model.config import ModelConfig
from gptsan.model.weights import Kernel, fan_in_normal, normal

AUX_LOSS_COEF = 0.01
FEW_TOKENS = 64  # dropless with at most this many tokens (decode steps) skips unchosen experts


def route(router_logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-1 routing in float32. logits [..., E] -> (expert [...] int32, gate [...], probs [..., E])."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    expert = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    gate = jnp.take_along_axis(probs, expert[..., None], axis=-1)[..., 0]
    return expert, gate, probs


def load_balancing_loss(probs: jax.Array, expert: jax.Array) -> jax.Array:
    """Switch aux loss for one layer: 0.01 * E^2 * mean over groups and experts of
    (mean router probability of e) * (fraction of tokens routed to e). probs [G, S, E], expert [G, S]."""
    num_experts = probs.shape[-1]
    density = jax.nn.one_hot(expert, num_experts, dtype=jnp.float32).mean(axis=1)  # [G, E]
    density_proxy = probs.mean(axis=1)  # [G, E]
    return AUX_LOSS_COEF * num_experts**2 * jnp.mean(density * density_proxy)


def group_count(num_tokens: int, group_size: int) -> int:
    """Smallest number of equal routing groups of at most `group_size` tokens (it divides num_tokens)."""
    groups = max(1, -(-num_tokens // group_size))
    while num_tokens % groups:
        groups += 1
    return groups


def expert_capacity(group_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    return max(min_capacity, int(group_tokens * capacity_factor / num_experts))


def positions_in_expert(expert: jax.Array, num_experts: int) -> jax.Array:
    """For each token, how many earlier tokens of its group chose the same expert. expert [G, S] -> [G, S]."""
    chosen = jax.nn.one_hot(expert, num_experts, dtype=jnp.int32)  # [G, S, E]
    before = jnp.cumsum(chosen, axis=1) - chosen
    return jnp.take_along_axis(before, expert[..., None], axis=-1)[..., 0]


def expert_ffn(x: jax.Array, wi: jax.Array, wo: jax.Array) -> jax.Array:
    """Per-expert FFN over a dispatch buffer. x [G, E, C, d], wi [E, d, f], wo [E, f, d] -> [G, E, C, d]."""
    h = jax.nn.relu(jnp.einsum("gecd,edf->gecf", x, wi))
    return jnp.einsum("gecf,efd->gecd", h, wo)


def capacity_dispatch(x: jax.Array, expert: jax.Array, wi: jax.Array, wo: jax.Array,
                      capacity: int) -> tuple[jax.Array, jax.Array]:
    """Grouped-capacity expert computation. x [G, S, d], expert [G, S] ->
    (expert output [G, S, d] (0 for dropped tokens), kept [G, S] bool)."""
    num_groups, group_tokens, d = x.shape
    num_experts = wi.shape[0]
    position = positions_in_expert(expert, num_experts)
    kept = position < capacity
    slot = jnp.where(kept, position, capacity)  # dropped tokens write past the end and are discarded
    g = jnp.arange(num_groups)[:, None]
    buffer = jnp.zeros((num_groups, num_experts, capacity, d), x.dtype)
    buffer = buffer.at[g, expert, slot].set(x, mode="drop")
    out = expert_ffn(buffer, wi, wo)
    y = out.at[g, expert, slot].get(mode="fill", fill_value=0)
    return y, kept


def dropless_dispatch(x: jax.Array, expert: jax.Array, wi: jax.Array, wo: jax.Array) -> jax.Array:
    """Every token through its expert: sort by expert, ragged matmuls, unsort. x [N, d], expert [N]."""
    num_experts = wi.shape[0]
    order = jnp.argsort(expert)
    group_sizes = jnp.bincount(expert, length=num_experts).astype(jnp.int32)
    h = jax.nn.relu(jax.lax.ragged_dot(x[order], wi, group_sizes))
    y_sorted = jax.lax.ragged_dot(h, wo, group_sizes)
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted)


def few_token_dispatch(x: jax.Array, expert: jax.Array, wi: jax.Array, wo: jax.Array) -> jax.Array:
    """Dropless for a few tokens (decoding): each expert that some token chose runs over all tokens and each
    token keeps its own expert's output; experts no token chose are skipped, so their weights are never read.
    x [N, d], expert [N]. Equals `dropless_dispatch`, which on CPU reads every expert for any N."""
    y = jnp.zeros_like(x)
    for e in range(wi.shape[0]):
        chosen = expert == e

        def run_expert(y, e=e, chosen=chosen):
            return jnp.where(chosen[:, None], jax.nn.relu(x @ wi[e]) @ wo[e], y)

        y = jax.lax.cond(jnp.any(chosen), run_expert, lambda y: y, y)
    return y


class SwitchFF(nn.Module):
    """GPTSAN's `moe{l}`: switch_gating [d, E], wi [E, d, 8d], wo [E, 8d, d], softmlp [d, d]; no biases."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        c = self.config
        d, f, num_experts = c.num_hidden, c.num_ff_hidden, c.num_experts
        router, _ = Kernel((d, num_experts), ("embed", "expert_route"), fan_in_normal(),
                           name="switch_gating")()
        wi, _ = Kernel((num_experts, d, f), ("expert", "embed", "mlp"), fan_in_normal(-2, (0,)), name="wi")()
        wo, _ = Kernel((num_experts, f, d), ("expert", "mlp", "embed"), fan_in_normal(-2, (0,)), name="wo")()
        softmlp, _ = Kernel((d, d), ("embed", "embed_out"), normal(0.01), name="softmlp")()

        batch, length, _ = x.shape
        num_tokens = batch * length
        router_in = x.astype(jnp.float32)
        if train and c.router_jitter > 0:
            jitter = jax.random.uniform(self.make_rng("jitter"), router_in.shape, jnp.float32,
                                        1.0 - c.router_jitter, 1.0 + c.router_jitter)
            router_in = router_in * jitter
        expert, gate, probs = route(router_in @ router)  # [B, T], [B, T], [B, T, E]

        wi_c, wo_c = wi.astype(x.dtype), wo.astype(x.dtype)
        groups = group_count(num_tokens, c.group_size)
        group_tokens = num_tokens // groups
        aux = load_balancing_loss(probs.reshape(groups, group_tokens, -1), expert.reshape(groups, -1))
        if c.routing == "capacity":
            cf = c.capacity_factor_train if train else c.capacity_factor_eval
            capacity = expert_capacity(group_tokens, num_experts, cf, c.min_capacity)
            y, kept = capacity_dispatch(x.reshape(groups, group_tokens, d), expert.reshape(groups, -1),
                                        wi_c, wo_c, capacity)
            y = y.reshape(batch, length, d)
            dropped = 1.0 - kept.astype(jnp.float32).mean()
        else:
            dispatch = few_token_dispatch if num_tokens <= FEW_TOKENS else dropless_dispatch
            y = dispatch(x.reshape(num_tokens, d), expert.reshape(-1), wi_c, wo_c)
            y = y.reshape(batch, length, d)
            dropped = jnp.zeros((), jnp.float32)

        moe_out = y * gate[..., None].astype(x.dtype)
        bypass = jnp.tanh(x @ softmlp.astype(x.dtype))
        load = jnp.bincount(expert.reshape(-1), length=num_experts) / num_tokens
        return moe_out + bypass, {"aux_loss": aux, "dropped_fraction": dropped, "expert_load": load}
