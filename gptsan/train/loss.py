"""The training loss (spec section 1): cross-entropy over targets (-1 = no loss), mean over counted
positions, plus 1e-4 * logZ^2 (logit z-loss); the router's aux loss is added by the step."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Z_LOSS_COEF = 1e-4


@flax.struct.dataclass
class LossTerms:
    loss: jax.Array  # cross_entropy + z_loss
    cross_entropy: jax.Array
    z_loss: jax.Array
    accuracy: jax.Array
    tokens: jax.Array  # counted target positions


def lm_loss(logits: jax.Array, targets: jax.Array, z_loss_coef: float = Z_LOSS_COEF) -> LossTerms:
    """logits [B, T, V] float32, targets [B, T] int (-1 ignored)."""
    counted = targets >= 0
    safe = jnp.where(counted, targets, 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    weight = counted.astype(jnp.float32)
    tokens = weight.sum()
    denominator = jnp.maximum(tokens, 1.0)
    cross_entropy = ((log_z - target_logit) * weight).sum() / denominator
    z_loss = z_loss_coef * (jnp.square(log_z) * weight).sum() / denominator
    accuracy = ((jnp.argmax(logits, axis=-1) == targets) * weight).sum() / denominator
    return LossTerms(cross_entropy + z_loss, cross_entropy, z_loss, accuracy, tokens)
