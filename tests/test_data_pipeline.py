"""The training reader: round trip from the encoder, TensorFlow agreement with the pure-Python writer,
length validation, corrupt-record policy, shuffling, sharding, resuming, fsspec (non-local) paths."""

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest

from gptsan.data.encode import EncodeConfig, TokenizerSpec, run
from gptsan.data.layout import LayoutSettings
from gptsan.data.pipeline import make_dataset
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
