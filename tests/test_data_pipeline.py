"""The training reader: round trip from the encoder, TensorFlow agreement with the pure-Python writer,
length validation, corrupt-record policy, shuffling, sharding, resuming, fsspec (non-local) paths."""

import io
import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest

from gptsan import storage
from gptsan.data import pipeline
from gptsan.data.encode import EncodeConfig, TokenizerSpec, run
from gptsan.data.layout import LayoutSettings
from gptsan.data.pipeline import make_dataset, process_share
from gptsan.data.schema import frame, parse_example, read_frames, serialize_example, tf_feature_spec
from gptsan.errors import UserError
from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]

T = 32


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Hybrid records of 32 tokens from a generated corpus, dealt into four files."""
    root = tmp_path_factory.mktemp("corpus")
    for f in range(6):
        lines = [f"文書{f}の{k}行目です。猫が好き！" for k in range(25)]
        (root / f"{f}.txt").write_text("\n".join(lines), encoding="utf-8")
    config = EncodeConfig(
        input_files=str(root / "*.txt"),
        tokenizer=TokenizerSpec("swe", str(shared_path("vocab", "ja-swe36k.txt"))),
        layout=LayoutSettings(mode="hybrid", num_context=T), output_dir=str(root / "out"), num_process=1,
        seed=0, progress=False,
    )
    run(config)
    data = (root / "out" / "hybrid_0000.tfrecord").read_bytes()
    frames = list(read_frames(io.BytesIO(data), "x"))
    for part in range(4):  # split into four files for sharding tests
        (root / "out" / f"part_{part}.tfrecord").write_bytes(b"".join(frame(f) for f in frames[part::4]))
    (root / "out" / "hybrid_0000.tfrecord").unlink()
    return root / "out"


def python_records(paths):
    records = []
    for path in paths:
        with open(path, "rb") as f:
            records += [parse_example(d) for d in read_frames(f, str(path))]
    return records


def all_batches(iterator):
    return [batch for batch in iterator]


def test_round_trip_gives_the_written_arrays(corpus_dir):
    expected = python_records(sorted(corpus_dir.glob("part_*.tfrecord")))
    batches = all_batches(make_dataset(str(corpus_dir / "part_*.tfrecord"), T, 1, seed=0, shuffle=False,
                                       repeat=False))
    assert len(batches) == len(expected) > 10
    for batch, record in zip(batches, expected, strict=True):
        assert batch["x"].dtype == np.int32 and batch["x"].shape == (1, T)
        assert batch["i"].shape == (1,)
        np.testing.assert_array_equal(batch["x"][0], record["x"])
        np.testing.assert_array_equal(batch["y"][0], record["y"])
        assert batch["i"][0] == record["i"][0] and batch["num_input"][0] == record["num_input"][0]


def test_tensorflow_parses_the_pure_python_examples():
    import tensorflow as tf

    x = np.arange(T) * 1000 - 5
    data = serialize_example({"x": x, "y": -x, "i": [7], "num_input": [3]})
    parsed = tf.io.parse_single_example(data, tf_feature_spec(T))
    np.testing.assert_array_equal(parsed["x"].numpy(), x)
    np.testing.assert_array_equal(parsed["y"].numpy(), -x)
    assert parsed["i"].numpy().tolist() == [7] and parsed["num_input"].numpy().tolist() == [3]
    assert tf.train.Example.FromString(data).features.feature["y"].int64_list.value[1] == -995


def test_tensorflow_reads_the_frames(corpus_dir):
    import tensorflow as tf

    path = str(corpus_dir / "part_0.tfrecord")
    with open(path, "rb") as f:
        ours = list(read_frames(f, path))
    assert [bytes(r.numpy()) for r in tf.data.TFRecordDataset(path)] == ours


def test_a_glob_matching_only_folders_matches_no_file(corpus_dir, tmp_path):
    """A folder is no tfrecord file: it used to reach the reader and end in IsADirectoryError tracebacks."""
    (tmp_path / "records.tfrecord").mkdir()
    for pattern in (str(tmp_path), str(tmp_path / "*.tfrecord")):
        with pytest.raises(UserError, match="no tfrecord file matches"):
            make_dataset(pattern, T, 1, seed=0)


def test_a_tfrecord_name_with_brackets_is_that_file(corpus_dir, tmp_path):
    """`part[1].tfrecord` was taken as a glob: "no tfrecord file matches" (or `part1.tfrecord` instead)."""
    named = tmp_path / "part[1].tfrecord"
    named.write_bytes((corpus_dir / "part_1.tfrecord").read_bytes())
    (tmp_path / "part1.tfrecord").write_bytes((corpus_dir / "part_2.tfrecord").read_bytes())
    batches = all_batches(make_dataset(str(named), T, 1, seed=0, shuffle=False, repeat=False))
    assert [b["x"][0].tolist() for b in batches] == [r["x"].tolist() for r in python_records([named])]


def test_length_mismatch_names_the_file(corpus_dir):
    expected = r"part_0.tfrecord: record 0 has 32 tokens but the model's num_contexts is 64"
    with pytest.raises(UserError, match=expected):
        next(make_dataset(str(corpus_dir / "part_0.tfrecord"), 64, 1, seed=0, shuffle=False))


def corrupt_copy(corpus_dir, tmp_path) -> Path:
    frames = list(read_frames(open(corpus_dir / "part_0.tfrecord", "rb"), "x"))
    raw = bytearray(b"".join(frame(f) for f in frames))
    second = len(frame(frames[0]))
    raw[second + 12 + 5] ^= 0xFF  # a data byte of record 1
    path = tmp_path / "bad.tfrecord"
    path.write_bytes(bytes(raw))
    return path


def test_corrupt_record_stops_with_file_and_index(corpus_dir, tmp_path):
    path = corrupt_copy(corpus_dir, tmp_path)
    with pytest.raises(UserError, match=rf"{path}: record 1 is corrupt \(data checksum mismatch\)"):
        all_batches(make_dataset(str(path), T, 1, seed=0, shuffle=False, repeat=False))


def test_bad_records_are_the_one_error_without_tensorflow_logs(corpus_dir, tmp_path):
    """tf.data logs a generator's exception with two Python tracebacks (at warning level, whatever
    TF_CPP_MIN_LOG_LEVEL says); the reader ends its stream instead and the iterator raises the error. In a
    fresh process, as a training run meets it (JAX started first: with it TensorFlow's warnings reach stderr): a
    corrupt record, then records of the wrong length."""
    script = ("import sys, jax; jax.numpy.zeros(1).block_until_ready()\n"
              "from gptsan.data.pipeline import make_dataset; from gptsan.errors import UserError\n"
              "for pattern, size in ((sys.argv[1], 32), (sys.argv[2], 64)):\n"
              "    try:\n"
              "        list(make_dataset(pattern, num_contexts=size, batch_size=1, seed=0))\n"
              "    except UserError as err:\n"
              "        print(err)\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("TF_")}
    result = subprocess.run([sys.executable, "-c", script, str(corrupt_copy(corpus_dir, tmp_path)),
                             str(corpus_dir / "part_0.tfrecord")],
                            env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{tmp_path / 'bad.tfrecord'}: record 1 is corrupt (data checksum mismatch)",
                                          f"{corpus_dir / 'part_0.tfrecord'}: record 0 has 32 tokens but the "
                                          "model's num_contexts is 64 (encode the corpus with --num_context 64)"]
    assert result.stderr == ""


def test_token_ids_outside_the_vocabulary_name_the_record(corpus_dir):
    records = python_records([corpus_dir / "part_0.tfrecord"])
    first = int(max(np.max(records[0]["x"]), np.max(records[0]["y"])))
    largest = max(int(max(np.max(r["x"]), np.max(r["y"]))) for r in records)
    pattern = str(corpus_dir / "part_0.tfrecord")
    expected = rf"part_0.tfrecord: record 0 has token id {first} but the model's num_vocabulary is {first} "
    with pytest.raises(UserError, match=expected):
        next(make_dataset(pattern, T, 1, seed=0, shuffle=False, num_vocabulary=first))
    every = make_dataset(pattern, T, 1, seed=0, shuffle=False, repeat=False, num_vocabulary=largest + 1)
    assert len(all_batches(every)) == len(records)


@pytest.mark.parametrize("field, value, message", [
    ("i", 2**31, "has class id i = 2147483648, past what training reads (a 32-bit integer, "
                 "-2147483648..2147483647)"),
    ("num_input", 2**31, "has num_input 2147483648, outside its 32 positions"),
    ("num_input", T + 1, "has num_input 33, outside its 32 positions"),
    ("x", -5, "has input id -5: inputs are token ids (0 and up), targets token ids or -1 (no target)"),
    ("y", -7, "has target id -7: inputs are token ids (0 and up), targets token ids or -1 (no target)"),
    ("x", 2**31, "has token id 2147483648 but ids are int32 (was the corpus encoded with another vocabulary?)"),
])
def test_values_training_cannot_read_name_the_record(tmp_path, field, value, message):
    """i or num_input past int32 ended in an OverflowError traceback; a negative input id was read as an id from
    the vocabulary's end; a num_input past the record made the whole record, targets included, the prefix."""
    good = {"x": np.ones(T, np.int64), "y": np.ones(T, np.int64), "i": [3], "num_input": [1]}
    bad = dict(good)
    bad[field] = np.full(T, value, np.int64) if field in ("x", "y") else [value]
    path = tmp_path / "bad.tfrecord"
    path.write_bytes(frame(serialize_example(good)) + frame(serialize_example(bad)))
    with pytest.raises(UserError) as caught:
        all_batches(make_dataset(str(path), T, 1, seed=0, shuffle=False, repeat=False))
    assert str(caught.value) == f"{path}: record 1 {message}"


def test_corrupt_record_skipped_and_counted(corpus_dir, tmp_path):
    path = corrupt_copy(corpus_dir, tmp_path)
    total = len(python_records([corpus_dir / "part_0.tfrecord"]))
    iterator = make_dataset(str(path), T, 1, seed=0, shuffle=False, repeat=False, on_corrupt="skip")
    assert len(all_batches(iterator)) == total - 1
    assert iterator.skipped == 1


def test_shuffle_is_seeded_and_repeat_continues(corpus_dir):
    pattern = str(corpus_dir / "part_*.tfrecord")

    def take(seed):
        iterator = make_dataset(pattern, T, 4, seed=seed, shuffle_buffer=50)
        return [next(iterator)["x"] for _ in range(12)]  # about two epochs

    first, again, other = take(1), take(1), take(2)
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert any((a != b).any() for a, b in zip(first, other, strict=True))


def test_processes_read_disjoint_shards_covering_everything(corpus_dir):
    for pattern in ("part_*.tfrecord", "part_0.tfrecord"):  # by file, then by record (1 file, 2 processes)
        shards = [
            all_batches(make_dataset(str(corpus_dir / pattern), T, 1, seed=0, shuffle=False, repeat=False,
                                     process_index=k, process_count=2))
            for k in range(2)
        ]
        everything = python_records(sorted(corpus_dir.glob(pattern)))
        keys = [sorted(b["x"][0].tobytes() for b in shard) for shard in shards]
        assert not set(keys[0]) & set(keys[1])
        assert sorted(keys[0] + keys[1]) == sorted(r["x"].astype(np.int32).tobytes() for r in everything)


def test_start_step_resumes_the_same_batches(corpus_dir):
    pattern = str(corpus_dir / "part_*.tfrecord")
    fresh = make_dataset(pattern, T, 3, seed=5, shuffle_buffer=50)
    batches = [next(fresh) for _ in range(40)]
    resumed = make_dataset(pattern, T, 3, seed=5, shuffle_buffer=50, start_step=35)
    for expected in batches[35:]:
        np.testing.assert_array_equal(next(resumed)["x"], expected["x"])


@pytest.mark.parametrize("shuffle_buffer", [10_000, 7], ids=["buffer past the corpus", "small buffer"])
def test_every_record_is_read_once_an_epoch(corpus_dir, shuffle_buffer):
    """Shuffled and repeated, each epoch's worth of records holds every record once, in a new order. The
    shuffle buffer used to run over the endless stream, mixing epochs: with the default buffer, larger than
    this corpus, the first epoch's worth held some records twice and missed others."""
    files = sorted(corpus_dir.glob("part_*.tfrecord"))
    everything = sorted(r["x"].astype(np.int32).tobytes() for r in python_records(files))
    count = len(everything)
    iterator = make_dataset(str(corpus_dir / "part_*.tfrecord"), T, 1, seed=3, shuffle_buffer=shuffle_buffer)
    seen = [next(iterator)["x"][0].tobytes() for _ in range(3 * count)]
    epochs = [seen[k * count:(k + 1) * count] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == everything
    assert epochs[0] != epochs[1] != epochs[2]


def test_start_record_resumes_the_same_records_at_another_batch_size(corpus_dir):
    """A run resumed with another batch size reads on from the record the first run stopped at."""
    pattern = str(corpus_dir / "part_*.tfrecord")
    straight = make_dataset(pattern, T, 4, seed=5, shuffle_buffer=50)
    rows = np.concatenate([next(straight)["x"] for _ in range(20)])  # past the first epoch
    resumed = make_dataset(pattern, T, 3, seed=5, shuffle_buffer=50, start_record=24)
    np.testing.assert_array_equal(np.concatenate([next(resumed)["x"] for _ in range(18)]), rows[24:78])


READINGS = {"in file order": {"shuffle": False}, "buffer of 7": {"shuffle": True, "shuffle_buffer": 7},
            "buffer past the corpus": {"shuffle": True, "shuffle_buffer": 10_000}}
RESUME_STARTS = (1, 9, 36, 72, 75, 150, 221)  # the corpus has 72 records, 18 a file: within and after epochs


def stream_after(pattern, start, count, **options):
    """Records `start` to `start + count` of a fresh repeating reader's stream (all four fields), the error its
    stream ended on and the corrupt records it skipped by then."""
    source = process_share(pattern, T, seed=5, repeat=True, **options)
    records = [(x.tobytes(), y.tobytes(), int(i), int(n)) for x, y, i, n in itertools.islice(source(start), count)]
    return records, source.error and str(source.error), source.skipped


def assert_resumes_as_the_whole_stream(pattern, count=40, **options):
    """The stream resumed at each start is the whole stream's tail: same records in the same order, the same error
    (also one met before the start) and as many corrupt records skipped."""
    whole, error, skipped = stream_after(pattern, 0, max(RESUME_STARTS) + count, **options)
    for start in RESUME_STARTS:
        expected = whole[start:start + count]
        resumed = stream_after(pattern, start, count, **options)
        if len(whole) >= start + count:  # its skips are those of a whole stream read as far, to start + count
            assert resumed[0] == expected and resumed[1] is None, f"start {start}"
            assert resumed[2] == stream_after(pattern, 0, start + count, **options)[2], f"skips, start {start}"
        else:  # the whole stream ended on an error before start + count
            assert resumed == (expected, error, skipped), f"start {start}"


@pytest.mark.parametrize("reading", READINGS.values(), ids=READINGS.keys())
@pytest.mark.parametrize("process_index, process_count", [(0, 1), (0, 3), (2, 5)],
                         ids=["one process", "process 0 of 3 (by file)", "process 2 of 5 (by record)"])
def test_resuming_reads_on_as_the_whole_stream(corpus_dir, reading, process_index, process_count):
    """start_record skips without turning the passed-over records into arrays, and whole epochs without reading
    them: what it yields must still be record for record the whole stream's, across epochs, for every process
    (by record, an epoch of 72 records keeps 14 or 15 for process 2 of 5)."""
    assert_resumes_as_the_whole_stream(str(corpus_dir / "part_*.tfrecord"), process_index=process_index,
                                       process_count=process_count, **reading)


def frames_of(path) -> list[bytes]:
    with open(path, "rb") as f:
        return list(read_frames(f, str(path)))


def corpus_with_bad_records(corpus_dir, tmp_path, policy) -> str:
    """corpus_dir's four files with bad records. For "stop": part_1's record 9 fails its checksum. For "skip"
    also: part_1's record 3 fails its checksum, after its record 12 come a payload that is no Example and an
    Example without `i`, and part_3's record 12 has an unreadable length (its last six records are lost)."""
    for part in range(4):
        frames = frames_of(corpus_dir / f"part_{part}.tfrecord")
        if part == 1 and policy == "skip":
            missing_i = serialize_example({"x": np.ones(T), "y": np.ones(T), "num_input": [0]})
            frames[13:13] = [b"\xff\xff\xff", missing_i]
        framed = [bytearray(frame(data)) for data in frames]
        if part == 1:
            framed[9][12 + 5] ^= 0xFF  # a data byte
            if policy == "skip":
                framed[3][12 + 5] ^= 0xFF
        if part == 3 and policy == "skip":
            framed[12][9] ^= 0xFF  # the length's checksum
        (tmp_path / f"part_{part}.tfrecord").write_bytes(b"".join(framed))
    return str(tmp_path / "part_*.tfrecord")


@pytest.mark.parametrize("reading", READINGS.values(), ids=READINGS.keys())
@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 5)],
                         ids=["one process", "process 1 of 5 (by record)"])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_resuming_past_corrupt_records_reads_on_as_the_whole_stream(corpus_dir, tmp_path, reading, process_index,
                                                                    process_count, policy):
    """Corrupt records before and after the resume point: with on_corrupt="stop" the resumed stream ends on the
    same error (met while skipping, when the whole stream met it before the start); with "skip" the skip must
    not count a corrupt record as a record (a payload with a good checksum that is no Example, one that lacks a
    feature, the rest of a file after an unreadable length) and counts the skipped ones of every epoch."""
    pattern = corpus_with_bad_records(corpus_dir, tmp_path, policy)
    assert_resumes_as_the_whole_stream(pattern, on_corrupt=policy, process_index=process_index,
                                       process_count=process_count, **reading)
    if policy == "stop":
        assert stream_after(pattern, 221, 1, on_corrupt="stop")[1] == \
            f"{tmp_path / 'part_1.tfrecord'}: record 9 is corrupt (data checksum mismatch)"
    else:
        # epochs of 64 records and five skips; the fourth meets its first in part_1, after part_0's 18 records
        assert stream_after(pattern, 0, 3 * 64 + 18, on_corrupt="skip")[2] == 3 * 5


