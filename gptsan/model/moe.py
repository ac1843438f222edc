"""Switch feed-forward (`moe{l}`): a float32 top-1 router, experts, and the always-on tanh bypass.

Routing is written as small pure functions (router, positions in expert, aux loss, dispatch). Two rules
decide which tokens an expert takes, chosen by `ModelConfig.routing`:
  - "capacity": the original Mesh-TensorFlow grouped capacity. Tokens (batch x length, flattened) are split
    into groups of at most `group_size`; each expert takes at most `max(min_capacity, int(S * cf / E))`
    tokens per group, in token order; tokens past capacity get MoE output 0 (the bypass still applies).
  - "dropless": every token reaches its expert.
One dispatch serves both: tokens sorted by expert into blocks, a block-sparse matmul over the blocks in use,
results gathered back (indices, never one-hot einsums; no compute on capacity padding).

Expert parallelism: when the mesh in context (`jax.set_mesh`) has an `expert` axis larger than 1, the
experts live on different devices and the tokens travel instead (gptsan/model/expert_parallel.py, GShard's
all-to-all dispatch). Routing decisions, capacity and losses are the same functions either way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptsan.model.config import ModelConfig
from gptsan.model.expert_parallel import expert_parallel_ffn, expert_parallelism
from gptsan.model.weights import Kernel, fan_in_normal, normal

AUX_LOSS_COEF = 0.01


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


def block_size(num_tokens: int, num_experts: int) -> int:
    """Rows per block of the grouped expert matmul. Few tokens (decoding): one block holds them all, so
    each chosen expert's weights are read once. Many tokens: blocks of 16..128 rows, about a quarter of an
    expert's share, so padding each expert to whole blocks wastes little."""
    if num_tokens <= 64:
        return num_tokens
    share = num_tokens // (4 * num_experts)
    return int(min(128, max(16, 1 << max(share, 1).bit_length() - 1)))


def _blocks_matmul(x: jax.Array, w: jax.Array, block_expert: jax.Array, block_used: jax.Array,
                   transpose_w: bool = False) -> jax.Array:
    """x [nb, b, k] @ w[block_expert] for each used block (zeros for unused ones), one block at a time."""
    out_dim = w.shape[1] if transpose_w else w.shape[2]

    def body(_, block):
        xb, e, used = block

        def compute(xb):
            we = jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)
            return xb @ (we.T if transpose_w else we)

        def skip(xb):
            return jnp.zeros(xb.shape[:-1] + (out_dim,), xb.dtype)

        return None, jax.lax.cond(used, compute, skip, xb)

    return jax.lax.scan(body, None, (x, block_expert, block_used))[1]


@jax.custom_vjp
def grouped_matmul(x: jax.Array, w: jax.Array, block_expert: jax.Array, block_used: jax.Array) -> jax.Array:
    """Block-sparse expert matmul: block j of x [nb, b, k] times w[block_expert[j]] ([E, k, n]).

    Unused blocks are skipped at run time (lax.cond), so the work is what the tokens need. The custom
    gradient accumulates dw in place, block by block, instead of materialising a full [E, k, n] per block.
    """
    return _blocks_matmul(x, w, block_expert, block_used)


def _grouped_matmul_fwd(x, w, block_expert, block_used):
    return _blocks_matmul(x, w, block_expert, block_used), (x, w, block_expert, block_used)


def _grouped_matmul_bwd(residuals, dy):
    x, w, block_expert, block_used = residuals
    dx = _blocks_matmul(dy, w, block_expert, block_used, transpose_w=True)

    def accumulate(dw, block):
        xb, dyb, e, used = block
        dw = jax.lax.cond(used, lambda dw: dw.at[e].add((xb.T @ dyb).astype(dw.dtype)), lambda dw: dw, dw)
        return dw, None

    dw, _ = jax.lax.scan(accumulate, jnp.zeros_like(w), (x, dy, block_expert, block_used))
    return dx, dw, None, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def expert_ffn(x: jax.Array, expert: jax.Array, kept: jax.Array, wi: jax.Array, wo: jax.Array) -> jax.Array:
    """Each kept token through its expert's FFN (ReLU, no biases); dropped tokens get 0.

    x [N, d], expert [N], kept [N] bool, wi [E, d, f], wo [E, f, d] -> [N, d]. Tokens are sorted by expert
    into blocks (each expert's tokens padded to whole blocks; dropped tokens go nowhere), the blocks run
    through `grouped_matmul`, and the results are gathered back in token order.
    """
    num_tokens, d = x.shape
    num_experts = wi.shape[0]
    b = block_size(num_tokens, num_experts)
    num_blocks = -(-num_tokens // b) + num_experts  # static bound: every expert may waste one block
    slots = num_blocks * b

    bucket = jnp.where(kept, expert, num_experts)  # dropped tokens sort last, into no block
    order = jnp.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    counts = jnp.bincount(bucket, length=num_experts + 1)[:num_experts]
    padded = (counts + b - 1) // b * b
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    token_start = jnp.cumsum(counts) - counts
    expert_of_sorted = jnp.minimum(sorted_bucket, num_experts - 1)
    rank = jnp.arange(num_tokens) - token_start[expert_of_sorted]
    dest = jnp.where(sorted_bucket < num_experts, padded_start[expert_of_sorted] + rank, slots)

    buffer = jnp.zeros((slots, d), x.dtype).at[dest].set(x[order], mode="drop")
    block_first_row = jnp.arange(num_blocks) * b
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_first_row, side="right"), num_experts - 1)
    block_used = block_first_row < padded_end[-1]

    h = jax.nn.relu(grouped_matmul(buffer.reshape(num_blocks, b, d), wi, block_expert, block_used))
    y = grouped_matmul(h, wo, block_expert, block_used).reshape(slots, d)
    y_sorted = y.at[dest].get(mode="fill", fill_value=0)
    return jnp.zeros_like(x).at[order].set(y_sorted)


