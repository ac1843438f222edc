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
- Resuming: `start_record=R` skips the first R records of the stream, so a run restarted from a checkpoint
  saved after R records sees exactly the records it would have seen, whatever its batch size; `start_step=N`
  skips N batches (N x batch_size records). The skip reads only what decides the order (`RecordSource._records`):
  a record read before the R-th is yielded is passed over with its checksum checked, not parsed (with
  on_corrupt="skip" it is parsed, as a corrupt record is no position, but not made into arrays); once an epoch
  has been read, later epochs that end before the R-th record are not read at all (each holds the same
  records). Reading every record in full skipped 5,000 records of 1280 tokens a second (2 cores); passing over
  skips 40,000 (13,000 with on_corrupt="skip"). What else may be wrong with a passed-over record (another
  length, ids beyond the vocabulary; with "stop" a payload that is no Example) the original run could not have
  read past, so it is told when the stream reads the record again.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from gptsan import storage
from gptsan.data.schema import CorruptRecordError, read_frames
from gptsan.errors import UserError, warn
from gptsan.tf_runtime import tensorflow

CORRUPT_POLICIES = ("stop", "skip")
RECORDS_PER_CHUNK = 256  # records handed to tf.data per call into Python (`record_chunks`)
INT32_END = 2**31


class NoRecordFiles(UserError):
    """A glob of tfrecords that matches no file (the caller knows which flag gave it)."""

CORRUPT_ERRORS = (ValueError, KeyError, IndexError, DecodeError)  # what a payload that is no record raises


