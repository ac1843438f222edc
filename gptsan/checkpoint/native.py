"""gptsan's native model directory: `parameters.json` + `params/`, an Orbax PyTree checkpoint; or a training
run's output_dir (`parameters.json` + `<step>/state/`), whose newest checkpoint's parameters are read, or
one `<step>/` of it (with the run's parameters.json in the folder above).

`params/` is written by `orbax.checkpoint.PyTreeCheckpointer` (OCDBT/tensorstore, so local paths and gs://
work alike) and holds the parameter tree under GPTSAN's names (`model/att0/qkv/kernel` is
`{"model": {"att0": {"qkv": {"kernel": ...}}}}`) in float32 or bfloat16. Reading always yields float32
numpy arrays on the host, whatever the storage dtype and whatever devices wrote it. `parameters.json` is
written last: its presence marks a complete directory.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import numpy as np

from gptsan import storage
from gptsan.checkpoint.dtypes import NATIVE_STORAGE_DTYPES
from gptsan.checkpoint.staging import staged_output
from gptsan.checkpoint.validate import check_tensors, error_summary
from gptsan.errors import UserError, ctrl_c_deferred
from gptsan.model.config import ModelConfig, load_config
from gptsan.model.params import expected_shapes, flatten, unflatten

PARAMETERS = "parameters.json"
PARAMS_DIR = "params"


TRAIN_STATE_ITEM = "state"  # a training checkpoint `<output_dir>/<step>/state` (gptsan/train/checkpoint.py)
TRAINED_SUBTREES = ("params", "frozen")  # the train state's trainable and frozen parameters


def latest_training_checkpoint(path: str) -> str | None:
    """`path/<step>/state` of the newest finished training checkpoint in `path`, if any."""
    if not storage.isdir(path):
        return None
    fs, base = storage.filesystem(path)
    steps = []
    for entry in fs.ls(base, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.isdigit() and fs.exists(f"{entry.rstrip('/')}/{TRAIN_STATE_ITEM}/commit_success.txt"):
            steps.append(int(name))
    return storage.join(path, str(max(steps)), TRAIN_STATE_ITEM) if steps else None


def training_step(path: str) -> str | None:
    """`path/state` when `path` is one finished step of a training run (`<output_dir>/<step>`, whose run's
    parameters.json is in the folder above it), else None."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    if not name.isdigit() or not storage.exists(storage.join(path, TRAIN_STATE_ITEM, "commit_success.txt")):
        return None
    return storage.join(path, TRAIN_STATE_ITEM)


def parameters_file(path: str) -> str:
    """The parameters.json of the native model directory `path`: its own, or for one step of a training run
    the run's, in the folder above."""
    own = storage.join(path, PARAMETERS)
    if storage.exists(own) or training_step(path) is None:
        return own
    return storage.join(storage.parent(str(path).rstrip("/")), PARAMETERS)


def is_native_dir(path: str) -> bool:
    if not storage.exists(storage.join(path, PARAMETERS)):
        return training_step(path) is not None and storage.exists(parameters_file(path))
    return storage.isdir(storage.join(path, PARAMS_DIR)) or latest_training_checkpoint(path) is not None


def _checkpointer():
    import absl.logging
    import orbax.checkpoint as ocp

    absl.logging.set_verbosity(absl.logging.ERROR)  # Orbax logs a warning per restore of a train state
    drop_late_orbax_reads()
    return ocp.PyTreeCheckpointer()


