"""Training batches from tfrecords (local or gs://, read through fsspec), resumable at a batch position.

This is a small in-memory reader used until `gptsan.data.pipeline` lands; it reads every record up front
(so a bad record is reported before any step runs), shuffles per epoch with (seed, epoch), and yields the
global batch number `position` onwards. Each process keeps its own rows of every global batch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from gptsan import storage
from gptsan.errors import UserError

FEATURES = ("x", "y", "i", "num_input")


def _records(path: str) -> Iterator[bytes]:
    """Raw records of one TFRecord file: [length u64][crc u32][data][crc u32] each."""
    data = storage.read_bytes(path)
    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise UserError(f"{path}: truncated tfrecord (a record header is cut at byte {offset})")
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        start, end = offset + 12, offset + 12 + length
        if end + 4 > len(data):
            raise UserError(f"{path}: truncated tfrecord (a record is cut at byte {offset})")
        yield data[start:end]
        offset = end + 4


def _parse(record: bytes, path: str, index: int, num_contexts: int) -> dict[str, np.ndarray]:
    from tensorflow.core.example import example_pb2  # lazy: TensorFlow only for the protobuf schema

    example = example_pb2.Example()
    try:
        example.ParseFromString(record)
    except Exception:  # protobuf's DecodeError
        raise UserError(f"{path}: record {index} is not a tf.train.Example") from None
    features = example.features.feature
    row = {}
    for name, size in (("x", num_contexts), ("y", num_contexts), ("i", 1), ("num_input", 1)):
        if name not in features:
            raise UserError(f"{path}: record {index} has no feature {name!r}")
        values = np.asarray(features[name].int64_list.value, np.int64)
        if values.shape != (size,):
            raise UserError(f"{path}: record {index}: {name!r} has {values.size} values, expected {size} "
                            f"(num_contexts {num_contexts})")
        row[name] = values
    return row


def read_records(pattern: str, num_contexts: int) -> dict[str, np.ndarray]:
    """All records matched by a glob as arrays x, y [N, T] int32 and i, num_input [N] int32."""
    files = storage.glob(pattern)
    if not files:
        raise UserError(f"--input_files: no file matches {pattern}")
    rows = [_parse(record, path, n, num_contexts)
            for path in files for n, record in enumerate(_records(path))]
    if not rows:
        raise UserError(f"--input_files: {pattern} holds no records")
    return {name: np.stack([row[name] for row in rows]).reshape(len(rows), -1).astype(np.int32)
            if name in ("x", "y") else np.asarray([row[name][0] for row in rows], np.int32)
            for name in FEATURES}


def batches(records: dict[str, np.ndarray], batch_size: int, *, seed: int, position: int = 0,
            shuffle: bool = True, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Global batch `position`, `position + 1`, ... forever (epochs reshuffled with (seed, epoch)).
    Yields this process's rows of each global batch."""
    count = len(records["x"])
    per_epoch = count // batch_size
    if per_epoch == 0:
        raise UserError(f"--input_files: {count} records are fewer than one batch of {batch_size}")
    if batch_size % process_count:
        raise UserError(f"train_params.batch_size {batch_size} must divide over {process_count} processes")
    local = batch_size // process_count
    while True:
        epoch, index = divmod(position, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(count) if shuffle else np.arange(count)
        rows = order[index * batch_size:(index + 1) * batch_size]
        rows = rows[process_index * local:(process_index + 1) * local]
        yield {name: values[rows] for name, values in records.items()}
        position += 1