@pytest.mark.parametrize("reading", READINGS.values(), ids=READINGS.keys())
def test_a_resumed_stream_stops_on_a_misfit_record_where_the_whole_stream_does(corpus_dir, tmp_path, reading):
    """The skip checks a passed-over record only as far as the stream's order needs (not its length): only reads
    that the whole stream makes before its start-th record may be passed over. Those after, from the first (the
    whole stream read part_1's record 9, of 33 tokens, when about to yield record n: resuming at n), are read in
    full and stop the resumed stream where the whole one stopped."""
    for part in range(4):
        frames = frames_of(corpus_dir / f"part_{part}.tfrecord")
        if part == 1:
            frames[9] = serialize_example({"x": np.ones(T + 1), "y": np.ones(T + 1), "i": [0], "num_input": [0]})
        (tmp_path / f"part_{part}.tfrecord").write_bytes(b"".join(frame(data) for data in frames))
    pattern = str(tmp_path / "part_*.tfrecord")
    whole, error, _ = stream_after(pattern, 0, 200, **reading)
    assert error == (f"{tmp_path / 'part_1.tfrecord'}: record 9 has 33 tokens but the model's num_contexts is 32 "
                     "(encode the corpus with --num_context 32)")
    n = len(whole)
    for start in sorted({0, 1, n - 1, n} & set(range(n + 1))):
        assert stream_after(pattern, start, 200, **reading)[:2] == (whole[start:], error), f"start {start}"


