"""Expert parallelism (GShard): experts split over the mesh's `expert` axis, tokens sent to them and back.

    with jax.set_mesh(mesh):  # a (data, expert, model) mesh whose expert axis is > 1
        train_step(...)       # SwitchFF takes this path

Per routing group (G groups of S tokens, the groups split over the batch axes `data` x `expert`), each
token is written by index into a dispatch buffer [G, E, C, d] at (its expert, its position among that
expert's tokens); tokens past the capacity C fall off the buffer (dropped). One sharding constraint moves
the buffer from "groups over data x expert" to "groups over data, experts over expert": XLA turns that
into an all-to-all. Each device then runs only its own experts' FFN (wi/wo sharded [E@expert, d, f@model]),
a second all-to-all brings the results home, and each token reads its row back (dropped tokens read 0).
The capacity rule is the single-device path's; dropless routing uses C = S (any expert may take a whole
group), which costs E times the tokens' size in buffer memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gptsan.errors import UserError

BATCH_AXES = ("data", "expert")


def check_expert_axis(num_experts: int, size: int, flag: str) -> None:
    """Each device of the expert axis holds the same number of whole experts."""
    if num_experts % size:
        raise UserError(f"{flag}: an expert axis of {size} devices must divide the model's {num_experts} experts")


def expert_parallelism() -> int:
    """Size of the `expert` axis of the mesh in context (1 when there is none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names:
        return 1
    return int(mesh.shape["expert"])


def _axes_if_divides(axes: tuple[str, ...], size: int) -> tuple[str, ...] | None:
    mesh = jax.sharding.get_abstract_mesh()
    split = 1
    for axis in axes:
        split *= mesh.shape[axis]
    return axes if size % split == 0 else None


def expert_parallel_ffn(x: jax.Array, expert: jax.Array, position: jax.Array, capacity: int, wi: jax.Array,
                        wo: jax.Array) -> jax.Array:
    """x [G, S, d], expert and position [G, S] (position: earlier tokens of the group routed to the same
    expert), wi [E, d, f], wo [E, f, d] -> [G, S, d]; tokens with position >= capacity get 0."""
    groups, _, d = x.shape
    num_experts = wi.shape[0]
    by_group = PartitionSpec(_axes_if_divides(BATCH_AXES, groups), None, None, None)
    by_expert = PartitionSpec(_axes_if_divides(("data",), groups), "expert", None, None)
    constrain = jax.lax.with_sharding_constraint

    def dispatch(x_group, expert_group, position_group):
        buffer = jnp.zeros((num_experts, capacity, d), x.dtype)
        return buffer.at[expert_group, position_group].set(x_group, mode="drop")

    def combine(y_group, expert_group, position_group):
        return y_group.at[expert_group, position_group].get(mode="fill", fill_value=0)

    buffer = constrain(jax.vmap(dispatch)(x, expert, position), by_group)
    buffer = constrain(buffer, by_expert)  # all-to-all: tokens to their experts' devices
    h = jax.nn.relu(jnp.einsum("gecd,edf->gecf", buffer, wi))
    model = _axes_if_divides(("model",), h.shape[-1])
    h = constrain(h, PartitionSpec(*by_expert[:3], model[0] if model else None))
    y = constrain(jnp.einsum("gecf,efd->gecd", h, wo), by_expert)
    y = constrain(y, by_group)  # all-to-all: results back to their tokens' devices
    return jax.vmap(combine)(y, expert, position)
