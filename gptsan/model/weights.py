"""Named parameter groups: one Linen scope per GPTSAN variable prefix (`att0/qkv` holds `kernel`).

Every parameter is created float32 with logical axis names; layers never name mesh axes (see sharding.py).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def normal(stddev: float) -> Initializer:
    return nn.initializers.normal(stddev)


def fan_in_normal(in_axis: int = -2, batch_axis: tuple[int, ...] = ()) -> Initializer:
    """Mesh-TensorFlow's default kernel initialiser: variance scaling, scale 1, fan-in, truncated normal."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                            batch_axis=batch_axis)


zeros = nn.initializers.zeros
ones = nn.initializers.ones


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
          init: Initializer) -> jax.Array:
    """A float32 parameter of `module` with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class Kernel(nn.Module):
    """A scope holding one `kernel` (and, with `bias_axes`, one `bias` of the kernel's last dimension)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: Initializer
    with_bias: bool = False

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        kernel = param(self, "kernel", self.shape, self.axes, self.init)
        bias = param(self, "bias", self.shape[-1:], self.axes[-1:], zeros) if self.with_bias else None
        return kernel, bias


class Bias(nn.Module):
    """A scope holding only a `bias` (GPTSAN's `dense_1/bias`)."""

    size: int
    axis: str

    @nn.compact
    def __call__(self) -> jax.Array:
        return param(self, "bias", (self.size,), (self.axis,), zeros)
