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
from collections.abc import Callable
from typing import Any

import numpy as np

from gptsan import storage
from gptsan.checkpoint.dtypes import FLOAT_STORAGE_DTYPES
from gptsan.checkpoint.names import is_tf_parameter
from gptsan.checkpoint.validate import check_tensors, error_summary, refuse_not_floating
from gptsan.errors import UserError, warn_once
from gptsan.tf_runtime import tensorflow

STATE_FILE = "checkpoint"
PREFIX = "model"


def is_tf_dir(path: str) -> bool:
    return storage.exists(storage.join(path, STATE_FILE)) or bool(_index_files(path))


def _index_files(path: str) -> list[str]:
    """The names of the `*.index` files in the folder `path` (listed, not globbed: `[` `]` in a folder name
    are literal)."""
    return [name for name in storage.folder_names(path, files_only=True) if name.endswith(".index")]


def _checkpoint_prefix(path: str) -> str:
    """The prefix of the checkpoint in the folder `path`: the one the `checkpoint` state file names, when its
    `.index` is there, else the folder's only `*.index`. The state file is read here rather than by TensorFlow
    (`tf.train.latest_checkpoint`), which logged a line of its own for a prefix without its index or for a
    garbled state file. Only the named path's last part counts (the original's named the folder it was trained
    in), and a state file naming nothing here matters only when it would have to choose between index files."""
    indexes = _index_files(path)
    named = _named_in_state_file(path)
    if named and f"{named}.index" in indexes:
        return storage.join(path, named)
    missing = f"the `checkpoint` file names {named}, which is not here" if named else None
    if len(indexes) != 1:
        found = f" ({', '.join(sorted(name[: -len('.index')] for name in indexes))})" if indexes else ""
        raise UserError(f"{path}: expected one TF checkpoint (`checkpoint` file or a single *.index), found "
                        f"{len(indexes)} index files{found}" + (f"; {missing}" if missing else ""))
    only = indexes[0][: -len(".index")]
    if missing:  # it read the other step without a word
        warn_once(f"{path}: {missing}; reading {only}, the folder's only checkpoint")
    return storage.join(path, only)


def _named_in_state_file(path: str) -> str | None:
    """The last part of the `model_checkpoint_path` the `checkpoint` state file names, if it names one."""
    state = storage.join(path, STATE_FILE)
    if not storage.exists(state):
        return None
    try:
        named = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', storage.read_text(state), re.M)
    except UnicodeDecodeError:
        return None
    return re.split(r"[/\\]", named.group(1))[-1] if named else None


def read(path: str, expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """GPTSAN-named float32 arrays from the TF checkpoint in `path`, checked against `expected` shapes."""
    return _with_readable_prefix(path, lambda prefix, shown: _read(prefix, expected, shown), data=True)


def variable_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Every variable's shape in the TF checkpoint in `path`, read from its index alone."""
    def shapes(prefix: str, shown: str) -> dict[str, tuple[int, ...]]:
        shape_map = _opened(prefix, shown, lambda reader: reader.get_variable_to_shape_map())
        return {name: tuple(int(n) for n in shape) for name, shape in shape_map.items()}

    return _with_readable_prefix(path, shapes, data=False)


def _with_readable_prefix(path: str, use: Callable[[str, str], Any], data: bool) -> Any:
    """`use(prefix, shown)` on the checkpoint in the folder `path`: its own prefix, or its files put in a
    temporary folder as `model.*` (the index, and the data files when `data`): on gs:// copied (through gcsfs,
    like every other gs:// file: TensorFlow's own GCS client cannot be pointed at an emulator), locally linked,
    when the prefix has characters TensorFlow would take as a file pattern (`[`, `*`, `?`)."""
    prefix = _checkpoint_prefix(path)
    if not storage.is_remote(path) and not any(ch in prefix for ch in "*?[\\"):
        return use(prefix, prefix)
    name = posixpath.basename(prefix)
    fs, folder = storage.filesystem(path)
    with tempfile.TemporaryDirectory(prefix="gptsan-tf-") as local:
        for file in storage.folder_names(path, files_only=True):
            if file == f"{name}.index" or (data and file.startswith(f"{name}.data-")):
                source, target = posixpath.join(folder, file), os.path.join(local, PREFIX + file[len(name):])
                if storage.is_remote(path):
                    fs.get(source, target)
                else:
                    os.symlink(source, target)
        return use(os.path.join(local, PREFIX), prefix)


def _opened(prefix: str, shown: str, use: Callable[[Any], Any]) -> Any:
    """`use(reader)` on TensorFlow's reader of the checkpoint `prefix`; an unreadable one is one UserError."""
    tf = tensorflow()
    try:
        return use(tf.train.load_checkpoint(prefix))
    except (tf.errors.OpError, ValueError, IndexError) as err:  # IndexError: "Read less bytes than requested"
        raise UserError(f"{shown}: not a readable TF checkpoint (truncated or corrupt?): "
                        f"{error_summary(err)}") from None


def _read(prefix: str, expected: dict[str, tuple[int, ...]], shown: str) -> dict[str, np.ndarray]:
    def arrays(reader) -> dict[str, np.ndarray]:
        shapes = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()
                  if is_tf_parameter(name)}
        check_tensors(shown, shapes, expected, "checkpoint variables")
        dtypes = reader.get_variable_to_dtype_map()
        refuse_not_floating(shown, {name: dtypes[name].name for name in shapes if not dtypes[name].is_floating},
                            FLOAT_STORAGE_DTYPES)
        return {name: np.asarray(reader.get_tensor(name), np.float32) for name in sorted(shapes)}

    return _opened(prefix, shown, arrays)


def write(path: str, flat: dict[str, Any], dtype: str = "float32") -> None:
    """Write `flat` (GPTSAN name -> array) as an original-style TF1 checkpoint into the directory `path`."""
    tf = tensorflow()
    names = sorted(flat)
    try:
        _save(path, names, [np.asarray(flat[name], np.float32) for name in names], dtype)
    except tf.errors.OpError as err:  # a full disk, say: TensorFlow's errors are not OSErrors, and name a temp file
        reason = re.sub(r"\s*\[Op:\w+\]$", "", err.message.strip().splitlines()[0]).rsplit("; ", 1)[-1]
        raise OSError(f"cannot write the TF checkpoint: {reason}") from None
    state = f'model_checkpoint_path: "{PREFIX}"\nall_model_checkpoint_paths: "{PREFIX}"\n'
    storage.write_text_atomic(storage.join(path, STATE_FILE), state)


def _save(path: str, names: list[str], arrays: list[np.ndarray], dtype: str) -> None:
    tf = tensorflow()
    with tf.device("/cpu:0"):
        tensors = [tf.constant(array, dtype=tf.dtypes.as_dtype(dtype)) for array in arrays]
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
