"""Spout vectors for training from the record's class id `i` (spec section 6, `--spout_vector`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptsan.errors import UserError
from gptsan.train.config import SPOUT_KINDS

_STATELESS_SEED = 0  # stateless_uniform: U(0,1) from a key that depends only on the record's `i`


def check_spout_kind(kind: str) -> str:
    if kind not in SPOUT_KINDS:
        raise UserError(f"--spout_vector: expected one of {', '.join(SPOUT_KINDS)}, got {kind!r}")
    return kind


def one_hot_classes(kind: str, num_spout: int) -> int | None:
    """How many classes a one-hot kind tells apart (class ids are taken mod this); None for the other kinds."""
    return {"onehot": num_spout, "half_onehot": num_spout // 2}.get(kind)


def spout_vectors(kind: str, class_ids: jax.Array, num_spout: int, rng: jax.Array) -> jax.Array | None:
    """[B, P] float32 spout inputs (None for kind "none"). class_ids [B] int; rng: this step's key.
      uniform: fresh U(0,1) each step; stateless_uniform: U(0,1) seeded by i (same vector for the same i);
      onehot: one_hot(i mod P); half_onehot: one_hot(i mod P/2) joined with fresh U(0,1) noise."""
    batch = class_ids.shape[0]
    if kind == "none":
        return None
    if kind == "uniform":
        return jax.random.uniform(rng, (batch, num_spout), jnp.float32)
    if kind == "stateless_uniform":
        base = jax.random.PRNGKey(_STATELESS_SEED)
        draw = lambda i: jax.random.uniform(jax.random.fold_in(base, i), (num_spout,), jnp.float32)  # noqa: E731
        return jax.vmap(draw)(class_ids.astype(jnp.uint32))
    if kind == "onehot":
        return jax.nn.one_hot(class_ids % num_spout, num_spout, dtype=jnp.float32)
    if kind == "half_onehot":
        half = one_hot_classes(kind, num_spout)
        noise = jax.random.uniform(rng, (batch, num_spout - half), jnp.float32)
        return jnp.concatenate([jax.nn.one_hot(class_ids % half, half, dtype=jnp.float32), noise], axis=1)
    raise UserError(f"--spout_vector: unknown kind {kind!r}")