@dataclass(frozen=True)
class PassedOver:
    """A record read while a resumed stream skips, kept as its payload: parsed only if it is yielded after all
    (it waited in the shuffle buffer past the skip)."""

    path: str
    index: int
    data: bytes


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

    def __call__(self, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.int32, np.int32]]:
        """The records after the first `start` (module docstring, Resuming)."""
        try:
            yield from self._records(start)
        except UserError as err:  # end the stream; BatchIterator raises it (tf.data would log it with tracebacks)
            self.error = err
        except Exception as err:  # tf.data turns generator errors into opaque OpErrors: keep the original
            self.error = err
            raise

    def _records(self, start: int):
        """The stream, less its first `start` records, read as the whole stream would be up to them: a read that
        the whole stream makes before its `start`-th record is yielded only passes the record over (`PassedOver`):
        in an epoch with K records still to skip, its first K reads, or S + K with a shuffle buffer of S (it yields
        its first record on its S + 1-th read). An epoch that ends before `start` is left unread once an epoch has
        told how many records (positions) and corrupt records each holds."""
        epoch, position = 0, 0
        epoch_size = None  # (positions, corrupt records skipped) of every epoch, known once one is read through
        buffer = self.shuffle_buffer if self.shuffle_buffer > 1 else 0

        def kept_records(order, passed_over: int):
            """The epoch's records this source keeps; the first `passed_over` of them, and the records of other
            processes read with them, as `PassedOver`."""
            nonlocal position
            taken = 0

            def passing_over() -> bool:
                return taken < passed_over

            for k in order:
                for record in self._file_records(self.files[k], passing_over):
                    if position % self.keep_every == self.keep_offset:
                        taken += 1
                        yield record
                    position += 1

        while True:  # (an epoch that keeps no record is read: the whole stream ends on it)
            if epoch_size and 0 < (epoch_records := self._kept_among(position, epoch_size[0])) <= start:
                start -= epoch_records  # the whole epoch is skipped: its positions and skips are counted, not read
                position += epoch_size[0]
                self.skipped += epoch_size[1]
                epoch += 1
                continue
            order = np.arange(len(self.files))
            if self.shuffle_files:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
            first_position, skipped_before = position, self.skipped
            records = kept_records(order, buffer + start if start else 0)
            if buffer:
                records = buffer_shuffled(records, buffer, np.random.default_rng([self.seed, epoch, 1]))
            kept = 0
            for record in records:
                kept += 1
                if start:
                    start -= 1
                    continue
                yield self._parsed(record) if isinstance(record, PassedOver) else record
            epoch_size = (position - first_position, self.skipped - skipped_before)
            epoch += 1
            if not self.repeat:
                return
            if not kept:  # repeating nothing would never yield
                raise UserError(f"{self.describe()}: no records to read")

    def _kept_among(self, first: int, count: int) -> int:
        """How many of the positions first, ..., first + count - 1 this source keeps."""
        def kept_below(end: int) -> int:
            return (end - self.keep_offset + self.keep_every - 1) // self.keep_every

        return kept_below(first + count) - kept_below(first)

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

    def _file_records(self, path: str, passing_over: Callable[[], bool]):
        """The records of one file. `passing_over()`, asked before each, says whether the skip of a resumed stream
        only passes it over: it is then checked as far as deciding that it is a record (its checksum; with
        on_corrupt="skip" also its features) and yielded as a `PassedOver`."""
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
                    if not passing_over():
                        record = self._arrays(parsed_example(data), path, index)
                    else:
                        if skip:  # a payload that is no record is no position
                            parsed_example(data)
                        record = PassedOver(path, index, data)
                except CORRUPT_ERRORS as err:
                    if not skip:
                        raise UserError(f"{path}: record {index} is corrupt ({err})") from None
                    self._note_skip(f"{path}: record {index} is corrupt ({err})")
                    continue
                yield record

    def _parsed(self, record: PassedOver):
        """A passed-over record's arrays (with on_corrupt="skip" its features were checked when it was read)."""
        try:
            return self._arrays(parsed_example(record.data), record.path, record.index)
        except CORRUPT_ERRORS as err:
            raise UserError(f"{record.path}: record {record.index} is corrupt ({err})") from None

    def _arrays(self, example, path: str, index: int):
        """The record's x, y, i and num_input as int32, each checked: a value past int32 was an OverflowError
        traceback, a negative input id was read as an id counted from the vocabulary's end, and a num_input past
        the record made all of it, targets included, the bidirectional prefix."""
        feature = example.features.feature
        x = np.array(feature["x"].int64_list.value, dtype=np.int64)
        y = np.array(feature["y"].int64_list.value, dtype=np.int64)
        where = f"{path}: record {index}"
        if len(x) != self.num_contexts or len(y) != self.num_contexts:
            raise UserError(
                f"{where} has {len(x)} tokens but the model's num_contexts is "
                f"{self.num_contexts} (encode the corpus with --num_context {self.num_contexts})"
            )
        vocabulary = self.num_vocabulary or INT32_END
        if x.max() >= vocabulary or y.max() >= vocabulary:
            known = f"the model's num_vocabulary is {self.num_vocabulary}" if self.num_vocabulary else "ids are int32"
            raise UserError(f"{where} has token id {max(x.max(), y.max())} but {known} (was the corpus encoded with "
                            "another vocabulary?)")
        if x.min() < 0 or y.min() < -1:
            raise UserError(f"{where} has {'input' if x.min() < 0 else 'target'} id {min(x.min(), y.min())}: inputs "
                            "are token ids (0 and up), targets token ids or -1 (no target)")
        i = feature["i"].int64_list.value[0]
        if not -INT32_END <= i < INT32_END:
            raise UserError(f"{where} has class id i = {i}, past what training reads (a 32-bit integer, "
                            f"{-INT32_END}..{INT32_END - 1})")
        num_input = feature["num_input"].int64_list.value[0]
        if not 0 <= num_input <= self.num_contexts:
            raise UserError(f"{where} has num_input {num_input}, outside its {self.num_contexts} positions")
        return x.astype(np.int32), y.astype(np.int32), np.int32(i), np.int32(num_input)

    def _note_skip(self, message: str) -> None:
        """Counts a skip; warns the first time only (a repeating reader meets the same record every epoch, and
        filling a shuffle buffer from a small file takes many epochs). Sources given the same `warned` set share
        it: a training run's start-up check, its reader and each evaluation warn of a record once in all."""
        self.skipped += 1
        if message not in self._warned:
            self._warned.add(message)
            warn(f"skipped {message}")


@functools.cache
def example_type():
    """tf.train.Example's class."""
    tensorflow()  # quietly, before its protos import it
    from tensorflow.core.example import example_pb2

    return example_pb2.Example


def parsed_example(data: bytes):
    """`data` as a tf.train.Example with the four features, `i` and `num_input` holding a value; raises one of
    CORRUPT_ERRORS when it is not one."""
    example = example_type().FromString(data)
    feature = example.features.feature
    missing = [name for name in ("x", "y", "i", "num_input") if name not in feature]
    if missing:
        raise ValueError(f"missing features {missing}")
    empty = [name for name in ("i", "num_input") if not feature[name].int64_list.value]
    if empty:
        raise ValueError(f"no int64 value in features {empty}")
    return example


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
        raise NoRecordFiles(f"{pattern}: no tfrecord file matches")
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
    records = source(start)
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
