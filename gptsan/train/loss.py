"""The training loss (spec section 1): cross-entropy over targets (-1 = no loss), mean over counted
positions, plus 1e-4 * logZ^2 (logit z-loss); the router's aux loss is added by the step.

`lm_loss` is the definition, on logits. `tied_head_loss` computes the same terms from the head's input and
the tied vocabulary weights with a hand-written gradient: the [tokens, vocabulary] float32 logits are the
largest array of a training step (2048 x 36,000 = 295 MB for bench-small), and autodiff of `lm_loss` walks
them many times (logsumexp, its gradient, the one-hot of the targets, argmax, and a column sum for the
vocabulary bias that XLA's CPU reduction runs at a fraction of memory speed). Here the forward keeps
exp(logits - max) once, and the backward makes the logit gradient in one pass and takes the bias gradient
from the table's gradient product (a column of ones beside the head's input).
"""

from __future__ import annotations

from functools import partial

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


def tied_head_loss(hidden: jax.Array, embedding: jax.Array, bias: jax.Array, targets: jax.Array,
                   z_loss_coef: float = Z_LOSS_COEF, embedding_trained: bool = True) -> LossTerms:
    """`lm_loss(hidden @ embedding.T + bias, targets)` with a hand-written gradient (see the module doc).

    hidden [B, T, d] (the compute dtype), embedding [V, d] (`model/wte`), bias [V] (`model/wob`), targets
    [B, T]. The logits are float32 whatever the compute dtype. Accuracy counts a target as right when its
    logit equals the row's maximum (argmax up to ties). `embedding_trained`: whether the caller takes the
    table's gradient; if not (a frozen `model/wte`), the bias gradient is not taken out of the table's gradient
    product, which would then be computed for it alone.
    """
    d = hidden.shape[-1]
    return _tied_head_loss(hidden.reshape(-1, d), embedding, bias, targets.reshape(-1), z_loss_coef,
                           embedding_trained)


def _head_forward(hidden, embedding, bias, targets, z_loss_coef):
    logits = jnp.einsum("nd,vd->nv", hidden, embedding.astype(hidden.dtype),
                        preferred_element_type=jnp.float32) + bias
    counted = targets >= 0
    safe = jnp.where(counted, targets, 0)
    row_max = logits.max(axis=-1)
    shifted_exp = jnp.exp(logits - row_max[:, None])  # kept for the backward: softmax = shifted_exp / exp_sum
    exp_sum = shifted_exp.sum(axis=-1)
    log_z = row_max + jnp.log(exp_sum)
    target_logit = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
    weight = counted.astype(jnp.float32)
    tokens = weight.sum()
    denominator = jnp.maximum(tokens, 1.0)
    cross_entropy = ((log_z - target_logit) * weight).sum() / denominator
    z_loss = z_loss_coef * (jnp.square(log_z) * weight).sum() / denominator
    accuracy = ((target_logit >= row_max) * weight).sum() / denominator
    terms = LossTerms(cross_entropy + z_loss, cross_entropy, z_loss, accuracy, tokens)
    return terms, (hidden, embedding, safe, weight / denominator, shifted_exp, exp_sum, log_z)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _tied_head_loss(hidden, embedding, bias, targets, z_loss_coef, embedding_trained):
    return _head_forward(hidden, embedding, bias, targets, z_loss_coef)[0]


def _tied_head_loss_bwd(z_loss_coef, embedding_trained, residuals, cotangent: LossTerms):
    hidden, embedding, safe, token_weight, shifted_exp, exp_sum, log_z = residuals
    # d logits[n, v] = w_n * (g_ce * (softmax - onehot(target)) + g_z * 2 * coef * log_z_n * softmax)
    g_ce = cotangent.loss + cotangent.cross_entropy
    g_z = cotangent.loss + cotangent.z_loss
    softmax_scale = token_weight * (g_ce + g_z * 2.0 * z_loss_coef * log_z) / exp_sum  # [N]
    target_scale = token_weight * g_ce  # [N]
    is_target = jnp.arange(shifted_exp.shape[1])[None, :] == safe[:, None]  # compared in the same pass, no scatter
    d_logits = shifted_exp * softmax_scale[:, None] - jnp.where(is_target, target_scale[:, None], 0.0)
    if hidden.dtype == jnp.float32 and embedding_trained:
        d_embedding, d_bias = _embedding_and_bias_gradients(d_logits, hidden)
    else:  # the bias gradient from the float32 logit gradient (before it is rounded to the compute dtype)
        d_bias = jnp.ones_like(softmax_scale) @ d_logits
        d_logits = d_logits.astype(hidden.dtype)
        d_embedding = _table_gradient(d_logits, hidden)
    d_hidden = jnp.dot(d_logits, embedding.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return (d_hidden.astype(hidden.dtype), d_embedding.astype(embedding.dtype), d_bias, None)


BIAS_COLUMNS = 8  # the head input's extra columns: a column of ones, then zeros to keep the width a multiple of 8


def _embedding_and_bias_gradients(d_logits: jax.Array, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The tied table's gradient d_logits.T @ hidden [V, d] and the bias's, the column sums of d_logits [V],
    from one product: hidden gets a column of ones, whose gradient column is the bias gradient. A separate
    matrix-vector product would read the [N, V] logit gradient once more (bench-small: 295 MB; as oneDNN runs
    that product, 25 ms alone and up to 99 ms inside a traced train step, where the wider table gradient costs
    about 4 ms more)."""
    n, d = hidden.shape
    ones = jnp.zeros((n, BIAS_COLUMNS), hidden.dtype).at[:, 0].set(1)
    both = _table_gradient(d_logits, jnp.concatenate([hidden, ones], axis=1))
    return both[:, :d], both[:, d]


def _table_gradient(d_logits: jax.Array, inputs: jax.Array) -> jax.Array:
    """d_logits.T @ inputs [V, k] (float32), made as its transpose [k, V] and then transposed. Asked for [V, k]
    directly, oneDNN (through XLA's CPU backend) runs this product at half the matmul peak on an AVX2 CPU, where
    the [k, V] orientation runs at the peak: bench-small's table gradient (2048 tokens, V 36,000, k 520) took
    2.25 s against 1.15 s + 0.04 s for the transpose on a 2-vCPU Zen 1 (1.64 s inside the step, which became
    5% faster). The optimization barrier keeps XLA from folding the transpose back into the product."""
    transposed = jnp.einsum("nk,nv->kv", inputs, d_logits, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(transposed).T


_tied_head_loss.defvjp(lambda *args: _head_forward(*args[:5]), _tied_head_loss_bwd)
