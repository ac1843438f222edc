"""The train state as one pytree: step, trainable and frozen parameters, optimizer state (trainable only),
rng, loss scale and the data position (batches consumed). A checkpoint is exactly this tree."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gptsan.errors import UserError
from gptsan.model.config import ModelConfig
from gptsan.model.params import expected_shapes, flatten, unflatten
from gptsan.train.precision import LossScale


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: train steps taken (a skipped float16 step counts)
    params: dict  # the trainable parameters
    frozen: dict  # parameters named in the ignore list: no gradient, no optimizer slots
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step randomness is fold_in(rng, step)
    loss_scale: LossScale
    data_position: jax.Array  # int32: batches consumed from the data pipeline

    @property
    def all_params(self) -> dict:
        return merge_params(self.params, self.frozen)


def check_frozen_names(names: Iterable[str], config: ModelConfig, source: str = "--ignore_parameters"):
    """The ignore list as a set; names the model does not have are a user error."""
    names = list(names)
    if not all(isinstance(name, str) for name in names):
        raise UserError(f"{source}: expected a JSON list of parameter names")
    unknown = sorted(set(names) - set(expected_shapes(config)))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise UserError(f"{source}: names no parameter of this model: {shown}")
    return frozenset(names)


def split_params(params: dict, frozen_names: frozenset[str]) -> tuple[dict, dict]:
    """(trainable, frozen) subtrees of a parameter tree."""
    flat = flatten(params)
    trainable = {name: value for name, value in flat.items() if name not in frozen_names}
    frozen = {name: value for name, value in flat.items() if name in frozen_names}
    return unflatten(trainable), unflatten(frozen)


def merge_params(trainable: dict, frozen: dict) -> dict:
    return unflatten({**flatten(trainable), **flatten(frozen)})


def create_state(params: dict, frozen_names: frozenset[str], optimizer: optax.GradientTransformation,
                 seed: int, loss_scale: LossScale) -> TrainState:
    """A step-0 state (pure: usable under jax.jit with out_shardings, so the state is born sharded)."""
    trainable, frozen = split_params(params, frozen_names)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=optimizer.init(trainable), rng=jax.random.PRNGKey(seed),
                      loss_scale=loss_scale, data_position=jnp.zeros((), jnp.int32))


def change_trainable_set(state: TrainState, frozen_names: frozenset[str],
                         optimizer: optax.GradientTransformation) -> TrainState:
    """The state trained with another ignore list (pure: usable under jax.jit). Parameters, step, rng, loss
    scale and data position are kept. The optimizer state is the new split's, filled from the old wherever a
    leaf has the same path, shape and dtype in both: the moments of parameters trainable before and now, and
    the step counts (so the learning-rate schedule goes on). Parameters newly trainable start with zero moments;
    the newly frozen ones' moments are dropped."""
    trainable, frozen = split_params(state.all_params, frozen_names)
    old = {jax.tree_util.keystr(path): leaf
           for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}

    def carried(path, fresh):
        leaf = old.get(jax.tree_util.keystr(path))
        same = leaf is not None and leaf.shape == fresh.shape and leaf.dtype == fresh.dtype
        return leaf if same else fresh

    opt_state = jax.tree_util.tree_map_with_path(carried, optimizer.init(trainable))
    return state.replace(params=trainable, frozen=frozen, opt_state=opt_state)