def test_resuming_where_an_epoch_keeps_no_record_ends_as_the_whole_stream(corpus_dir, tmp_path):
    """One record read by two processes: process 0 keeps it in even epochs only (positions run on across epochs),
    so the whole stream yields it once and ends in the second epoch with "no records to read". Resuming after it
    must not pass over that empty epoch as a skipped one (it would go on skipping for ever). In a thread, so that
    a hang fails the test."""
    path = tmp_path / "one.tfrecord"
    path.write_bytes(frame(frames_of(corpus_dir / "part_0.tfrecord")[0]))
    whole, error, _ = stream_after(str(path), 0, 5, process_count=2)
    assert len(whole) == 1 and error == f"{path} (records 0, 2, 4, ... of them): no records to read"
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(stream_after(str(path), 1, 5, process_count=2)),
                              daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert outcome == [([], error, 0)]


def test_a_payload_that_is_no_example_is_a_corrupt_record(corpus_dir, tmp_path):
    """A frame whose checksum holds but whose payload does not parse is corrupt like one whose checksum fails: it
    raised protobuf's DecodeError, which reached the trainer as TensorFlow's UnknownError with tracebacks."""
    path = tmp_path / "odd.tfrecord"
    path.write_bytes(frame(frames_of(corpus_dir / "part_0.tfrecord")[0]) + frame(b"\xff\xff\xff"))
    with pytest.raises(UserError, match=rf"{path}: record 1 is corrupt \(Error parsing message"):
        all_batches(make_dataset(str(path), T, 1, seed=0, shuffle=False, repeat=False))
    iterator = make_dataset(str(path), T, 1, seed=0, shuffle=False, repeat=False, on_corrupt="skip")
    assert len(all_batches(iterator)) == 1 and iterator.skipped == 1


