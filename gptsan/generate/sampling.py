"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p (combinable).

Pure functions over `logits [B, V]`. Banned ids (GPTSAN's `<|nottoken|>` and `<|separator|>`) are never chosen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gptsan.errors import UserError

NEG_INF = -jnp.inf
NEGLIGIBLE = 104.0  # exp(-104) is 0 in float32 (below its smallest subnormal, about exp(-103.3))


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How to pick a token. temperature 0 = greedy; top_k 0 = no top-k cut; top_p 1.0 = no nucleus cut.

    Hashable: a decoding loop compiles once per Sampler (and per input shape).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    banned_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0 <= self.temperature <= float(jnp.finfo(jnp.float32).max):  # float32 logits are divided by it
            raise UserError(f"--temperature: expected a finite number >= 0, got {self.temperature}")
        if 0 < self.temperature < float(jnp.finfo(jnp.float32).tiny):  # a subnormal divisor is flushed to 0: nan
            raise UserError(f"--temperature: expected 0 (greedy) or at least {float(jnp.finfo(jnp.float32).tiny):.4g} "
                            f"(float32's smallest normal number), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"--top_k: expected an integer >= 0 (0 = no cut), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p: expected a number in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def ban(logits: jax.Array, banned_ids: tuple[int, ...]) -> jax.Array:
    """Set the banned ids' logits to -inf. logits [..., V]."""
    if not banned_ids:
        return logits
    return logits.at[..., jnp.asarray(banned_ids, jnp.int32)].set(NEG_INF)


def nucleus_keep(sorted_logits: jax.Array, top_p: float) -> jax.Array:
    """Which of the descending-sorted candidates form the top-p nucleus: the smallest prefix whose
    probability reaches top_p (the first candidate is always kept). sorted_logits [B, K] -> bool [B, K]."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return mass_before < top_p


def nucleus_in_place(logits: jax.Array, top_p: float) -> jax.Array:
    """`nucleus_keep` for unsorted logits [B, V] -> bool [B, V], without sorting them: the nucleus is every token
    whose probability is at least the smallest kept one, t = the largest probability with mass(p >= t) >= top_p
    (the same tokens as the sorted prefix, except that a tie at t keeps every tied token). t is found per row
    by bisection over the probabilities' bit patterns, which non-negative floats order as their values:
    31 masked sums over V (0.2-0.3 ms for V 36000 on the 2-vCPU bench machine, against about 7 ms to sort it)."""
    probs = jax.nn.softmax(logits, axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)

    def mass_from(threshold: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(bits >= threshold, probs, 0), axis=-1, keepdims=True)

    def halve(_, bounds):  # mass_from(low) >= top_p > mass_from(high) throughout
        low, high = bounds
        middle = low + (high - low) // 2
        reaches = mass_from(middle) >= top_p
        return jnp.where(reaches, middle, low), jnp.where(reaches, high, middle)

    low = jnp.zeros(bits.shape[:-1] + (1,), jnp.int32)
    high = jnp.max(bits, axis=-1, keepdims=True) + 1
    low, _ = jax.lax.fori_loop(0, 31, halve, (low, high))  # 31 halvings close any gap of int32 bit patterns
    return bits >= low


def candidates(logits: jax.Array, sampler: Sampler) -> tuple[jax.Array, jax.Array]:
    """The tokens sampling may pick and their scaled logits, shifted so that the best is 0 (-inf = excluded,
    as is anything float32 gives no probability): best first after a top-k cut,
    else all V in id order (the vocabulary is never sorted: a sort of it doubled a bench-small decode step).

    logits [B, V] -> (scaled logits [B, K], token ids [B, K]) with K = top_k (or V without a top-k cut).
    """
    logits = ban(logits.astype(jnp.float32), sampler.banned_ids)
    # The best shifted to exactly 0, and what float32 gives no probability (below -NEGLIGIBLE) to -inf: every
    # value later exponentiated stays in [-NEGLIGIBLE, 0]. Unbounded, logits / T reached 1e9 and more at small
    # temperatures, where XLA's fused `exp(s - max)` recomputes s without rounding it as the max saw it (a
    # multiply-add, it appears; off by hundreds: block masses of inf and 0, draws away from the argmax at
    # T 1e-8; tests/test_sampling.py), and inf (nan) below T ~1e-37.
    scaled = (logits - logits.max(axis=-1, keepdims=True)) / sampler.temperature
    scaled = jnp.where(scaled >= -NEGLIGIBLE, scaled, NEG_INF)
    vocab = scaled.shape[-1]
    if sampler.top_k and sampler.top_k < vocab:
        values, ids = jax.lax.top_k(scaled, sampler.top_k)  # [B, K] descending
        nucleus = nucleus_keep
    else:
        values, ids = scaled, jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), scaled.shape)
        nucleus = nucleus_in_place
    if sampler.top_p < 1.0:
        values = jnp.where(nucleus(values, sampler.top_p), values, NEG_INF)
    return values, ids


DRAW_BLOCK = 256  # `categorical` draws over more candidates than this in two stages


def categorical(key: jax.Array, logits: jax.Array, block: int = DRAW_BLOCK) -> jax.Array:
    """One draw from softmax(logits), logits [K] -> int32 index. Over more than `block` candidates it draws in
    two stages with the same distribution: a block of `block` consecutive candidates by the block's mass, then
    a candidate inside it. That takes ~2 sqrt(K) random numbers instead of K: a draw over V 36000 took 0.7 ms
    (an eighth of a bench-small decode step) with `jax.random.categorical`'s K Gumbel numbers."""
    size = logits.shape[-1]
    if size <= block:
        return jax.random.categorical(key, logits)
    blocks = -(-size // block)
    padded = jnp.pad(logits, (0, blocks * block - size), constant_values=NEG_INF).reshape(blocks, block)
    block_key, inside_key = jax.random.split(key)
    chosen = jax.random.categorical(block_key, jax.nn.logsumexp(padded, axis=-1))  # a block with no mass: never
    return chosen * block + jax.random.categorical(inside_key, padded[chosen])


def next_token(key: jax.Array, logits: jax.Array, sampler: Sampler) -> jax.Array:
    """One token per row. key: one PRNG key per row [B] (rows sample independently of batching);
    logits [B, V] -> [B] int32."""
    if sampler.greedy:
        return jnp.argmax(ban(logits.astype(jnp.float32), sampler.banned_ids), axis=-1).astype(jnp.int32)
    values, ids = candidates(logits, sampler)
    choice = jax.vmap(categorical)(key, values)  # [B]
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def row_keys(seed_key: jax.Array, rows: jax.Array, step: jax.Array) -> jax.Array:
    """Per-row, per-step keys: row r at step t uses fold_in(fold_in(seed, r), t) whatever the batch."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(seed_key, r), step))(rows)
