"""Parameter trees by GPTSAN name: flatten/unflatten, shapes of a config, fresh initialisation."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptsan.model.config import ModelConfig
from gptsan.model.transformer import GPTSAN

Params = dict[str, Any]


def flatten(tree: Params) -> dict[str, Any]:
    """{'model': {'att0': {'qkv': {'kernel': a}}}} -> {'model/att0/qkv/kernel': a}."""
    flat = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}/{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", tree)
    return flat


def unflatten(flat: dict[str, Any]) -> Params:
    tree: Params = {}
    for name, value in flat.items():
        node = tree
        *scopes, leaf = name.split("/")
        for scope in scopes:
            node = node.setdefault(scope, {})
        node[leaf] = value
    return tree


def _dummy_inputs(config: ModelConfig):
    ids = jnp.zeros((1, 1), jnp.int32)
    spout = jnp.zeros((1, config.num_spout), jnp.float32)
    return ids, spout


def _init_boxed(config: ModelConfig, rng: jax.Array):
    ids, spout = _dummy_inputs(config)
    return GPTSAN(config).init({"params": rng}, ids, spout=spout)["params"]


def abstract_params(config: ModelConfig) -> Params:
    """Shapes and dtypes (jax.ShapeDtypeStruct) of every parameter, allocating nothing."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0)))


def logical_axes(config: ModelConfig) -> Params:
    """The logical axis names of every parameter (a tree of PartitionSpec of logical names)."""
    return nn.get_partition_spec(jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0)))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(s.shape) for name, s in flatten(abstract_params(config)).items()}


def init_params(config: ModelConfig, seed: int = 0) -> Params:
    """A fresh initialisation as the original's pretraining did (spec section 1), float32."""
    return nn.meta.unbox(jax.jit(_init_boxed, static_argnums=0)(config, jax.random.key(seed)))


def count_params(params: Params) -> int:
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))
