"""Logical axis names -> mesh axes (`data`, `expert`, `model`): the one rules table and the mesh builder.

Layers name only logical axes (see weights.py); this file is the only place that maps them onto devices.
A logical axis whose size the mesh axis does not divide stays replicated (e.g. 4 heads on a model axis of 8).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptsan.errors import UserError
from gptsan.model.config import ModelConfig
from gptsan.model.params import abstract_params, logical_axes

MESH_AXES = ("data", "expert", "model")

# Logical axis -> mesh axis (None: replicated). Batch rows are split over data and expert (expert
# parallelism also splits the batch, as GShard does); heads, FFN widths and the vocabulary over `model`
# (num_pallarelizm). Splitting the vocabulary splits the tied embedding table, its bias and the logits, so each
# model-axis device computes its share of the head (the masked lookup and the logsumexp's max and sum then
# cross the model axis as all-reduces) instead of all of it.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "expert"),
    "expert": "expert",
    "heads": "model",
    "mlp": "model",
    "vocab": "model",
    "embed": None,
    "embed_out": None,
    "ctx": None,
    "qkv": None,
    "kv": None,
    "expert_route": None,
    "spout": None,
    "spout_out": None,
    "spout_kv": None,
}


def model_axis_size(num_pallarelizm: int, device_count: int) -> int:
    """The model axis over `device_count` devices (those the expert axis leaves): num_pallarelizm as far as it
    divides them (the release parameters.json's 8 on one GPU: 1). Only the layout changes, not the model."""
    return math.gcd(num_pallarelizm, device_count)


def make_mesh(model: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A (data, expert, model) mesh over all devices; `data` takes whatever `expert x model` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or expert < 1:
        raise UserError(f"mesh: the expert ({expert}) and model ({model}) axes need at least one device each")
    if len(devices) % (model * expert):
        raise UserError(f"mesh: {len(devices)} devices cannot be split into expert {expert} x model {model}")
    shape = (len(devices) // (model * expert), expert, model)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _mesh_size(mesh: Mesh, axes) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[name] for name in names]))


def mesh_spec(logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The mesh PartitionSpec of one array from its logical axis names, replicating what does not divide."""
    spec = []
    for name, size in zip(logical, shape, strict=True):
        axes = RULES.get(name) if name is not None else None
        if axes is not None and size % _mesh_size(mesh, axes):
            axes = None
        spec.append(axes)
    return PartitionSpec(*spec)


def param_shardings(config: ModelConfig, mesh: Mesh):
    """A tree of NamedSharding matching the parameter tree."""
    return jax.tree_util.tree_map(
        lambda logical, abstract: NamedSharding(mesh, mesh_spec(logical, abstract.shape, mesh)),
        logical_axes(config), abstract_params(config),
        is_leaf=lambda node: isinstance(node, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over the data (and expert) axes; other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(RULES["batch"]))


def check_batch_split(batch: int, mesh_shape: dict[str, int], name: str) -> None:
    """A batch's rows are split over the data and expert axes (`RULES["batch"]`): `name`'s `batch` must be a
    multiple of their devices. (Training met it as jax's IndivisibleError traceback in its first step.)"""
    axes = RULES["batch"]
    rows_split = int(np.prod([mesh_shape[axis] for axis in axes]))
    if batch % rows_split:
        sizes = " and ".join(f"{axis} ({mesh_shape[axis]})" for axis in axes)
        raise UserError(f"{name} {batch}: must be a multiple of {rows_split}, the devices of the {sizes} axes "
                        "that split the batch")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def under_mesh(function, mesh: Mesh):
    """`function` (to be jitted) traced with `mesh`'s axes in context, so that layers can read them and
    constrain shardings by axis name (expert parallelism: gptsan/model/expert_parallel.py)."""

    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return function(*args, **kwargs)

    return traced
