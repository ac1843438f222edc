"""The tfrecord corpus format (spec section 4), written once: feature names, the `tf.train.Example`
encoding of one record, and TFRecord framing.

Writing and reading frames is pure Python (CRC32C from `google-crc32c`) so the encoder and the inspection
tool run without TensorFlow; `tf_feature_spec` is what the tf.data pipeline parses with. The tests check
that TensorFlow reads what this writes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import google_crc32c
import numpy as np

from gptsan.tf_runtime import tensorflow

FEATURES = ("x", "y", "i", "num_input")
SEQUENCE_FEATURES = ("x", "y")


@dataclass(frozen=True)
class Record:
    """One training sequence: `x`, `y` `[num_contexts]`, class id `i`, prefix length `num_input`."""

    x: np.ndarray
    y: np.ndarray
    i: int
    num_input: int

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"x": self.x, "y": self.y, "i": np.array([self.i]), "num_input": np.array([self.num_input])}


class CorruptRecordError(Exception):
    """A frame whose length or checksum does not match, or an Example that does not parse."""

    def __init__(self, path: str, index: int, reason: str):
        super().__init__(f"{path}: record {index} is corrupt ({reason})")
        self.path, self.index = path, index


# ---- tf.train.Example, int64 features only ----------------------------------------------------------


def _varints(values: np.ndarray) -> bytes:
    """Protobuf varints of int64 values (negative values as 10-byte two's complement), vectorised."""
    v = np.asarray(values, dtype=np.int64).view(np.uint64)
    shifts = np.arange(10, dtype=np.uint64) * np.uint64(7)
    groups = ((v[:, None] >> shifts[None, :]) & np.uint64(0x7F)).astype(np.uint8)  # [n, 10]
    nonzero_above = (v[:, None] >> shifts[None, :]) != 0
    lengths = np.maximum(nonzero_above.sum(axis=1), 1)  # bytes used per value
    index = np.arange(10)[None, :]
    groups[index < (lengths[:, None] - 1)] |= 0x80  # continuation bit on all but the last byte
    return groups[index < lengths[:, None]].tobytes()


def _varint(value: int) -> bytes:
    """One non-negative varint (tags and lengths), without numpy's per-call cost."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def serialize_example(features: dict[str, np.ndarray]) -> bytes:
    """`features` name → int64 values, as a serialized `tf.train.Example` (packed Int64List)."""
    entries = b""
    for name, values in features.items():
        int64_list = _length_delimited(1, _varints(np.ravel(values))) if np.size(values) else b""
        feature = _length_delimited(3, int64_list)
        entries += _length_delimited(1, _length_delimited(1, name.encode()) + _length_delimited(2, feature))
    return _length_delimited(1, entries)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, payload) of each field of one protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            yield field, wire, value
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            yield field, wire, data[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"unexpected wire type {wire}")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _int64_list(data: bytes) -> list[int]:
    values: list[int] = []
    for _, wire, payload in _fields(data):
        if wire == 0:
            values.append(_signed(payload))
        else:
            pos = 0
            while pos < len(payload):
                value, pos = _read_varint(payload, pos)
                values.append(_signed(value))
    return values


def parse_example(data: bytes) -> dict[str, np.ndarray]:
    """A serialized `tf.train.Example` with int64 features → name → int64 array. Raises ValueError."""
    parsed: dict[str, np.ndarray] = {}
    for _, _, features in _fields(data):
        for _, _, entry in _fields(features):
            name, values = "", np.zeros(0, np.int64)
            for field, _, payload in _fields(entry):
                if field == 1:
                    name = payload.decode()
                elif field == 2:
                    for kind, _, content in _fields(payload):
                        if kind != 3:
                            raise ValueError(f"feature {name!r} is not an int64 list")
                        values = np.array(_int64_list(content), dtype=np.int64)
            parsed[name] = values
    return parsed


def record_from_example(features: dict[str, np.ndarray]) -> Record:
    missing = [name for name in FEATURES if name not in features]
    if missing:
        raise ValueError(f"missing features {missing}")
    scalars = [name for name in ("i", "num_input") if len(features[name]) != 1]
    if scalars:
        raise ValueError(f"features {scalars} hold {[len(features[n]) for n in scalars]} values, expected 1")
    return Record(features["x"], features["y"], int(features["i"][0]), int(features["num_input"][0]))


# ---- TFRecord framing ---------------------------------------------------------------------------------


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord frame: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def read_frames(stream: BinaryIO, path: str, skip_bad_data: bool = False) -> Iterator[bytes | None]:
    """The payloads of a TFRecord stream, checksums verified. A frame whose length is unreadable raises
    CorruptRecordError (the rest of the stream cannot be found again); one whose data checksum is wrong
    raises too, or yields None with `skip_bad_data`."""
    index = 0
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise CorruptRecordError(path, index, "truncated header")
        (length,) = struct.unpack("<Q", header[:8])
        if struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
            raise CorruptRecordError(path, index, "length checksum mismatch")
        body = stream.read(length + 4)
        if len(body) < length + 4:
            raise CorruptRecordError(path, index, "truncated data")
        data = body[:length]
        if struct.unpack("<I", body[length:])[0] != _masked_crc(data):
            if not skip_bad_data:
                raise CorruptRecordError(path, index, "data checksum mismatch")
            data = None
        yield data
        index += 1


def tf_feature_spec(num_contexts: int) -> dict:
    """The `tf.io.parse_single_example` spec of a record of `num_contexts` tokens."""
    tf = tensorflow()

    return {
        "x": tf.io.FixedLenFeature([num_contexts], tf.int64),
        "y": tf.io.FixedLenFeature([num_contexts], tf.int64),
        "i": tf.io.FixedLenFeature([1], tf.int64),
        "num_input": tf.io.FixedLenFeature([1], tf.int64),
    }
