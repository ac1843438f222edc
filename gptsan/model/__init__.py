"""The GPTSAN model in Flax (Linen).

The configuration loads at once (no JAX); the model and its parameter functions, which bring JAX and Flax
(seconds of imports), load when first used: `from gptsan.model import GPTSAN` works as ever, while a tool that
only needs a flag's choices from gptsan.model.config answers `--help` or a flag error without waiting for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gptsan.model.config import ModelConfig, load_config

if TYPE_CHECKING:
    from gptsan.model.params import abstract_params, expected_shapes, flatten, init_params, unflatten
    from gptsan.model.transformer import GPTSAN, KVCache, Output

# Each name loaded on first use, and the submodule that defines it.
_LAZY = {
    "GPTSAN": "transformer", "KVCache": "transformer", "Output": "transformer",
    "abstract_params": "params", "expected_shapes": "params", "flatten": "params", "init_params": "params",
    "unflatten": "params",
}

__all__ = ["GPTSAN", "KVCache", "ModelConfig", "Output", "abstract_params", "expected_shapes", "flatten",
           "init_params", "load_config", "unflatten"]


def __getattr__(name: str):  # PEP 562: called only for names not (yet) in this module
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
