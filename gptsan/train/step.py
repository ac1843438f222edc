"""Pure train and eval steps over an explicit TrainState.

`make_train_step` returns `train_step(state, batch) -> (state, metrics)`, built from two small pieces
(`loss_and_grads`, `apply_gradients`) so that gradient accumulation can sit between them. A batch is a dict
of x [B, T] int32, y [B, T] int32 (-1 = no loss), i [B] (class id), num_input [B] (prefix length).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from gptsan.model.config import ModelConfig
from gptsan.model.transformer import GPTSAN, Output
from gptsan.train.loss import LossTerms, tied_head_loss
from gptsan.train.optim import schedule_count
from gptsan.train.spout import spout_vectors
from gptsan.train.state import TrainState, merge_params

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepOptions:
    mode: str = "lm"  # "hybrid": the record's num_input is the prefix-LM's num_precontext
    spout: str = "none"


def _forward(model: GPTSAN, params: dict, batch: Batch, options: StepOptions, rng: jax.Array,
             train: bool, embedding_trained: bool = True) -> tuple[Output, LossTerms]:
    """The model's outputs (without logits) and the loss terms of the batch (`embedding_trained`: whether
    `model/wte` gets a gradient; see `tied_head_loss`)."""
    spout_rng, jitter_rng = jax.random.split(rng)
    spout = spout_vectors(options.spout, batch["i"], model.config.num_spout, spout_rng)
    num_precontext = batch["num_input"] if options.mode == "hybrid" else None
    rngs = {"jitter": jitter_rng} if train else None
    out = model.apply({"params": params}, batch["x"], num_precontext=num_precontext, spout=spout, train=train,
                      rngs=rngs, return_logits=False)
    terms = tied_head_loss(out.head_input, params["model"]["wte"], params["model"]["wob"], batch["y"],
                           embedding_trained=embedding_trained)
    return out, terms


def loss_and_grads(model: GPTSAN, options: StepOptions, state: TrainState, batch: Batch,
                   loss_weight: jax.Array | float = 1.0, aux_weight: jax.Array | float = 1.0):
    """Gradients of the (loss-scaled) objective for the trainable parameters only, unscaled, and the
    loss terms. The frozen parameters are not differentiated (no gradient is computed for them).
    The objective is loss_weight * (per-token loss) + aux_weight * (router aux loss): gradient accumulation
    weighs each micro-batch's share of the batch's targets (`accumulate.py`)."""

    def objective(trainable, frozen):
        rng = jax.random.fold_in(state.rng, state.step)
        out, terms = _forward(model, merge_params(trainable, frozen), batch, options, rng, train=True,
                              embedding_trained="wte" in trainable.get("model", {}))
        total = loss_weight * terms.loss + aux_weight * out.aux_loss
        return total * state.loss_scale.scale, (terms, out)

    grads, (terms, out) = jax.grad(objective, has_aux=True)(state.params, state.frozen)
    if state.loss_scale.dynamic:  # a static scale is 1: no pass over the gradients to divide by it
        grads = jax.tree_util.tree_map(lambda g: g / state.loss_scale.scale, grads)
    return grads, terms, out


def apply_gradients(optimizer: optax.GradientTransformation, state: TrainState,
                    grads) -> tuple[TrainState, jax.Array, jax.Array]:
    """One optimizer update; a step with non-finite gradients is skipped (parameters and optimizer state
    kept) and shrinks the loss scale. Returns the new state, whether the update was applied, and the
    gradients' global norm. The norm doubles as the finiteness check (an inf or NaN anywhere makes it
    non-finite), which saves a pass over the gradients.

    The skip is a `lax.cond`, not an element-wise choice between new and old values: XLA then updates the
    parameters and moments in place, without keeping the old ones for the choice (bench-small all trainable
    on CPU, old and new alternating: 895-952 against 855-920 tokens/s; bench/RESULTS.md)."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm)

    def updated(params, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, updated, lambda params, opt_state: (params, opt_state),
                                     state.params, state.opt_state)
    state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        loss_scale=state.loss_scale.update(finite),
        data_position=state.data_position + 1,
    )
    return state, finite, grad_norm


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    options: StepOptions) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    model = GPTSAN(config)

    def train_step(state: TrainState, batch: Batch):
        grads, terms, out = loss_and_grads(model, options, state, batch)
        new_state, applied, grad_norm = apply_gradients(optimizer, state, grads)
        metrics = {
            "loss": terms.loss + out.aux_loss,
            "cross_entropy": terms.cross_entropy,
            "z_loss": terms.z_loss,
            "aux_loss": out.aux_loss,
            "accuracy": terms.accuracy,
            "tokens": terms.tokens,
            "learning_rate": schedule(schedule_count(state.opt_state)),  # the rate applied (not advanced by a skip)
            "grad_norm": grad_norm,
            "loss_scale": state.loss_scale.scale,
            "update_applied": applied,
            "dropped_fraction": out.dropped_fraction,
            "expert_load": out.expert_load,
        }
        return new_state, metrics

    return train_step


def make_eval_step(config: ModelConfig, options: StepOptions) -> Callable[[TrainState, Batch], dict]:
    """Loss terms on a batch without updating anything (eval routing: capacity factor 2.0, no jitter)."""
    model = GPTSAN(config)

    def eval_step(state: TrainState, batch: Batch):
        out, terms = _forward(model, state.all_params, batch, options, jax.random.fold_in(state.rng, state.step),
                              train=False)
        return {"loss": terms.loss + out.aux_loss, "cross_entropy": terms.cross_entropy,
                "accuracy": terms.accuracy, "tokens": terms.tokens}

    return eval_step
