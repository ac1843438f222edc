"""What run_modelconvert.py does to a model: append extended layers, re-initialise the spout network.

Every function takes and returns (config, {GPTSAN name: float32 array}); parameters not named here are
passed through untouched (the same arrays, so bit for bit). New values are drawn from a generator seeded
by (seed, name), so a parameter's value does not depend on which other parameters were drawn.
"""

from __future__ import annotations

import zlib

import numpy as np

from gptsan.errors import UserError
from gptsan.model.config import ModelConfig
from gptsan.model.spout import NUM_SPOUT_MLP

NEW_STDDEV = 0.02  # new extended-layer kernels and biases, and pasts/out (spec section 6)
# A re-initialised spout MLP uses fan-in scaling (stddev 1/sqrt(P)), not the original's N(0, 0.01): with 0.01
# each of the 8 tanh layers shrinks its input by about 0.01*sqrt(P) (0.04 for P=16, 0.11 for P=128), so a class
# vector arrives ~1e-8 times smaller and its gradients fall below Adam's epsilon: the spout never trains.


def spout_mlp_stddev(num_spout: int) -> float:
    return num_spout**-0.5

Flat = dict[str, np.ndarray]


def normal(name: str, shape: tuple[int, ...], stddev: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return (rng.standard_normal(shape) * stddev).astype(np.float32)


def new_extended_layer(config: ModelConfig, layer: int, seed: int) -> Flat:
    """The parameters of extended layer `layer`: LayerNorms g=1, b=0; kernels and biases N(0, 0.02)."""
    d, h, dh, f = config.num_hidden, config.num_header, config.head_dim, config.num_ext_hidden
    drawn = {
        f"model/att{layer}/qkv/kernel": (d, 3, h, dh),
        f"model/att{layer}/o/kernel": (h, dh, d),
        f"model/mlp{layer}/p1/kernel": (d, f),
        f"model/mlp{layer}/p1/bias": (f,),
        f"model/mlp{layer}/p2/kernel": (f, d),
        f"model/mlp{layer}/p2/bias": (d,),
    }
    flat = {name: normal(name, shape, NEW_STDDEV, seed) for name, shape in drawn.items()}
    for norm in ("an", "ln"):
        flat[f"model/{norm}{layer}/g"] = np.ones((d,), np.float32)
        flat[f"model/{norm}{layer}/b"] = np.zeros((d,), np.float32)
    return flat


def add_extended_layers(config: ModelConfig, flat: Flat, count: int, seed: int) -> tuple[ModelConfig, Flat]:
    """Append `count` extended layers after the existing ones; add `ete` = 0 if absent; re-draw pasts/out."""
    if not isinstance(count, int) or count < 0:
        raise UserError(f"--add_extra_stage: expected a non-negative number of layers, got {count}")
    if count == 0:
        return config, dict(flat)
    new_config = config.replace(num_ext_layers=config.num_ext_layers + count)
    out = dict(flat)
    for layer in range(config.num_layers, new_config.num_layers):
        out.update(new_extended_layer(new_config, layer, seed))
    out.setdefault("model/ete", np.zeros((config.num_contexts, config.num_hidden), np.float32))
    kv_width = new_config.num_layers * 2 * new_config.num_hidden
    out["pasts/out/kernel"] = normal("pasts/out/kernel", (config.num_spout, kv_width), NEW_STDDEV, seed)
    return new_config, out


def resize_spout(config: ModelConfig, flat: Flat, num_spout: int, seed: int) -> tuple[ModelConfig, Flat]:
    """A freshly initialised spout network of input width `num_spout` (the same width as now re-initialises it:
    that is how a model pretrained without class vectors gets a spout that can learn them)."""
    if not isinstance(num_spout, int) or num_spout < 1:
        raise UserError(f"--num_spout: expected a positive integer, got {num_spout}")
    new_config = config.replace(num_spout=num_spout)
    out = {name: value for name, value in flat.items() if not name.startswith("pasts/")}
    for i in range(NUM_SPOUT_MLP):
        name = f"pasts/mlp{i}/kernel"
        out[name] = normal(name, (num_spout, num_spout), spout_mlp_stddev(num_spout), seed)
    kv_width = new_config.num_layers * 2 * new_config.num_hidden
    out["pasts/out/kernel"] = normal("pasts/out/kernel", (num_spout, kv_width), NEW_STDDEV, seed)
    return new_config, out