def _is_late_read(unraisable) -> bool:
    """A tensorstore read finishing after Orbax gave up on the checkpoint and closed its event loop: its
    wake-up call (asyncio's call_soon_threadsafe) raises 'Event loop is closed' in tensorstore's thread."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[0].name == "call_soon_threadsafe"


def drop_late_orbax_reads() -> None:
    """When one read of a truncated or corrupt checkpoint fails, Orbax raises (gptsan turns that into one
    error line) and closes its event loop while the checkpoint's other reads are still in flight; each of
    those then reports an unraisable `RuntimeError: Event loop is closed` (105 tracebacks on stderr for the
    demo's base model). A training save that fails (a gs:// bucket deleted mid-run) does the same (17 tracebacks
    before the error line). Those and only those are dropped; every other unraisable error reaches the previous
    hook. Installed once per process."""
    if getattr(sys.unraisablehook, "drops_late_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _is_late_read(unraisable):
            previous(unraisable)

    hook.drops_late_reads = True
    sys.unraisablehook = hook


def read_params(path: str, config: ModelConfig) -> dict[str, np.ndarray]:
    """GPTSAN-named float32 arrays, checked against `config`'s names and shapes: from the newest training
    checkpoint in `path` when training has saved one (a run's output_dir), else from `path/params`; from that
    step when `path` is one step of a run (`<output_dir>/<step>`)."""
    storage.check_orbax_url(path)  # before the first lookup: with mismatched servers that took minutes of retries
    trained = training_step(path) or latest_training_checkpoint(path)
    if trained is not None:
        return _restore_params(trained, config, TRAINED_SUBTREES)
    return _restore_params(storage.join(path, PARAMS_DIR), config)


def _restore_params(directory: str, config: ModelConfig,
                    subtrees: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Restore a parameter tree (or the union of `subtrees` of a larger tree) as float32 numpy arrays."""
    with _checkpointer() as checkpointer:  # released on every path, the failing ones too
        return _restore_with(checkpointer, directory, config, subtrees)


def _restore_with(checkpointer, directory: str, config: ModelConfig,
                  subtrees: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    try:
        metadata = checkpointer.metadata(storage.absolute(directory)).item_metadata
    except Exception as err:  # orbax/tensorstore raise several types for an unreadable directory
        raise UserError(f"{directory}: not a readable Orbax checkpoint (truncated or corrupt?): "
                        f"{error_summary(err)}") from None
    if metadata is None or not isinstance(metadata.tree, dict):
        raise UserError(f"{directory}: not a readable Orbax checkpoint (truncated or corrupt?): "
                        "no parameter metadata")
    metadata = metadata.tree
    if subtrees is not None:
        metadata = {key: metadata.get(key) or {} for key in subtrees}
    shapes = {name: tuple(meta.shape) for name, meta in _merged(metadata, subtrees).items()}
    check_tensors(directory, shapes, expected_shapes(config))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32),
                                metadata)
    restore = ocp.args.PyTreeRestore(restore_args=restore_args) if subtrees is None else \
        ocp.args.PyTreeRestore(item=metadata, restore_args=restore_args, partial_restore=True)
    try:
        tree = checkpointer.restore(storage.absolute(directory), args=restore)
    except Exception as err:  # truncated or corrupt chunk files
        raise UserError(f"{directory}: cannot read the checkpoint (truncated or corrupt?): "
                        f"{error_summary(err)}") from None
    return {name: np.asarray(value, np.float32) for name, value in _merged(tree, subtrees).items()}


def _merged(tree: dict, subtrees: tuple[str, ...] | None) -> dict[str, Any]:
    """Flat GPTSAN names of a parameter tree, or of the union of its `subtrees`."""
    if subtrees is None:
        return flatten(tree)
    merged: dict[str, Any] = {}
    for key in subtrees:
        merged.update(flatten(tree[key]) if tree.get(key) else {})
    return merged


def read(path: str, **runtime: Any) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    config = load_config(parameters_file(path), **runtime)
    return config, read_params(path, config)


def write(path: str, config: ModelConfig, flat: dict[str, Any], train_params: dict[str, Any] | None = None,
          dtype: str = "float32") -> None:
    """Write `params/` and then `parameters.json` into the (new, empty or staged) directory `path`."""
    import jax.numpy as jnp

    if dtype not in NATIVE_STORAGE_DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(NATIVE_STORAGE_DTYPES)}, got {dtype!r}")
    check_tensors(str(path), {k: np.shape(v) for k, v in flat.items()}, expected_shapes(config), "parameters")
    tree = unflatten({name: np.asarray(jnp.asarray(value, dtype)) for name, value in flat.items()})
    storage.check_orbax_folder(path)
    with ctrl_c_deferred(), _checkpointer() as checkpointer:  # no Orbax writes left running after a Ctrl-C
        checkpointer.save(storage.absolute(storage.join(path, PARAMS_DIR)), tree)
    parameters = {"train_params": dict(train_params or {}), "model_params": config.to_model_params()}
    storage.write_text_atomic(storage.join(path, PARAMETERS), json.dumps(parameters, indent=1) + "\n")


def save(path: str, config: ModelConfig, flat: dict[str, Any], train_params: dict[str, Any] | None = None,
         dtype: str = "float32") -> None:
    """A new native model directory at `path` (refused if it exists), all or nothing."""
    with staged_output(path) as tmp:
        write(tmp, config, flat, train_params, dtype)

