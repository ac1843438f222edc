"""Expert parallelism: with experts over the mesh's `expert` axis, tokens travel to their experts' devices
(all-to-all) and each device computes only its own experts; the loss is the one-device loss."""

import re

import jax
import numpy as np
import pytest

from gptsan.model.config import ModelConfig
from gptsan.model.sharding import make_mesh
from tests.train_support import MINI_MODEL_PARAMS, counting_corpus, memory_batches, sharded_training

# 4 experts over an expert axis of 4 (data 2): 8 rows of 16 tokens in routing groups of 16 (8 groups, one
# per device before the all-to-all), capacity max(4, int(16 * 1.25 / 4)) = 5 tokens per expert and group,
# so some tokens are dropped, exactly as on one device.
EXPERTS, GROUP, CAPACITY, D, FF = 4, 16, 5, 32, 256
# float32 on CPU; the sharded program sums in another order (measured: 2.0e-7 relative over 3 steps).
TOLERANCE = 1e-5


def losses_on(mesh, steps=3):
    config = ModelConfig.from_model_params({**MINI_MODEL_PARAMS, "num_experts": EXPERTS}, "mini",
                                           routing="capacity", group_size=GROUP)
    state, step, batch_shard = sharded_training(config, mesh)
    stream = memory_batches(counting_corpus(32, 16, 128, period=8), 8)
    batch = jax.device_put(next(stream), batch_shard)
    hlo = step.lower(state, batch).compile().as_text()
    losses, dropped = [], []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        dropped.append(float(metrics["dropped_fraction"]))
        batch = jax.device_put(next(stream), batch_shard)
    return losses, dropped, hlo


def shapes_of(hlo: str, op_name: str) -> set[str]:
    """Result shapes of the compiled instructions that come from the einsum `op_name`."""
    return {match.group(1) for match in re.finditer(r"= (f32\[[0-9,]*\])\S* \S+\(.*op_name=\"[^\"]*/"
                                                    + re.escape(op_name) + r"[/\"]", hlo)}


def test_tokens_travel_to_sharded_experts_and_the_loss_is_the_one_device_loss():
    if jax.device_count() < 8:
        pytest.fail("needs 8 devices: conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = make_mesh(expert=4)
    assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
    sharded, dropped, hlo = losses_on(mesh)
    single, single_dropped, single_hlo = losses_on(make_mesh(devices=jax.devices()[:1]))

    print("losses", sharded, single, "dropped", dropped)
    np.testing.assert_allclose(sharded, single, rtol=TOLERANCE)
    np.testing.assert_allclose(dropped, single_dropped, atol=1e-7)
    assert min(dropped) > 0  # the capacity rule really drops tokens here

    assert "all-to-all" in hlo and "all-to-all" not in single_hlo
    assert "all-gather" not in hlo  # expert weights are never gathered
    # Every array of the expert FFN (forward and backward) is one device's share: its 8/2 groups x 4/4
    # experts x 5 slots of activations, or 1 expert's weights; all 4 experts would be 4 times larger.
    local_activations = (8 // 2) * (EXPERTS // 4) * CAPACITY * FF
    local_weights = (EXPERTS // 4) * D * FF
    shapes = shapes_of(hlo, "gecd,edf->gecf") | shapes_of(hlo, "gecf,efd->gecd")
    sizes = [int(np.prod([int(n) for n in shape[4:-1].split(",")])) for shape in shapes]
    print("expert FFN shapes per device", sorted(shapes))
    assert f"f32[{EXPERTS // 4},{FF},{D}]" in shapes  # the gradient of one device's wo
    assert sizes and max(sizes) <= max(local_activations, local_weights)
