"""The training reader: tfrecords (local or gs://) → shuffled, repeated, batched numpy dicts.

    batches = make_dataset("gs://bucket/corpus/lm_*.tfrecord", num_contexts=1280, batch_size=16, seed=0)
    batch = next(batches)  # {"x": int32 [16, 1280], "y": int32 [16, 1280], "i": int32 [16], "num_input": ...}

- Records are read in Python (TFRecord frames through fsspec, checksums verified, Examples parsed with
  protobuf), shuffled, and handed to tf.data, which batches and prefetches. One code path serves local
  files and gs:// (gcsfs honours STORAGE_EMULATOR_HOST; TensorFlow's own GCS client does not), and every
  problem names its file and record index.
- Each record's `x`/`y` length must equal `num_contexts`, and with `num_vocabulary` its ids must be below it; a
  mismatch stops with a UserError naming the file (the corpus was encoded for another context length or with
  another vocabulary). Such errors end the record stream quietly and are raised by the batch iterator.
- Corrupt records: `on_corrupt="stop"` (default) raises UserError with the file and record index;
  `"skip"` skips them and counts them in `iterator.skipped`, with a warning the first time each is met (a frame
  whose length is unreadable loses the rest of its file, counted as one). A repeating reader with no records
  to read raises UserError.
- Order: per epoch the file list is shuffled with `(seed, epoch)`, then the epoch's records pass a shuffle
  buffer seeded with `(seed, epoch)` that is emptied at the end of the epoch, so every record is read once per
  epoch (tf.data's buffer over the endless stream mixed the epochs: the first 30 records read from a corpus of
  30 were 19 of them, some twice). Everything is deterministic for a given seed, file list and process layout.
- Processes: with at least as many files as processes, process k reads files k, k+P, ...; otherwise
  every process reads every file and keeps records k, k+P, ... of the stream.
- Resuming: `start_record=R` skips the first R records of the stream (reading through them), so a run
  restarted from a checkpoint saved after R records sees exactly the records it would have seen, whatever its
  batch size; `start_step=N` skips N batches (N x batch_size records).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from gptsan import storage
from gptsan.data.schema import CorruptRecordError, read_frames
from gptsan.errors import UserError, warn
from gptsan.tf_runtime import tensorflow

CORRUPT_POLICIES = ("stop", "skip")
RECORDS_PER_CHUNK = 256  # records handed to tf.data per call into Python (`record_chunks`)


class RecordSource:
    """A Python generator of validated records over files, which remembers the error it stopped on."""

    def __init__(self, files, num_contexts, *, seed, repeat, shuffle_files, keep_every=1, keep_offset=0,
                 on_corrupt="stop", num_vocabulary=None, warned=None, shuffle_buffer=0):
        self.files, self.num_contexts, self.seed, self.repeat = files, num_contexts, seed, repeat
        self.shuffle_buffer = shuffle_buffer
        self.num_vocabulary = num_vocabulary
        self.shuffle_files, self.keep_every, self.keep_offset = shuffle_files, keep_every, keep_offset
        self.on_corrupt, self.skipped, self.error = on_corrupt, 0, None
        self._warned: set[str] = set() if warned is None else warned

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.int32, np.int32]]:
        try:
            yield from self._records()
        except UserError as err:  # end the stream; BatchIterator raises it (tf.data would log it with tracebacks)
            self.error = err
        except Exception as err:  # tf.data turns generator errors into opaque OpErrors: keep the original
            self.error = err
            raise

    def _records(self):
        epoch, position = 0, 0

        def kept_records(order):
            nonlocal position
            for k in order:
                for record in self._file_records(self.files[k]):
                    if position % self.keep_every == self.keep_offset:
                        yield record
                    position += 1

        while True:
            order = np.arange(len(self.files))
            if self.shuffle_files:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
            records = kept_records(order)
            if self.shuffle_buffer > 1:
                records = buffer_shuffled(records, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, 1]))
            kept = 0
            for record in records:
                kept += 1
                yield record
            epoch += 1
            if not self.repeat:
                return
            if not kept:  # repeating nothing would never yield
                raise UserError(f"{self.describe()}: no records to read")

    def raise_user_error(self) -> None:
        """Raises the UserError the stream ended on, if any (its readers see only that it ended)."""
        if isinstance(self.error, UserError):
            raise UserError(str(self.error)) from None

    def describe(self) -> str:
        """The files this source reads, for messages (the first three named)."""
        named = ", ".join(self.files[:3]) + (f" and {len(self.files) - 3} more" if len(self.files) > 3 else "")
        if self.keep_every == 1:
            return named
        every, first = self.keep_every, self.keep_offset
        return f"{named} (records {first}, {first + every}, {first + 2 * every}, ... of them)"

    def _file_records(self, path: str):
        tensorflow()  # quietly, before its protos import it
        from tensorflow.core.example import example_pb2

        skip = self.on_corrupt == "skip"
        with storage.open_file(path, "rb") as stream:
            frames = read_frames(stream, path, skip_bad_data=skip)
            index = -1
            while True:
                try:
                    data = next(frames)
                except StopIteration:
                    return
                except CorruptRecordError as err:
                    if not skip:
                        raise UserError(str(err)) from None
                    self._note_skip(str(err) + "; rest of the file skipped")
                    return
                index += 1
                try:
                    if data is None:
                        raise ValueError("data checksum mismatch")
                    example = example_pb2.Example.FromString(data)
                    record = self._arrays(example, path, index)
                except (ValueError, KeyError, IndexError) as err:
                    if not skip:
                        raise UserError(f"{path}: record {index} is corrupt ({err})") from None
                    self._note_skip(f"{path}: record {index} is corrupt ({err})")
                    continue
                yield record

    def _arrays(self, example, path: str, index: int):
        feature = example.features.feature
        missing = [name for name in ("x", "y", "i", "num_input") if name not in feature]
        if missing:
            raise ValueError(f"missing features {missing}")
        x = np.array(feature["x"].int64_list.value, dtype=np.int32)
        y = np.array(feature["y"].int64_list.value, dtype=np.int32)
        if len(x) != self.num_contexts or len(y) != self.num_contexts:
            raise UserError(
                f"{path}: record {index} has {len(x)} tokens but the model's num_contexts is "
                f"{self.num_contexts} (encode the corpus with --num_context {self.num_contexts})"
            )
        if self.num_vocabulary is not None and (x.max() >= self.num_vocabulary or y.max() >= self.num_vocabulary):
            raise UserError(
                f"{path}: record {index} has token id {max(x.max(), y.max())} but the model's num_vocabulary is "
                f"{self.num_vocabulary} (was the corpus encoded with another vocabulary?)"
            )
        i = np.int32(feature["i"].int64_list.value[0])
        num_input = np.int32(feature["num_input"].int64_list.value[0])
        return x, y, i, num_input

    def _note_skip(self, message: str) -> None:
        """Counts a skip; warns the first time only (a repeating reader meets the same record every epoch, and
        filling a shuffle buffer from a small file takes many epochs). Sources given the same `warned` set share
        it: a training run's start-up check, its reader and each evaluation warn of a record once in all."""
        self.skipped += 1
        if message not in self._warned:
            self._warned.add(message)
            warn(f"skipped {message}")