@pytest.mark.parametrize("reading", [READINGS["in file order"], READINGS["buffer of 7"]], ids=["in file order",
                                                                                              "buffer of 7"])
def test_resuming_reads_neither_the_skipped_epochs_nor_arrays_of_skipped_records(corpus_dir, monkeypatch, reading):
    """Resuming after ten epochs and five records read every record of every epoch into arrays (728 records, 41
    file openings): at 5,000 records/s a fine-tuning run's 1.6M records took 5 minutes before its first step. Now
    the first epoch is read to count its records, the next nine are not read, and only yielded records (or ones
    read after the skip) become arrays (3 and 5 openings in file order)."""
    arrays, opened = [], []
    make_arrays, open_file = pipeline.RecordSource._arrays, storage.open_file
    monkeypatch.setattr(pipeline.RecordSource, "_arrays", lambda self, *args: arrays.append(1) or make_arrays(
        self, *args))
    monkeypatch.setattr(storage, "open_file", lambda path, mode="rb": opened.append(path) or open_file(path, mode))
    pattern = str(corpus_dir / "part_*.tfrecord")
    records, error, _ = stream_after(pattern, 10 * 72 + 5, 3, **reading)
    assert len(records) == 3 and error is None
    assert len(arrays) <= 2 * 3  # with a buffer: the 3 yielded from it and the 3 read to take their places
    assert len(opened) <= 4 + 4  # epoch 0 and epoch 10


