"""Original GPTSAN TF1 checkpoints: a directory with `checkpoint`, `<prefix>.index`, `<prefix>.data-*`.

Names are GPTSAN's own (the identity table in names.py); optimizer slots (`*/adam_m`, `*/adam_v`) and
`global_step` are skipped. TensorFlow is imported only here, and only when a TF checkpoint is touched.
The writer calls the `SaveV2` op directly, which stores exactly the given names (no object-graph keys),
and writes the `checkpoint` state file, so the result is what a TF1 `Saver` would have written.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
from typing import Any

import numpy as np

from gptsan import storage
from gptsan.checkpoint.names import is_tf_parameter
from gptsan.checkpoint.validate import check_tensors, error_summary
from gptsan.errors import UserError
from gptsan.tf_runtime import tensorflow

STATE_FILE = "checkpoint"
PREFIX = "model"


def is_tf_dir(path: str) -> bool:
    return storage.exists(storage.join(path, STATE_FILE)) or bool(storage.glob(storage.join(path, "*.index")))


def _checkpoint_prefix(path: str) -> str:
    """The checkpoint prefix named by the `checkpoint` state file, else the directory's only `*.index`."""
    tf = tensorflow()
    if storage.exists(storage.join(path, STATE_FILE)):
        prefix = tf.train.latest_checkpoint(str(path))
        if prefix:
            return prefix
    return _only_index(path)


def _only_index(path: str) -> str:
    indexes = storage.glob(storage.join(path, "*.index"))
    if len(indexes) != 1:
        raise UserError(f"{path}: expected one TF checkpoint (`checkpoint` file or a single *.index), "
                        f"found {len(indexes)} index files")
    return indexes[0][: -len(".index")]


def read(path: str, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """GPTSAN-named float32 arrays from the TF checkpoint in `path`, checked against `expected` shapes.
    On gs:// the checkpoint's files are copied to a temporary folder first (through gcsfs, like every other
    gs:// file: TensorFlow's own GCS client cannot be pointed at an emulator)."""
    if not storage.is_remote(path):
        return _read(_checkpoint_prefix(path), expected)
    with tempfile.TemporaryDirectory(prefix="gptsan-tf-") as local:
        prefix = _remote_prefix(path)
        fs, remote = storage.filesystem(prefix)
        for name in fs.glob(remote + ".index") + fs.glob(remote + ".data-*"):
            fs.get(name, os.path.join(local, posixpath.basename(name)))
        return _read(os.path.join(local, posixpath.basename(remote)), expected, shown=prefix)


def _remote_prefix(path: str) -> str:
    """The prefix the `checkpoint` state file names (its last path part, in `path`), else the only *.index."""
    state = storage.join(path, STATE_FILE)
    if storage.exists(state):
        named = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', storage.read_text(state), re.M)
        if named:
            return storage.join(path, posixpath.basename(named.group(1)))
    return _only_index(path)


def _read(prefix: str, expected: dict[str, tuple[int, ...]], shown: str | None = None) -> dict[str, np.ndarray]:
    tf = tensorflow()
    shown = shown or prefix
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()
                  if is_tf_parameter(name)}
        check_tensors(shown, shapes, expected, "checkpoint variables")
        return {name: np.asarray(reader.get_tensor(name), np.float32) for name in sorted(shapes)}
    except (tf.errors.OpError, ValueError, IndexError) as err:  # IndexError: "Read less bytes than requested"
        raise UserError(f"{shown}: not a readable TF checkpoint (truncated or corrupt?): "
                        f"{error_summary(err)}") from None


def write(path: str, flat: dict[str, Any], dtype: str = "float32") -> None:
    """Write `flat` (GPTSAN name -> array) as an original-style TF1 checkpoint into the directory `path`."""
    tf = tensorflow()
    names = sorted(flat)
    with tf.device("/cpu:0"):
        tensors = [tf.constant(np.asarray(flat[name], np.float32), dtype=tf.dtypes.as_dtype(dtype))
                   for name in names]
        if storage.is_remote(path):  # written locally, then copied up through gcsfs (see `read`)
            with tempfile.TemporaryDirectory(prefix="gptsan-tf-") as local:
                tf.raw_ops.SaveV2(prefix=os.path.join(local, PREFIX), tensor_names=names,
                                  shape_and_slices=[""] * len(names), tensors=tensors)
                fs, remote = storage.filesystem(path)
                for name in sorted(os.listdir(local)):
                    fs.put(os.path.join(local, name), posixpath.join(remote, name))
        else:
            tf.raw_ops.SaveV2(prefix=storage.join(path, PREFIX), tensor_names=names,
                              shape_and_slices=[""] * len(names), tensors=tensors)
    state = f'model_checkpoint_path: "{PREFIX}"\nall_model_checkpoint_paths: "{PREFIX}"\n'
    storage.write_text_atomic(storage.join(path, STATE_FILE), state)