def buffer_shuffled(records, size: int, rng: np.random.Generator):
    """`records` through a shuffle buffer of `size` (each new record takes the place of a random one, which is
    yielded), emptied in random order at their end: every record once."""
    buffer = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = record
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


class BatchIterator:
    """Iterates over batches as numpy dicts; `skipped` counts corrupt records passed over so far."""

    def __init__(self, dataset, source: RecordSource):
        self._iterator, self._source = iter(dataset.as_numpy_iterator()), source

    @property
    def skipped(self) -> int:
        return self._source.skipped

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        tf = tensorflow()

        try:
            batch = next(self._iterator)
        except (StopIteration, tf.errors.OpError):
            self._source.raise_user_error()
            raise
        self._source.raise_user_error()  # the reader stopped on a bad record while this batch waited in the buffers
        return batch


def make_dataset(pattern: str, num_contexts: int, batch_size: int, *, seed: int, shuffle: bool = True,
                 repeat: bool = True, process_index: int = 0, process_count: int = 1,
                 on_corrupt: str = "stop", shuffle_buffer: int = 10_000, start_step: int = 0,
                 start_record: int = 0, drop_remainder: bool = True, num_vocabulary: int | None = None,
                 warned: set[str] | None = None) -> BatchIterator:
    """Batches of `{x, y: int32 [B, T], i, num_input: int32 [B]}`; see the module docstring. With
    `num_vocabulary`, a token id outside the vocabulary stops the stream as a misshapen record does; `warned`
    holds the skip warnings already given (RecordSource._note_skip)."""
    source = process_share(pattern, num_contexts, seed=seed, shuffle=shuffle, repeat=repeat,
                           process_index=process_index, process_count=process_count, on_corrupt=on_corrupt,
                           num_vocabulary=num_vocabulary, warned=warned,
                           shuffle_buffer=shuffle_buffer if shuffle else 0)
    return BatchIterator(_tf_dataset(source, num_contexts, batch_size, start_record + start_step * batch_size,
                                     drop_remainder), source)