def test_reads_through_fsspec_urls(corpus_dir):
    fs = fsspec.filesystem("memory")
    for path in sorted(corpus_dir.glob("part_*.tfrecord")):
        fs.pipe(f"/corpus/{path.name}", path.read_bytes())
    local = all_batches(make_dataset(str(corpus_dir / "part_*.tfrecord"), T, 2, seed=0, shuffle=False,
                                     repeat=False))
    remote = all_batches(make_dataset("memory://corpus/part_*.tfrecord", T, 2, seed=0, shuffle=False,
                                      repeat=False))
    assert len(local) == len(remote)
    for a, b in zip(local, remote, strict=True):
        np.testing.assert_array_equal(a["y"], b["y"])


def test_bad_arguments_are_user_errors(corpus_dir):
    with pytest.raises(UserError, match="on_corrupt"):
        make_dataset(str(corpus_dir / "*.tfrecord"), T, 1, seed=0, on_corrupt="ignore")
    with pytest.raises(UserError, match="no tfrecord file matches"):
        make_dataset(str(corpus_dir / "none_*.tfrecord"), T, 1, seed=0)


@pytest.mark.parametrize("records, process_index", [(0, 0), (1, 1)], ids=["an empty file", "one record, process 1"])
def test_repeating_no_records_is_an_error_not_a_hang(corpus_dir, tmp_path, records, process_index):
    """A repeating reader whose share is empty (an empty file; one record shared by two processes) used to go
    over its files forever. Read in a thread, so that a hang fails the test instead of stopping the suite."""
    with open(corpus_dir / "part_0.tfrecord", "rb") as f:
        first = next(read_frames(f, "part_0"))
    path = tmp_path / "few.tfrecord"
    path.write_bytes(frame(first) * records)
    outcome = []

    def read():
        try:
            outcome.append(next(make_dataset(str(path), T, 1, seed=0, process_index=process_index,
                                             process_count=2 if records else 1)))
        except UserError as err:
            outcome.append(str(err))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=60)
    share = " (records 1, 3, 5, ... of them)" if records else ""
    assert outcome == [f"{path}{share}: no records to read"]


