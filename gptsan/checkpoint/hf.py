"""Hugging Face GPTSanJapanese folders: `config.json` + `model.safetensors` (or `pytorch_model.bin`, or the
shards a `*.index.json` of either names).

Reading accepts float16, bfloat16 or float32 weights and always yields float32; `lm_head.weight` may be
present (it must equal the tied embedding) or absent. A config.json under which the port computes other than
GPTSAN (layer_norm_epsilon other than 1e-5, router_bias) is refused. Writing produces the folder that
transformers 4.40's `GPTSanJapaneseForConditionalGeneration.from_pretrained` loads. Keys and layouts:
`names.HF_TABLE`.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any

import jax
import numpy as np

from gptsan import storage
from gptsan.checkpoint.dtypes import FLOAT_STORAGE_DTYPES
from gptsan.checkpoint.names import HF_EMBEDDING, HF_TIED_HEAD, hf_entries
from gptsan.checkpoint.validate import check_tensors, refuse_not_floating
from gptsan.errors import UserError
from gptsan.model.config import ModelConfig

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"  # save_pretrained's sharded weights: `model.safetensors.index.json` + shards
# The weights looked for, in this order: one file, else an index of shards (what save_pretrained writes for
# a model over max_shard_size, 5 GB by default: GPTSAN-2.8B in float32).
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS + INDEX_SUFFIX, TORCH_BIN, TORCH_BIN + INDEX_SUFFIX)
# The config.json fields that set the model's sizes (ModelConfig.from_hf_config).
INTEGER_FIELDS = ("d_model", "d_ff", "d_ext", "d_spout", "num_switch_layers", "num_ext_layers", "num_heads",
                  "num_experts", "vocab_size", "max_position_embeddings")


def weights_file(path: str) -> str | None:
    """The folder's weights file (or shard index), the first of WEIGHT_FILES there."""
    for name in WEIGHT_FILES:
        if storage.exists(file := storage.join(path, name)):
            return file
    return None


def is_hf_dir(path: str) -> bool:
    return storage.exists(storage.join(path, CONFIG)) and weights_file(path) is not None


def read_config(path: str, **runtime: Any) -> ModelConfig:
    source = storage.join(path, CONFIG)
    hf = storage.read_json(source)  # not UTF-8 was a UnicodeDecodeError traceback
    if not isinstance(hf, dict):
        raise UserError(f"{source}: expected a JSON object")
    for key in INTEGER_FIELDS:  # int() took "abc" or null with a traceback, 64.5 as 64 and true as 1
        value = hf.get(key, 0)
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise UserError(f"{source}: {key} must be an integer, got {json.dumps(value)}")
    epsilon = hf.get("layer_norm_epsilon", ModelConfig.layer_norm_eps)
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not 0 < epsilon < 1:
        raise UserError(f"{source}: layer_norm_epsilon must be a small positive number, got {json.dumps(epsilon)}")
    _refuse_other_numerics(source, hf)
    dtype = hf.get("dtype", hf.get("torch_dtype", "float32"))
    if dtype not in FLOAT_STORAGE_DTYPES:
        raise UserError(f"{source}: dtype {dtype!r} is not one of {', '.join(FLOAT_STORAGE_DTYPES)}")
    return ModelConfig.from_hf_config(hf, source, **runtime)


