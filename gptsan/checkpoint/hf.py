"""Hugging Face GPTSanJapanese folders: `config.json` + `model.safetensors` (or `pytorch_model.bin`).

Reading accepts float16, bfloat16 or float32 weights and always yields float32; `lm_head.weight` may be
present (it must equal the tied embedding) or absent. Writing produces the folder that transformers 4.40's
`GPTSanJapaneseForConditionalGeneration.from_pretrained` loads. Keys and layouts: `names.HF_TABLE`.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from gptsan import storage
from gptsan.checkpoint.names import HF_EMBEDDING, HF_TIED_HEAD, hf_entries
from gptsan.checkpoint.validate import check_tensors
from gptsan.errors import UserError
from gptsan.model.config import ModelConfig

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def is_hf_dir(path: str) -> bool:
    return storage.exists(storage.join(path, CONFIG)) and (
        storage.exists(storage.join(path, SAFETENSORS)) or storage.exists(storage.join(path, TORCH_BIN)))


def read_config(path: str, **runtime: Any) -> ModelConfig:
    source = storage.join(path, CONFIG)
    hf = storage.read_json(source)  # not UTF-8 was a UnicodeDecodeError traceback
    if not isinstance(hf, dict):
        raise UserError(f"{source}: expected a JSON object")
    dtype = hf.get("dtype", hf.get("torch_dtype", "float32"))
    if dtype not in STORAGE_DTYPES:
        raise UserError(f"{source}: dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    return ModelConfig.from_hf_config(hf, source, **runtime)


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
    except (SafetensorError, ValueError, OSError) as err:
        raise UserError(f"{file}: not a readable safetensors file (truncated or corrupt?): {err}") from None
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
    return {key: value.float().numpy() for key, value in state.items()}


def read(path: str, **runtime: Any) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, GPTSAN-named float32 arrays) from an HF folder; names and shapes validated."""
    config = read_config(path, **runtime)
    file = storage.join(path, SAFETENSORS)
    tensors = _read_safetensors(file) if storage.exists(file) else _read_torch_bin(
        file := storage.join(path, TORCH_BIN))
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

    if dtype not in STORAGE_DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
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
