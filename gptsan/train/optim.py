"""Optimizers: the original GPTSAN Adam (no bias correction, decoupled weight decay, inverse-sqrt schedule)
and AdamW with warmup + cosine decay as an option. Both clip by global norm when asked.

The original (GPTSAN optimization.py) excludes from weight decay the names matching "LayerNorm",
"layer_norm" or "bias". GPTSAN's LayerNorm parameters are named `an{l}/g`, `an{l}/b`, `ln{l}/g`, `ln{l}/b`,
so none of those patterns matches them: the original decays LayerNorm parameters (and `wob`) and spares
only the names containing "bias". We keep exactly that.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gptsan.errors import UserError
from gptsan.model.params import flatten, unflatten
from gptsan.train.config import OPTIMIZERS

WEIGHT_DECAY = 0.01


def inverse_sqrt_schedule(base_lr: float, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to base_lr over warmup_steps, then 1/sqrt(max(step, 1/base_lr^2)): flat at
    base_lr until step 1/base_lr^2, inverse square root after (the original's schedule)."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        decayed = jax.lax.rsqrt(jnp.maximum(step, 1.0 / base_lr**2))
        if warmup_steps <= 0:
            return decayed
        return jnp.where(step < warmup_steps, base_lr * step / warmup_steps, decayed)

    return schedule


def cosine_schedule(base_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, max(warmup_steps, 0), max(total_steps, 1))


class AdamState(NamedTuple):
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_without_bias_correction(b1: float = 0.9, b2: float = 0.999,
                                          eps: float = 1e-8) -> optax.GradientTransformation:
    """m/(sqrt(v)+eps) with the raw moment estimates, as Mesh-TensorFlow's AdamWeightDecayOptimizer."""

    def init(params):
        zeros = lambda p: jnp.zeros_like(p, jnp.float32)  # noqa: E731
        return AdamState(jax.tree_util.tree_map(zeros, params), jax.tree_util.tree_map(zeros, params))

    def update(grads, state, params=None):
        del params
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, grads)
        updates = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, AdamState(mu, nu)

    return optax.GradientTransformation(init, update)


def weight_decay_mask(params) -> dict:
    """True for parameters that get weight decay: all but names containing "bias" (see module doc)."""
    return unflatten({name: "bias" not in name for name in flatten(params)})


def schedule_count(opt_state) -> jax.Array:
    """The step count the optimizer's learning-rate schedule reads (`optax.scale_by_learning_rate`'s state): the
    updates applied so far. A skipped step (non-finite gradients) leaves it as it was, while `TrainState.step`
    counts on, so the rate a step applies is `schedule(schedule_count(opt_state))`, not `schedule(step)`."""
    states = [leaf for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_schedule_state)
              if _is_schedule_state(leaf)]
    if len(states) != 1:
        raise ValueError(f"expected one learning-rate schedule in the optimizer state, found {len(states)}")
    return states[0].count


def _is_schedule_state(node) -> bool:
    return isinstance(node, optax.ScaleByScheduleState)


def make_optimizer(kind: str, base_lr: float, warmup_steps: int, *, clip_norm: float | None = None,
                   total_steps: int | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer (for the trainable parameters only) and its learning-rate schedule."""
    if kind == "adam":
        schedule = inverse_sqrt_schedule(base_lr, warmup_steps)
        core = [scale_by_adam_without_bias_correction(0.9, 0.999, 1e-8),
                optax.add_decayed_weights(WEIGHT_DECAY, weight_decay_mask),
                optax.scale_by_learning_rate(schedule)]
    elif kind == "adamw_cosine":
        if not total_steps or total_steps <= 0:
            raise UserError("--optimizer adamw_cosine: needs --max_training_step (the cosine's length)")
        if total_steps <= warmup_steps:
            raise UserError(f"--optimizer adamw_cosine: --max_training_step {total_steps} leaves no steps for the "
                            f"cosine after train_params.num_warmup_steps {warmup_steps}")
        schedule = cosine_schedule(base_lr, warmup_steps, total_steps)
        core = [optax.scale_by_adam(0.9, 0.999, 1e-8),
                optax.add_decayed_weights(WEIGHT_DECAY, weight_decay_mask),
                optax.scale_by_learning_rate(schedule)]
    else:
        raise UserError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    if clip_norm is not None:
        if not 0 < clip_norm < math.inf:  # nan too: every step's update was skipped
            raise UserError(f"--clip_gradients: expected a finite positive norm, got {clip_norm}")
        core.insert(0, optax.clip_by_global_norm(clip_norm))
    return optax.chain(*core), schedule