def process_share(pattern: str, num_contexts: int, *, seed: int = 0, shuffle: bool = False, repeat: bool = False,
                  process_index: int = 0, process_count: int = 1, on_corrupt: str = "stop",
                  num_vocabulary: int | None = None, warned: set[str] | None = None,
                  shuffle_buffer: int = 0) -> RecordSource:
    """The records of `pattern` that process `process_index` of `process_count` reads (module docstring)."""
    if on_corrupt not in CORRUPT_POLICIES:
        raise UserError(f"on_corrupt: expected one of {', '.join(CORRUPT_POLICIES)}, got {on_corrupt!r}")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index: expected 0..{process_count - 1}, got {process_index}")
    files = storage.glob(pattern)
    if not files:
        raise UserError(f"{pattern}: no tfrecord file matches")
    by_file = len(files) >= process_count
    return RecordSource(
        files[process_index::process_count] if by_file else files, num_contexts, seed=seed, repeat=repeat,
        shuffle_files=shuffle, keep_every=1 if by_file else process_count,
        keep_offset=0 if by_file else process_index, on_corrupt=on_corrupt, num_vocabulary=num_vocabulary,
        warned=warned, shuffle_buffer=shuffle_buffer,
    )


def count_records(source: RecordSource, limit: int) -> int:
    """How many records `source` yields, counting up to `limit`; a bad record among them raises UserError."""
    count = sum(1 for _ in itertools.islice(source(), limit))
    source.raise_user_error()
    return count


def record_chunks(source: RecordSource, size: int = RECORDS_PER_CHUNK, start: int = 0):
    """`source`'s records after the first `start`, stacked `size` at a time ([n, T] x, y and [n] i, num_input):
    tf.data calls back into Python once per element of a generator, about 1 ms each on a 2-vCPU host, so
    handing over 10,000 records one at a time took 12 s (1.7 s of it reading the records)."""
    records = itertools.islice(source(), start, None)
    while chunk := list(itertools.islice(records, size)):
        x, y, i, num_input = zip(*chunk, strict=True)
        yield np.stack(x), np.stack(y), np.array(i, np.int32), np.array(num_input, np.int32)


def _tf_dataset(source, num_contexts, batch_size, start_record, drop_remainder):
    tf = tensorflow()

    sequences = tf.TensorSpec([None, num_contexts], tf.int32)
    scalars = tf.TensorSpec([None], tf.int32)
    dataset = tf.data.Dataset.from_generator(lambda: record_chunks(source, start=start_record), output_signature=(
        sequences, sequences, scalars, scalars)).unbatch()
    dataset = dataset.map(lambda x, y, i, n: {"x": x, "y": y, "i": i, "num_input": n})
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)
