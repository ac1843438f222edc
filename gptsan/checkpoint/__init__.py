"""Model checkpoints in every format gptsan reads: `load_model(path)` finds out which one it is.

Formats (one module each; name tables in names.py):
- native (native.py): `parameters.json` + `params/` (Orbax), what gptsan writes, or a training run's
  `output_dir` (`parameters.json` + `<step>/state`), read from its newest finished step, or one step of it;
- original TF1 checkpoint (tf_checkpoint.py): `checkpoint` + `model.index` + `model.data-*`, with the
  `parameters.json` of the original in the same directory;
- Hugging Face GPTSanJapanese folder (hf.py): `config.json` + `model.safetensors` (or `pytorch_model.bin`).
Parameters come back as a nested dict of float32 numpy arrays under GPTSAN's names (host memory; callers
place them on devices as they need).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gptsan import storage
from gptsan.errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from gptsan.model.config import ModelConfig

# The format modules bring JAX and Flax (seconds of imports): they are imported where they are used, so that a
# command-line parser reads what it needs from this package (gptsan/checkpoint/dtypes.py) without them.

FORMATS = ("native", "gptsan-tf", "hf")
# model_params keys a TF checkpoint's parameters.json may lack, and the variable whose rows say them: the original's
# trainer added num_vocabulary to the file it wrote, and users' own files may omit num_spout (spec section 3).
SIZES_IN_THE_CHECKPOINT = {"num_vocabulary": "model/wte", "num_spout": "pasts/mlp0/kernel"}


def detect_format(path: str) -> str:
    """'native', 'gptsan-tf' or 'hf' for the model directory `path`; a UserError when it is none of them."""
    from gptsan.checkpoint import hf, native, tf_checkpoint

    path = str(path)
    storage.check_gcs_endpoints(path)  # a gs:// model dir: both servers agree (a native one is read through Orbax)
    if not storage.isdir(path):
        if storage.exists(path):
            raise UserError(f"{path}: is a file; expected a model directory")
        raise UserError(f"{path}: model directory not found")
    if native.is_native_dir(path):
        return "native"
    if tf_checkpoint.is_tf_dir(path):
        if not storage.exists(storage.join(path, native.PARAMETERS)):
            raise UserError(f"{path}: TF checkpoint without parameters.json; put the model's parameters.json "
                            "in the checkpoint directory")
        return "gptsan-tf"
    if hf.is_hf_dir(path):
        return "hf"
    raise UserError(f"{path}: not a model directory (expected parameters.json + params/, a TF checkpoint "
                    "with parameters.json, or config.json + model.safetensors)")


def load_flat(path: str, **runtime: Any) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, {GPTSAN name: float32 array}) from a model directory of any format."""
    from gptsan.checkpoint import hf, native, tf_checkpoint
    from gptsan.model.config import ModelConfig, read_parameters_json
    from gptsan.model.params import expected_shapes

    path = str(path)
    fmt = detect_format(path)
    if fmt == "native":
        return native.read(path, **runtime)
    if fmt == "hf":
        return hf.read(path, **runtime)
    parameters = storage.join(path, native.PARAMETERS)
    model_params = read_parameters_json(parameters)["model_params"]
    missing = {}
    if isinstance(model_params, dict):
        missing = {key: name for key, name in SIZES_IN_THE_CHECKPOINT.items() if key not in model_params}
    if missing:
        shapes = tf_checkpoint.variable_shapes(path)
        model_params = {**model_params, **{key: shapes[name][0] for key, name in missing.items() if name in shapes}}
    config = ModelConfig.from_model_params(model_params, parameters, **runtime)
    return config, tf_checkpoint.read(path, expected_shapes(config))


def load_model(path: str, **runtime: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, nested float32 parameter tree) from a model directory of any format, local or gs://.

    `runtime` (dtype, routing, ...) goes to the ModelConfig. Names and shapes are checked against the
    configuration: missing, extra or misshapen tensors and unreadable files are one UserError.
    """
    from gptsan.model.params import unflatten

    config, flat = load_flat(path, **runtime)
    return config, unflatten(flat)


__all__ = ["FORMATS", "detect_format", "load_flat", "load_model"]