# --- Few-token (decoding) expert FFN -------------------------------------------------------------------------
# A decode step routes a handful of tokens, so each chosen expert's weights are read for very little compute
# and the step is bound by how fast they stream from memory. `jax.lax.dynamic_index_in_dim(w, e)` before a
# matmul would first copy the whole [d, f] expert (read + write + read again: 3x the traffic). Instead the
# expert's rows are taken a cache-sized chunk at a time, so each weight byte crosses the memory bus once.

FEW_TOKENS = 8  # at most this many tokens (inference only) take `few_token_expert_ffn`
STREAM_CHUNK_BYTES = 2 << 20  # weight rows per chunk of `streamed_expert_matmul`: about 2 MiB, cache-resident


def chunk_rows(rows: int, row_bytes: int) -> int:
    """The largest divisor of `rows` whose chunk of rows stays within STREAM_CHUNK_BYTES (at least 1 row)."""
    limit = max(1, STREAM_CHUNK_BYTES // row_bytes)
    return max(r for r in range(1, min(rows, limit) + 1) if rows % r == 0)


def streamed_expert_matmul(x: jax.Array, w: jax.Array, e: jax.Array) -> jax.Array:
    """x [N, k] @ w[e] for w [E, k, n], reading expert e's rows chunk by chunk -> [N, n]."""
    k, n = w.shape[1:]
    rows = chunk_rows(k, n * w.dtype.itemsize)

    def add_chunk(chunk, acc):
        w_rows = jax.lax.dynamic_slice(w, (e, chunk * rows, 0), (1, rows, n))[0]
        x_rows = jax.lax.dynamic_slice_in_dim(x, chunk * rows, rows, axis=1)
        return acc + x_rows @ w_rows

    return jax.lax.fori_loop(0, k // rows, add_chunk, jnp.zeros((x.shape[0], n), x.dtype))


def few_token_expert_ffn(x: jax.Array, expert: jax.Array, kept: jax.Array, wi: jax.Array,
                         wo: jax.Array) -> jax.Array:
    """`expert_ffn` for a few tokens (decoding): each distinct chosen expert runs once over all the tokens,
    its weights streamed (`streamed_expert_matmul`), and keeps the rows of the tokens that chose it.
    x [N, d], expert [N], kept [N] bool, wi [E, d, f], wo [E, f, d] -> [N, d]."""
    num_tokens = x.shape[0]
    num_experts = wi.shape[0]
    no_expert = num_experts
    chosen = jnp.unique(jnp.where(kept, expert, no_expert), size=min(num_tokens, num_experts),
                        fill_value=no_expert)  # the distinct experts in use, then `no_expert` padding

    def run_expert(y, e):
        def run(y):
            h = jax.nn.relu(streamed_expert_matmul(x, wi, e))
            mine = (kept & (expert == e))[:, None]
            return y + jnp.where(mine, streamed_expert_matmul(h, wo, e), 0)

        return jax.lax.cond(e < no_expert, run, lambda y: y, y), None

    return jax.lax.scan(run_expert, jnp.zeros_like(x), chosen)[0]


# ------------------------------------------------------------------------------------------------------------


def capacity_kept(expert: jax.Array, num_experts: int, capacity: int) -> jax.Array:
    """The original's rule: within each group, an expert keeps its first `capacity` tokens. expert [G, S]."""
    return positions_in_expert(expert, num_experts) < capacity


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

        groups = group_count(num_tokens, c.group_size)
        group_tokens = num_tokens // groups
        aux = load_balancing_loss(probs.reshape(groups, group_tokens, -1), expert.reshape(groups, -1))
        if c.routing == "capacity":
            cf = c.capacity_factor_train if train else c.capacity_factor_eval
            capacity = expert_capacity(group_tokens, num_experts, cf, c.min_capacity)
            kept = capacity_kept(expert.reshape(groups, group_tokens), num_experts, capacity).reshape(-1)
        else:
            capacity = group_tokens  # dropless: an expert may take its whole group
            kept = jnp.ones((num_tokens,), bool)
        if expert_parallelism() > 1:
            grouped = expert.reshape(groups, group_tokens)
            y = expert_parallel_ffn(x.reshape(groups, group_tokens, d), grouped,
                                    positions_in_expert(grouped, num_experts), min(capacity, group_tokens),
                                    wi.astype(x.dtype), wo.astype(x.dtype)).reshape(batch, length, d)
        else:
            # float32 only: on CPU, bfloat16 chunk matmuls made decoding slower (81 vs 30 ms/step, bench-small)
            few_tokens = not train and num_tokens <= FEW_TOKENS and x.dtype == jnp.float32
            ffn = few_token_expert_ffn if few_tokens else expert_ffn
            y = ffn(x.reshape(num_tokens, d), expert.reshape(-1), kept, wi.astype(x.dtype),
                    wo.astype(x.dtype)).reshape(batch, length, d)
        dropped = 1.0 - kept.astype(jnp.float32).mean()

        moe_out = y * gate[..., None].astype(x.dtype)
        bypass = jnp.tanh(x @ softmlp.astype(x.dtype))
        load = jnp.bincount(expert.reshape(-1), length=num_experts) / num_tokens
        return moe_out + bypass, {"aux_loss": aux, "dropped_fraction": dropped, "expert_load": load}
