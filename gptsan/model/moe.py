"""Switch feed-forward (`moe{l}`): a float32 top-1 router, experts, and the always-on tanh bypass.

Routing is written as small pure functions (router, positions in expert, aux loss, dispatch). Two rules
decide which tokens an expert takes, chosen by `ModelConfig.routing`:
  - "capacity": the original Mesh-TensorFlow grouped capacity. Tokens (batch x length, flattened) are split
    into groups of at most `group_size`; each expert takes at most `max(min_capacity, int(S * cf / E))`
    tokens per group, in token order; tokens past capacity get MoE output 0 (the bypass still applies).
  - "dropless": every token reaches its expert.
One dispatch serves both: tokens sorted by expert, each expert with tokens runs its FFN as whole matmuls
over one window of its sorted tokens (a size from a static ladder), results gathered back (indices, never
one-hot einsums; no compute on capacity padding, little on window padding).

Expert parallelism: when the mesh in context (`jax.set_mesh`) has an `expert` axis larger than 1, the
experts live on different devices and the tokens travel instead (gptsan/model/expert_parallel.py, GShard's
all-to-all dispatch). Routing decisions, capacity and losses are the same functions either way.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptsan.model.config import ModelConfig
from gptsan.model.dense import InferenceProjection, matmul
from gptsan.model.expert_parallel import expert_parallel_ffn, expert_parallelism
from gptsan.model.weights import Kernel, fan_in_normal, normal, param, zeros

AUX_LOSS_COEF = 0.01
FEW_TOKENS = 64  # up to this many tokens (decoding, short prompts), each chosen expert runs all of them


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


def window_sizes(num_tokens: int) -> tuple[int, ...]:
    """Static row counts from which each expert's matmuls pick the smallest that holds its tokens.

    Shapes must be static, an expert's token count is not: so each expert runs on one window of its sorted
    tokens, its size picked from this ladder at run time (`_for_each_expert`), and each of its matmuls is one
    big matmul (near the dense FF's speed), its weight read once, with no weight-gradient accumulation over
    blocks. Multiples of 32 rows, each about 1/8 above the last, so the padding rows computed stay under ~1/8
    of the tokens plus 32 rows per expert; up to 32 tokens, one window holds them all."""
    sizes = []
    size = 32
    while size < num_tokens:
        sizes.append(size)
        size = max(size + 32, -(-size * 9 // 8 // 32) * 32)
    return (*sizes, num_tokens)


def _window(buffer: jax.Array, first_row: jax.Array, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(buffer, first_row, size)


def _write_window(buffer: jax.Array, rows: jax.Array, first_row: jax.Array, in_run: jax.Array) -> jax.Array:
    """Writes the window's rows that belong to the expert's run; the others keep their old values."""
    rows = jnp.where(in_run[:, None], rows, _window(buffer, first_row, rows.shape[0]))
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, first_row, 0)


def _for_each_expert(step, carry, starts: jax.Array, counts: jax.Array, num_rows: int, sizes: tuple[int, ...]):
    """carry = step(carry, e, first_row, in_run) for each expert e that has tokens, on the smallest window of
    `sizes` rows that holds its run [starts[e], starts[e] + counts[e]); `in_run` marks the run's rows in the
    window. Experts without tokens are skipped (their weights are never read).

    The experts are grouped by window size and each size is a fori_loop over its experts (most loops run 0
    times): a while loop updates its carry in place, where a lax.switch between sizes would copy the whole
    carried buffers into every branch."""
    size_of = jnp.where(counts > 0, jnp.searchsorted(jnp.asarray(sizes), counts), len(sizes))
    experts_by_size = jnp.argsort(size_of, stable=True)
    experts_per_size = jnp.bincount(size_of, length=len(sizes) + 1)
    first_of_size = jnp.cumsum(experts_per_size) - experts_per_size
    for index, size in enumerate(sizes):

        def one_expert(j, carry, index=index, size=size):
            e = experts_by_size[first_of_size[index] + j]
            first_row = jnp.minimum(starts[e], num_rows - size)  # the window stays inside the buffer
            row = first_row + jnp.arange(size)
            return step(carry, e, first_row, (row >= starts[e]) & (row < starts[e] + counts[e]))

        carry = jax.lax.fori_loop(0, experts_per_size[index], one_expert, carry)
    return carry


def _sorted_ffn_forward(x, starts, counts, wi, wo, sizes):
    def step(carry, e, first_row, in_run):
        h_all, y_all = carry
        wi_e = jax.lax.dynamic_index_in_dim(wi, e, keepdims=False)
        wo_e = jax.lax.dynamic_index_in_dim(wo, e, keepdims=False)
        h = jax.nn.relu(_window(x, first_row, in_run.shape[0]) @ wi_e)
        y = h @ wo_e
        return _write_window(h_all, h, first_row, in_run), _write_window(y_all, y, first_row, in_run)

    empty = (jnp.zeros((x.shape[0], wi.shape[2]), x.dtype), jnp.zeros_like(x))
    return _for_each_expert(step, empty, starts, counts, x.shape[0], sizes)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def sorted_expert_ffn(x: jax.Array, starts: jax.Array, counts: jax.Array, wi: jax.Array, wo: jax.Array,
                      sizes: tuple[int, ...]) -> jax.Array:
    """relu(x @ wi[e]) @ wo[e] for the rows [starts[e], starts[e] + counts[e]) of each expert e; other rows 0.

    x [R, d] holds the tokens sorted by expert (see `_for_each_expert` for how the rows are cut into
    matmuls). The custom gradient reuses the forward's hidden activations and computes each expert's weight
    gradients with one matmul each, over the same window.
    """
    return _sorted_ffn_forward(x, starts, counts, wi, wo, sizes)[1]


def _sorted_expert_ffn_fwd(x, starts, counts, wi, wo, sizes):
    h, y = _sorted_ffn_forward(x, starts, counts, wi, wo, sizes)
    return y, (x, h, starts, counts, wi, wo)


def _sorted_expert_ffn_bwd(sizes, residuals, dy):
    x, h, starts, counts, wi, wo = residuals
    over_rows = (((0,), (0,)), ((), ()))  # a.T @ b
    with_transposed = (((1,), (1,)), ((), ()))  # a @ b.T

    def step(carry, e, first_row, in_run):
        dx_all, dwi, dwo = carry
        size = in_run.shape[0]
        wi_e = jax.lax.dynamic_index_in_dim(wi, e, keepdims=False)
        wo_e = jax.lax.dynamic_index_in_dim(wo, e, keepdims=False)
        dy_w = jnp.where(in_run[:, None], _window(dy, first_row, size), 0)  # other experts' rows: no gradient
        h_w = _window(h, first_row, size)
        dh = jnp.where(h_w > 0, jax.lax.dot_general(dy_w, wo_e, with_transposed), 0)
        dwi_e = jax.lax.dot_general(_window(x, first_row, size), dh, over_rows)
        dwo_e = jax.lax.dot_general(h_w, dy_w, over_rows)
        dx = jax.lax.dot_general(dh, wi_e, with_transposed)
        return (_write_window(dx_all, dx, first_row, in_run), jax.lax.dynamic_update_index_in_dim(dwi, dwi_e, e, 0),
                jax.lax.dynamic_update_index_in_dim(dwo, dwo_e, e, 0))

    zeros = (jnp.zeros_like(x), jnp.zeros_like(wi), jnp.zeros_like(wo))
    dx, dwi, dwo = _for_each_expert(step, zeros, starts, counts, x.shape[0], sizes)
    return dx, None, None, dwi, dwo


sorted_expert_ffn.defvjp(_sorted_expert_ffn_fwd, _sorted_expert_ffn_bwd)


def _few_tokens_expert_ffn(x: jax.Array, expert: jax.Array, kept: jax.Array, wi: jax.Array, wo: jax.Array):
    """Decoding (a few tokens): each chosen expert runs all the tokens (one small matmul per weight) and each
    token keeps its own expert's rows. No sorting or windows, whose bookkeeping costs more than the extra rows
    at this size; scans over experts with lax.cond, so unchosen experts' weights are never read. One scan per
    weight (as the block matmul before it), which measured faster than both matmuls in one scan body."""
    experts = jnp.arange(wi.shape[0])
    chosen = (kept[None, :] & (expert[None, :] == experts[:, None]))  # [E, N]
    used = chosen.any(axis=1)

    def per_expert(inputs, w):
        def one(_, block):
            rows, e, use = block

            def run(rows):
                return rows @ jax.lax.dynamic_index_in_dim(w, e, keepdims=False)

            return None, jax.lax.cond(use, run, lambda rows: jnp.zeros(rows.shape[:-1] + w.shape[2:], rows.dtype),
                                      rows)

        return jax.lax.scan(one, None, (inputs, experts, used))[1]

    h = jax.nn.relu(per_expert(jnp.broadcast_to(x, (wi.shape[0], *x.shape)), wi))
    y = per_expert(h, wo)  # [E, N, d]
    return jnp.sum(jnp.where(chosen[..., None], y, 0), axis=0)


def expert_ffn(x: jax.Array, expert: jax.Array, kept: jax.Array, wi: jax.Array, wo: jax.Array) -> jax.Array:
    """Each kept token through its expert's FFN (ReLU, no biases); dropped tokens get 0.

    x [N, d], expert [N], kept [N] bool, wi [E, d, f], wo [E, f, d] -> [N, d]. Tokens are sorted by expert
    (dropped tokens last, in no expert's run), go through `sorted_expert_ffn`, and are put back in order;
    up to FEW_TOKENS tokens skip the sorting (`_few_tokens_expert_ffn`).
    """
    num_tokens = x.shape[0]
    num_experts = wi.shape[0]
    if num_tokens <= FEW_TOKENS:
        return _few_tokens_expert_ffn(x, expert, kept, wi, wo)
    bucket = jnp.where(kept, expert, num_experts)
    order = jnp.argsort(bucket, stable=True)
    counts = jnp.bincount(bucket, length=num_experts + 1)[:num_experts]
    starts = jnp.cumsum(counts) - counts
    y_sorted = sorted_expert_ffn(x[order], starts, counts, wi, wo, window_sizes(num_tokens))
    sorted_position = jnp.zeros_like(order).at[order].set(jnp.arange(num_tokens, dtype=order.dtype))
    return y_sorted[sorted_position]


# --- Chosen experts' FFN (the inference layout) ------------------------------------------------------------
# A decode step routes a handful of tokens, so each chosen expert's weights are read for very little compute
# and the step is bound by how fast they stream from memory. In the inference layout (gptsan/model/inference.py)
# each expert's matrices are arrays of their own, so a lax.switch hands the chosen expert's arrays to its
# matmuls as they are: nothing is copied (`w[e]` of a stacked array would be copied whole before its matmul).

def chosen_experts_ffn(x: jax.Array, expert: jax.Array, kept: jax.Array, wi: tuple[jax.Array, ...],
                       wo: tuple[jax.Array, ...], transposed: bool = False) -> jax.Array:
    """`expert_ffn` for a few tokens in the inference layout: each distinct chosen expert runs once over all
    the tokens and keeps the rows of the tokens that chose it.
    x [N, d], expert [N], kept [N] bool, wi[e] [d, f], wo[e] [f, d] (`transposed`: both stored transposed,
    [f, d] and [d, f]) -> [N, d]."""
    num_tokens, num_experts = x.shape[0], len(wi)
    no_expert = num_experts

    def expert_branch(e: int):
        return lambda x: matmul(jax.nn.relu(matmul(x, wi[e], transposed)), wo[e], transposed)

    branches = [expert_branch(e) for e in range(num_experts)] + [jnp.zeros_like]  # the last: no expert
    if num_tokens == 1:  # batch-1 decoding: the token's own expert, without the search for distinct ones
        return jax.lax.switch(jnp.where(kept[0], expert[0], no_expert), branches, x)
    chosen = jnp.unique(jnp.where(kept, expert, no_expert), size=min(num_tokens, num_experts),
                        fill_value=no_expert)  # the distinct experts in use, then `no_expert` padding

    def run_expert(y, e):
        mine = (kept & (expert == e))[:, None]
        return y + jnp.where(mine, jax.lax.switch(e, branches, x), 0), None

    return jax.lax.scan(run_expert, jnp.zeros_like(x), chosen)[0]


class ExpertKernels(nn.Module):
    """The inference layout's per-expert matrices of one Switch weight: `expert{e}` [k, n] each, or
    `expert{e}_t` [n, k] where the weights were laid out for one-row decoding. Returns (matrices, transposed)."""

    num_experts: int
    shape: tuple[int, int]

    @nn.compact
    def __call__(self) -> tuple[tuple[jax.Array, ...], bool]:
        transposed = self.has_variable("params", "expert0_t")
        suffix, shape = ("_t", self.shape[::-1]) if transposed else ("", self.shape)
        return tuple(param(self, f"expert{e}{suffix}", shape, ("embed", "mlp"), zeros)
                     for e in range(self.num_experts)), transposed


def capacity_kept(expert: jax.Array, num_experts: int, capacity: int) -> jax.Array:
    """The original's rule: within each group, an expert keeps its first `capacity` tokens. expert [G, S]."""
    return positions_in_expert(expert, num_experts) < capacity


class SwitchFF(nn.Module):
    """GPTSAN's `moe{l}`: switch_gating [d, E], wi [E, d, 8d], wo [E, 8d, d], softmlp [d, d]; no biases.
    `inference`: wi and wo are read per expert (`ExpertKernels`) and softmlp as stored or transposed
    (`InferenceProjection`; gptsan/model/inference.py)."""

    config: ModelConfig
    inference: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        c = self.config
        d, f, num_experts = c.num_hidden, c.num_ff_hidden, c.num_experts
        router, _ = Kernel((d, num_experts), ("embed", "expert_route"), fan_in_normal(),
                           name="switch_gating")()
        if self.inference:
            wi, transposed = ExpertKernels(num_experts, (d, f), name="wi")()  # wo is laid out as wi is
            wo, _ = ExpertKernels(num_experts, (f, d), name="wo")()
        else:
            wi, _ = Kernel((num_experts, d, f), ("expert", "embed", "mlp"), fan_in_normal(-2, (0,)), name="wi")()
            wo, _ = Kernel((num_experts, f, d), ("expert", "mlp", "embed"), fan_in_normal(-2, (0,)), name="wo")()
        if self.inference:
            softmlp = InferenceProjection((d, d), use_bias=False, name="softmlp")
        else:
            softmlp_kernel, _ = Kernel((d, d), ("embed", "embed_out"), normal(0.01), name="softmlp")()

            def softmlp(x: jax.Array) -> jax.Array:
                return x @ softmlp_kernel.astype(x.dtype)

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
        tokens, expert = x.reshape(num_tokens, d), expert.reshape(-1)
        if self.inference:
            wi, wo = [w.astype(x.dtype) for w in wi], [w.astype(x.dtype) for w in wo]
            if num_tokens <= FEW_TOKENS:
                y = chosen_experts_ffn(tokens, expert, kept, wi, wo, transposed)
            else:  # a long prompt: the stacked layout's dispatch, on a copy made for this call
                stacked = [jnp.stack(w).swapaxes(1, 2) if transposed else jnp.stack(w) for w in (wi, wo)]
                y = expert_ffn(tokens, expert, kept, *stacked)
        elif expert_parallelism() > 1:
            grouped = expert.reshape(groups, group_tokens)
            y = expert_parallel_ffn(tokens.reshape(groups, group_tokens, d), grouped,
                                    positions_in_expert(grouped, num_experts), min(capacity, group_tokens),
                                    wi.astype(x.dtype), wo.astype(x.dtype))
        else:
            y = expert_ffn(tokens, expert, kept, wi.astype(x.dtype), wo.astype(x.dtype))
        y = y.reshape(batch, length, d)
        dropped = 1.0 - kept.astype(jnp.float32).mean()

        moe_out = y * gate[..., None].astype(x.dtype)
        bypass = jnp.tanh(softmlp(x))
        load = jnp.bincount(expert, length=num_experts) / num_tokens
        return moe_out + bypass, {"aux_loss": aux, "dropped_fraction": dropped, "expert_load": load}
