"""Gradient accumulation: k micro-batches per optimizer step, inside one jitted step.

    train_step = make_accumulating_train_step(config, optimizer, schedule, options, accumulate_steps=4)

The global batch [B, ...] is cut into k micro-batches of B/k rows (row r goes to micro-batch r mod k, so
each device's rows stay on that device: no data moves), `lax.scan` runs forward and backward on one
micro-batch at a time and sums the gradients, and the optimizer applies the sum once. Peak activation
memory is that of one micro-batch.

Each micro-batch's per-token loss is weighted by its share of the batch's target tokens (n_i / N) and its
router aux loss by 1/k, so the summed gradient equals the gradient on the whole batch, also when
micro-batches count different numbers of targets (padding, `y` = -1), as long as routing treats rows
alike in both cases: dropless routing (or capacity with no drops) and routing groups that do not straddle
micro-batches. Router jitter draws differ (each micro-batch gets its own key folded from the step's).
Metrics are weighted the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from gptsan.errors import UserError
from gptsan.model.config import ModelConfig
from gptsan.model.transformer import GPTSAN
from gptsan.train.optim import schedule_count
from gptsan.train.state import TrainState
from gptsan.train.step import Batch, StepOptions, apply_gradients, loss_and_grads, make_train_step


def check_accumulate_steps(steps: int, batch_size: int) -> None:
    """Before a run: `steps` micro-batches must split the batch evenly (`split_micro_batches` needs it)."""
    if steps < 1 or batch_size % steps:
        raise UserError(f"--accumulate_steps {steps}: must be a positive divisor of the batch size {batch_size}")


def split_micro_batches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ... (a reshape that keeps each
    device's contiguous block of rows in place)."""

    def split(value):
        rows = value.shape[0]
        if rows % k:
            raise UserError(f"--accumulate_steps {k}: must divide the batch size {rows}")
        return jnp.swapaxes(value.reshape(rows // k, k, *value.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(split, batch)


def make_accumulating_train_step(config: ModelConfig, optimizer: optax.GradientTransformation,
                                 schedule: optax.Schedule, options: StepOptions,
                                 accumulate_steps: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Like `make_train_step`, but one optimizer update per `accumulate_steps` micro-batches. Metrics are
    weighted as the gradients are (module doc; `tokens` is the sum)."""
    if accumulate_steps < 1:
        raise UserError(f"--accumulate_steps: expected a positive integer, got {accumulate_steps}")
    if accumulate_steps == 1:
        return make_train_step(config, optimizer, schedule, options)
    model = GPTSAN(config)

    def train_step(state: TrainState, batch: Batch):
        micro_batches = split_micro_batches(batch, accumulate_steps)
        targets = (micro_batches["y"] >= 0).reshape(accumulate_steps, -1).sum(axis=1).astype(jnp.float32)
        shares = targets / jnp.maximum(targets.sum(), 1.0)  # [k]: each micro-batch's share of the targets
        aux_share = 1.0 / accumulate_steps

        def one(grad_sum, micro):
            index, share, micro_batch = micro
            micro_state = state.replace(rng=jax.random.fold_in(state.rng, index))
            grads, terms, out = loss_and_grads(model, options, micro_state, micro_batch, share, aux_share)
            grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
            return grad_sum, {  # weighted as the objective is, so that the sums over micro-batches are the metrics
                "loss": share * terms.loss + aux_share * out.aux_loss, "cross_entropy": share * terms.cross_entropy,
                "z_loss": share * terms.z_loss, "accuracy": share * terms.accuracy,
                "aux_loss": aux_share * out.aux_loss, "dropped_fraction": aux_share * out.dropped_fraction,
                "expert_load": aux_share * out.expert_load, "tokens": terms.tokens,
            }

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        grads, per_micro = jax.lax.scan(one, zeros, (jnp.arange(accumulate_steps), shares, micro_batches))
        new_state, applied, grad_norm = apply_gradients(optimizer, state, grads)
        metrics = {name: value.sum(axis=0) for name, value in per_micro.items()}
        metrics.update(learning_rate=schedule(schedule_count(state.opt_state)), grad_norm=grad_norm,
                       loss_scale=state.loss_scale.scale, update_applied=applied)
        return new_state, metrics

    return train_step
