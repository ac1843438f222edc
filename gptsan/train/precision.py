"""Compute precision from GPTSAN's flags, and dynamic loss scaling for float16.

float16 training multiplies the loss by a scale before differentiation so that small gradients survive in
float16 activations. The scale shrinks (halves) on a step whose gradients are not finite, and that step's
update is skipped; after `period` good steps in a row it doubles again. (The original used a static scale
and diverged, spec section 7.)
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

from gptsan.errors import UserError

INITIAL_FP16_SCALE = 2.0**15
GROWTH_PERIOD = 2000


def compute_dtype(use_bfloat16: bool, use_mixed_precision: bool) -> str:
    if use_bfloat16 and use_mixed_precision:
        raise UserError("--use_bfloat16 and --use_mixed_precision: choose one (bfloat16 or float16 compute)")
    if use_bfloat16:
        return "bfloat16"
    return "float16" if use_mixed_precision else "float32"


@flax.struct.dataclass
class LossScale:
    scale: jnp.ndarray  # float32 scalar
    good_steps: jnp.ndarray  # int32 scalar: finite steps since the last change
    dynamic: bool = flax.struct.field(pytree_node=False, default=False)
    period: int = flax.struct.field(pytree_node=False, default=GROWTH_PERIOD)

    @classmethod
    def for_dtype(cls, dtype: str, period: int = GROWTH_PERIOD) -> LossScale:
        dynamic = dtype == "float16"
        scale = INITIAL_FP16_SCALE if dynamic else 1.0
        return cls(jnp.asarray(scale, jnp.float32), jnp.zeros((), jnp.int32), dynamic, period)

    def update(self, grads_finite: jnp.ndarray) -> LossScale:
        """The scale after a step whose gradients were (not) finite."""
        if not self.dynamic:
            return self
        grow = grads_finite & (self.good_steps + 1 >= self.period)
        scale = jnp.where(grads_finite, jnp.where(grow, self.scale * 2.0, self.scale),
                          jnp.maximum(self.scale / 2.0, 1.0))
        good = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good.astype(jnp.int32))
