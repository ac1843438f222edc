"""The `--seed` flag every tool has: an integer from 0 to 2**32 - 1, the seeds that numpy's generators
(no negative seeds) and JAX's keys (32 bits) both take. A seed outside used to end in a traceback after the
model had loaded (convert, encode: `expected non-negative integer`; generate: an OverflowError at 2**32)."""

from __future__ import annotations

import argparse

LARGEST_SEED = 2**32 - 1


def seed_flag(text: str) -> int:
    """argparse `type=` for --seed."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= LARGEST_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {LARGEST_SEED}, got {text!r}")
    return value
