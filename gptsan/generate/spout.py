"""The --spout flag: none, uniform (U(0,1) per text, seeded), zeros, a class N (one-hot of N), or
num_spout comma-separated numbers."""

from __future__ import annotations

import numpy as np

from gptsan.errors import UserError


def parse_spout(value: str, num_spout: int, batch: int, seed: int = 0) -> np.ndarray | None:
    """[batch, num_spout] float32 spout vectors, or None for `none`."""
    value = value.strip()
    if value == "none":
        return None
    if value == "uniform":
        return np.random.default_rng(seed).uniform(0, 1, (batch, num_spout)).astype(np.float32)
    if value == "zeros":
        return np.zeros((batch, num_spout), np.float32)
    if "," not in value:
        try:
            label = int(value)
        except ValueError:
            raise UserError(f"--spout: expected none, uniform, zeros, a class number or {num_spout} "
                            f"comma-separated numbers, got {value!r}") from None
        if not 0 <= label < num_spout:
            raise UserError(f"--spout: class {label} is outside 0..{num_spout - 1} (the model's num_spout)")
        return np.tile(np.eye(num_spout, dtype=np.float32)[label], (batch, 1))
    try:
        vector = np.asarray([float(v) for v in value.split(",")])
    except ValueError:
        raise UserError(f"--spout: {value!r} is not a list of numbers") from None
    if len(vector) != num_spout:
        raise UserError(f"--spout: got {len(vector)} numbers, the model's num_spout is {num_spout}")
    if not np.all(np.abs(vector) <= float(np.finfo(np.float32).max)):  # nan and inf too: they made every logit nan
        raise UserError(f"--spout: expected finite float32 numbers, got {value!r}")
    return np.tile(vector.astype(np.float32), (batch, 1))