def test_reading_records_in_a_fresh_process_keeps_stderr_clean(corpus_dir):
    """TensorFlow is imported through gptsan/tf_runtime.py: its C++ start-up lines (the oneDNN notice,
    absl's pre-init warning) stay off the stderr that carries gptsan's one-line errors."""
    script = ("import sys; from gptsan.data.pipeline import make_dataset; "
              "batch = next(iter(make_dataset(sys.argv[1], num_contexts=32, batch_size=2, seed=0, shuffle=False))); "
              "print(batch['x'].shape)")
    env = {key: value for key, value in os.environ.items() if not key.startswith("TF_")}
    result = subprocess.run([sys.executable, "-c", script, str(corpus_dir / "part_*.tfrecord")],
                            env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 32)"
    assert result.stderr == ""


def test_tensorflows_python_logger_follows_its_cpp_log_level():
    """TensorFlow's Python logger (`ERROR:tensorflow:...` lines, as its checkpoint lookup printed) is as quiet as
    its C++ logging: fatal only by default; a user's own TF_CPP_MIN_LOG_LEVEL opens both."""
    script = ("from gptsan.tf_runtime import tensorflow; "
              "tensorflow().get_logger().error('an error line'); tensorflow().get_logger().critical('a fatal line')")
    env = {key: value for key, value in os.environ.items() if not key.startswith("TF_")}
    stderr = {}
    for level in (None, "2"):
        level_env = {**env, "PYTHONPATH": str(ROOT)} | ({"TF_CPP_MIN_LOG_LEVEL": level} if level else {})
        result = subprocess.run([sys.executable, "-c", script], env=level_env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        stderr[level] = result.stderr
    assert stderr[None] == "CRITICAL:tensorflow:a fatal line\n"
    logged = [line for line in stderr["2"].splitlines() if line.endswith(" line")]  # C++ start-up lines aside
    assert logged == ["ERROR:tensorflow:an error line", "CRITICAL:tensorflow:a fatal line"]