def _refuse_other_numerics(source: str, hf: dict[str, Any]) -> None:
    """Refuse the config.json settings under which the port computes other than GPTSAN does. gptsan's model has
    no such setting and parameters.json no field to keep one, so a folder read anyway (and converted) would be
    another model. The port's other fields leave its logits alone: dropout_rate and router_jitter_noise act in
    training only, initializer_factor at initialisation, the token ids in generation; router_dtype is a compute
    precision (the router is float32 here); expert_capacity is the port's dropping rule, which gptsan's routing
    replaces (docs/formats.md); a head untied from the embedding is refused with the weights."""
    epsilon = hf.get("layer_norm_epsilon", ModelConfig.layer_norm_eps)
    if not math.isclose(epsilon, ModelConfig.layer_norm_eps, rel_tol=1e-6):
        raise UserError(f"{source}: layer_norm_epsilon is {json.dumps(epsilon)}, but gptsan uses "
                        f"{ModelConfig.layer_norm_eps:g} (GPTSAN's LayerNorm; parameters.json has no field to keep "
                        "another)")
    if hf.get("router_bias") not in (None, False):
        raise UserError(f"{source}: router_bias is {json.dumps(hf['router_bias'])}, but GPTSAN's router has no "
                        "bias; expected false")


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF key -> shape of every tensor a folder for `config` holds (lm_head.weight aside)."""
    from gptsan.model.params import expected_shapes

    shapes = expected_shapes(config)
    out = {}
    for entry in hf_entries(config):
        abstract = jax.ShapeDtypeStruct(shapes[entry.name], np.float32)
        for key, value in jax.eval_shape(entry.to_hf, abstract).items():
            out[key] = tuple(value.shape)
    return out


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load, load_file

    try:  # a local file is memory-mapped; a remote one is read whole
        tensors = load(storage.read_bytes(file)) if storage.is_remote(file) else load_file(file)
    except (SafetensorError, ValueError, TypeError, OSError) as err:  # TypeError: a dtype numpy lacks
        raise UserError(f"{file}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    refuse_not_floating(file, {key: str(value.dtype) for key, value in tensors.items()
                                if not jax.numpy.issubdtype(value.dtype, jax.numpy.floating)}, FLOAT_STORAGE_DTYPES)
    return tensors


def _read_torch_bin(file: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{file}: reading pytorch_model.bin needs torch, which is not installed; convert the "
                        "folder to model.safetensors (or install torch)") from None
    try:
        with storage.open_file(file, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe (pickled-code) files
        raise UserError(f"{file}: not a readable weights-only torch file: {type(err).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"{file}: expected a state dict of tensor name -> tensor")
    refuse_not_floating(file, {key: str(value.dtype).removeprefix("torch.") for key, value in state.items()
                                if not value.is_floating_point()}, FLOAT_STORAGE_DTYPES)
    return {key: value.float().numpy() for key, value in state.items()}


def _read_shards(index: str, read_one) -> dict[str, np.ndarray]:
    """The tensors of every shard `index` (save_pretrained's `*.index.json`) names, from its folder."""
    weight_map = storage.read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise UserError(f"{index}: expected a JSON object whose weight_map maps tensor names to shard files")
    folder = index[: -len(posixpath.basename(index))]
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        if shard != posixpath.basename(shard) or "\\" in shard or shard in ("", ".", ".."):
            raise UserError(f"{index}: shard {shard!r} is not a file name in the folder")
        if not storage.exists(folder + shard):
            raise UserError(f"{index}: shard {shard} is missing from the folder")
        tensors.update(read_one(folder + shard))
    return tensors


def read(path: str, **runtime: Any) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, GPTSAN-named float32 arrays) from an HF folder; names and shapes validated."""
    config = read_config(path, **runtime)
    file = weights_file(path)
    read_one = _read_safetensors if posixpath.basename(file).startswith(SAFETENSORS) else _read_torch_bin
    tensors = _read_shards(file, read_one) if file.endswith(INDEX_SUFFIX) else read_one(file)
    head = tensors.pop(HF_TIED_HEAD, None)
    check_tensors(file, {key: value.shape for key, value in tensors.items()}, expected_hf_shapes(config))
    tensors = {key: np.asarray(value, np.float32) for key, value in tensors.items()}
    if head is not None and not np.array_equal(np.asarray(head, np.float32), tensors[HF_EMBEDDING]):
        raise UserError(f"{file}: {HF_TIED_HEAD} differs from {HF_EMBEDDING}; GPTSAN ties them")
    flat = {entry.name: np.ascontiguousarray(entry.from_hf(tensors, config.num_header))
            for entry in hf_entries(config)}
    return config, flat


def write(path: str, config: ModelConfig, flat: dict[str, Any], dtype: str = "float32") -> None:
    """Write `config.json` + `model.safetensors` into the existing directory `path`."""
    from safetensors.numpy import save

    if dtype not in FLOAT_STORAGE_DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(FLOAT_STORAGE_DTYPES)}, got {dtype!r}")
    np_dtype = jax.numpy.dtype(dtype)
    tensors = {}
    for entry in hf_entries(config):
        for key, value in entry.to_hf(np.asarray(flat[entry.name], np.float32)).items():
            tensors[key] = np.ascontiguousarray(value.astype(np_dtype))
    hf_config = config.to_hf_config()
    hf_config["torch_dtype"] = dtype
    with storage.open_file(storage.join(path, SAFETENSORS), "wb") as f:
        f.write(save(tensors, metadata={"format": "pt"}))
    storage.write_text_atomic(storage.join(path, CONFIG), json.dumps(hf_config, indent=2) + "\n")
