"""Training reads tfrecords from gs:// and writes checkpoints there, against a GCS emulator on loopback
(the same code path as real GCS: gcsfs for files, tensorstore for Orbax), resumes from them, and the trained
model loads back from gs:// exactly as from a local copy of the same objects."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_path
from tests.gcs_emulator import serving_this_process
from tests.train_support import (
    MINI_MODEL_PARAMS,
    MINI_TRAIN_PARAMS,
    counting_corpus,
    one_device_xla_flags,
    write_records,
)

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "gptsan-test"


@pytest.fixture
def emulator(monkeypatch):
    pytest.importorskip("gcp_storage_emulator", reason="pip install gcp-storage-emulator (the test extra)")
    with serving_this_process(BUCKET, monkeypatch) as url:
        yield url


def test_training_on_gs_paths(emulator, tmp_path):
    import fsspec

    fs = fsspec.filesystem("gs", skip_instance_cache=True, token="anon")
    for n in range(2):
        local = write_records(tmp_path / f"c{n}.tfrecord", counting_corpus(24, 16, 128, seed=n, period=8))
        fs.put(str(local), f"{BUCKET}/corpus/lm_{n:04d}.tfrecord")
    parameters = {"train_params": {**MINI_TRAIN_PARAMS, "output_dir": f"gs://{BUCKET}/run",
                                   "checkpoint_per_steps": 2},
                  "model_params": MINI_MODEL_PARAMS}
    fs.pipe(f"{BUCKET}/model/parameters.json", json.dumps(parameters).encode())

    env = {key: value for key, value in os.environ.items() if key != "EPATH_USE_TF"}  # the package sets it
    env.update(PYTHONPATH=str(ROOT), STORAGE_EMULATOR_HOST=emulator, TENSORSTORE_GCS_HTTP_URL=emulator,
               XLA_FLAGS=one_device_xla_flags(), NO_GCE_CHECK="true", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")

    def train(steps: int) -> None:
        result = subprocess.run(
            [sys.executable, str(ROOT / "run_training.py"), "--input_files", f"gs://{BUCKET}/corpus/lm_*.tfrecord",
             "--parameter_file", f"gs://{BUCKET}/model/parameters.json", "--max_training_step", str(steps),
             "--log_every", "1", "--no_progress"], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    train(4)
    fs.invalidate_cache()
    assert fs.exists(f"{BUCKET}/run/2/commit_success.txt") and fs.exists(f"{BUCKET}/run/4/commit_success.txt")
    assert not fs.exists(f"{BUCKET}/run/.gptsan-train.lock")  # the run's lease, released as it ended
    assert json.loads(fs.cat(f"{BUCKET}/run/parameters.json"))["model_params"] == MINI_MODEL_PARAMS

    train(6)  # resumes from gs://.../run/4
    fs.invalidate_cache()
    steps = [json.loads(line)["step"] for line in fs.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert fs.exists(f"{BUCKET}/run/6/commit_success.txt")
    assert fs.ls(f"{BUCKET}/run/tb")  # TensorBoard events copied up

    from gptsan.checkpoint import load_flat

    config, params = load_flat(f"gs://{BUCKET}/run")  # the newest checkpoint: step 6
    fs.get(f"{BUCKET}/run/", str(tmp_path / "run"), recursive=True)
    local_config, local_params = load_flat(str(tmp_path / "run"))
    assert config == local_config and config.num_layers == MINI_MODEL_PARAMS["num_switch_layers"] + \
        MINI_MODEL_PARAMS["num_ext_layers"]
    assert sorted(params) == sorted(local_params)
    for name, value in params.items():
        np.testing.assert_array_equal(value, local_params[name], err_msg=name)


def test_tokenizers_and_vocabulary_size_read_from_gs(emulator, tmp_path):
    """A GPTSAN vocabulary (its emoji.json found beside it) and a SentencePiece model on gs:// encode as their
    local copies do, and training's `--vocabulary` counts them alike; a SentencePiece model trains from gs://."""
    import fsspec

    from gptsan.tokenizer import load_tokenizer, vocabulary_size
    from gptsan.tokenizer.sentencepiece import train_sentencepiece
    from tests.conftest import shared_path

    fs = fsspec.filesystem("gs", skip_instance_cache=True, token="anon")
    vocabulary = shared_path("vocab", "ja-swe36k.txt")
    fs.put(str(vocabulary), f"{BUCKET}/tok/ja-swe36k.txt")
    fs.put(str(shared_path("vocab", "emoji.json")), f"{BUCKET}/tok/emoji.json")
    (tmp_path / "corpus.txt").write_text("\n".join(f"今日は{k % 28 + 1}日、天気は晴れです。" for k in range(200)),
                                         encoding="utf-8")
    fs.put(str(tmp_path / "corpus.txt"), f"{BUCKET}/tok/corpus.txt")  # the tokenizer trainer reads gs:// too
    sentencepiece_model = train_sentencepiece([f"gs://{BUCKET}/tok/corpus.txt"], str(tmp_path / "sp"), vocab_size=400)
    fs.put(sentencepiece_model, f"{BUCKET}/tok/sp.model")

    text = "今日は晴れ😀、電話は03-1234-5678です。"
    for kind, local, remote in [("swe", str(vocabulary), f"gs://{BUCKET}/tok/ja-swe36k.txt"),
                                ("sentencepiece", sentencepiece_model, f"gs://{BUCKET}/tok/sp.model")]:
        local_ids = load_tokenizer(kind, local, clean_text=True).encode(text)
        assert load_tokenizer(kind, remote, clean_text=True).encode(text) == local_ids, kind
        assert vocabulary_size(remote) == vocabulary_size(local), kind
    pieces = (tmp_path / "sp.vocab").read_text(encoding="utf-8").splitlines()  # the trainer's piece list
    assert vocabulary_size(str(vocabulary)) == 36000 and vocabulary_size(sentencepiece_model) == len(pieces)


def test_original_tf_checkpoints_read_and_written_on_gs(emulator, tmp_path):
    """TF checkpoints on gs:// go through gcsfs like every other file (TensorFlow's own GCS client has a fixed
    endpoint): the fixture's TF checkpoint read from gs:// equals the local read, and an export to gs:// in the
    original format reads back equal."""
    import fsspec

    from gptsan.checkpoint import load_flat
    from gptsan.convert.export import export
    from tests.conftest import shared_path

    fs = fsspec.filesystem("gs", skip_instance_cache=True, token="anon")
    source = shared_path("fixtures", "gptsan_tiny", "gptsan_tf")
    for item in source.iterdir():
        fs.put(str(item), f"{BUCKET}/tf/{item.name}")
    local_config, local = load_flat(str(source))
    config, remote = load_flat(f"gs://{BUCKET}/tf")
    assert config == local_config and sorted(remote) == sorted(local)
    for name, value in local.items():
        np.testing.assert_array_equal(remote[name], value, err_msg=name)

    parameters = json.loads((source / "parameters.json").read_text())  # one written by hand: no num_vocabulary
    parameters["model_params"].pop("num_vocabulary")
    fs.pipe(f"{BUCKET}/tf/parameters.json", json.dumps(parameters).encode())
    assert load_flat(f"gs://{BUCKET}/tf")[0] == local_config  # from model/wte in the index

    export(f"gs://{BUCKET}/tf", "gptsan-tf", f"gs://{BUCKET}/exported")
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/exported")) == [
        "checkpoint", "model.data-00000-of-00001", "model.index", "parameters.json"]
    _, again = load_flat(f"gs://{BUCKET}/exported")
    for name, value in local.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


@pytest.mark.parametrize("given, missing", [("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"),
                                            ("TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST")])
def test_an_emulator_given_to_gcsfs_or_tensorstore_alone_is_one_error_before_training(tmp_path, monkeypatch, given,
                                                                                      missing):
    """docs/gcs.md's emulator needs both variables. With one of them, files went to the emulator and checkpoints
    to real GCS (or the other way round): offline, the first save retried for minutes and ended in pages of
    tracebacks, the steps trained lost. Now one error line, before anything is read or written."""
    from gptsan.errors import UserError
    from gptsan.train.config import RunConfig
    from gptsan.train.loop import run
    from tests.train_support import write_mini_parameters

    monkeypatch.setenv(given, "http://127.0.0.1:9")  # nothing listens there: the error must come first
    monkeypatch.delenv(missing, raising=False)
    parameter_file = write_mini_parameters(tmp_path / "model", f"gs://{BUCKET}/run")
    with pytest.raises(UserError) as caught:
        run(RunConfig(parameter_file=str(parameter_file), input_files=str(tmp_path / "none-*.tfrecord"),
                      progress=False))
    assert str(caught.value) == (
        f"train_params.output_dir gs://{BUCKET}/run: {given} is set but {missing} is not, so gcsfs and tensorstore "
        f"(Orbax) would reach different servers; set {missing} to the same URL for an emulator, or unset {given} "
        "for real GCS (docs/gcs.md)")
    with pytest.raises(UserError, match=rf"^--parameter_file gs://{BUCKET}/model/parameters.json: {given} is set"):
        run(RunConfig(parameter_file=f"gs://{BUCKET}/model/parameters.json", input_files="x", progress=False))


def test_a_bucket_that_does_not_exist_or_may_not_be_listed_is_one_error(emulator, monkeypatch):
    """A glob in a bucket that does not exist (a typo) matches no file, as one in an empty folder does; one that
    may not be listed (403) is one error naming the glob. gcsfs raises both without a file name, so they ended
    training's start with a traceback."""
    import gcsfs

    from gptsan import storage
    from gptsan.data.pipeline import process_share
    from gptsan.errors import UserError

    with pytest.raises(UserError, match=r"^gs://no-such-bucket/lm_\*\.tfrecord: no tfrecord file matches$"):
        process_share("gs://no-such-bucket/lm_*.tfrecord", 16)

    def forbidden(path, **kwargs):  # gcsfs's answer to a 403
        raise OSError(f"Forbidden: {path}\nanonymous caller does not have storage.objects.list access")

    fs, _ = storage.filesystem(f"gs://{BUCKET}/corpus")  # the cached instance gptsan's calls get
    assert isinstance(fs, gcsfs.GCSFileSystem)
    monkeypatch.setattr(fs, "glob", forbidden)
    with pytest.raises(UserError) as caught:
        process_share(f"gs://{BUCKET}/corpus/lm_*.tfrecord", 16)
    assert str(caught.value) == (f"gs://{BUCKET}/corpus/lm_*.tfrecord: cannot list the files it names (Forbidden: "
                                 f"{BUCKET}/corpus/lm_*.tfrecord)")


def test_a_gs_output_dir_takes_one_training_run_at_a_time(emulator, monkeypatch, capsys):
    """GCS has no lock that ends with its holder: a run renews a lease in output_dir, a second run that sees it
    renewed is refused, and a lease left by a run that is gone (killed, its VM lost) is taken over once it has
    not been renewed for STALE_SECONDS (a gs:// output_dir was not locked at all)."""
    import socket

    from gptsan import storage
    from gptsan.train import output_lock

    monkeypatch.setattr(output_lock, "RENEW_SECONDS", 0.5)
    monkeypatch.setattr(output_lock, "STALE_SECONDS", 3.0)
    out = f"gs://{BUCKET}/leased"
    lock = f"{out}/.gptsan-train.lock"
    holder = rf"process {os.getpid()} on {re.escape(socket.gethostname())}, started [^)]+"
    with output_lock.output_dir_lock(out) as problem:
        assert problem is None
        taken = storage.read_text(lock)
        assert re.fullmatch(holder + r"\nlease [0-9a-f]{32}, renewal 0\n", taken)
        with output_lock.output_dir_lock(out) as second:  # another run, while this one holds the lease
            assert re.fullmatch(rf"train_params\.output_dir {out}: another training run is writing there "
                                rf"\({holder}\); wait for it to end or stop it, or give another output_dir", second)
        assert storage.read_text(lock) != taken  # renewed
    assert output_lock.read_lease(lock) is None  # released
    capsys.readouterr()

    gone = "process 1 on a-lost-vm, started 2026-12-01 00:00:00 UTC"
    storage.write_text_atomic(lock, gone + "\nlease 0, renewal 7\n")
    with output_lock.output_dir_lock(out) as problem:
        assert problem is None
        assert re.fullmatch(holder + r"\nlease [0-9a-f]{32}, renewal \d+\n", storage.read_text(lock))
    assert output_lock.read_lease(lock) is None
    assert capsys.readouterr().err.splitlines() == [
        f"train_params.output_dir {out}: another training run's lock is there ({gone}); watching it for up to 3 s "
        "to see whether that run is still writing",
        f"warning: train_params.output_dir {out}: the lock of a run that is gone ({gone}) was not renewed for 3 s; "
        "taking it over"]


@pytest.mark.parametrize("given, missing", [("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"),
                                            ("TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST")])
def test_a_model_read_or_written_with_one_emulator_variable_is_one_error(tmp_path, monkeypatch, given, missing):
    """Training said so; gptsan-convert, -generate, -logits and -export hung without a word (and a Ctrl-C was
    ignored), leaving a partial --output on the bucket."""
    from gptsan.checkpoint import native
    from gptsan.convert.cli import main as convert
    from gptsan.errors import UserError
    from gptsan.model import load_config

    monkeypatch.setenv(given, "http://127.0.0.1:9")
    monkeypatch.delenv(missing, raising=False)
    config = load_config(shared_path("fixtures", "gptsan_tiny", "gptsan_tf", "parameters.json"))
    with pytest.raises(UserError, match=rf"^gs://{BUCKET}/m: {given} is set but {missing} is not"):
        native.read_params(f"gs://{BUCKET}/m", config)
    tf = str(shared_path("fixtures", "gptsan_tiny", "gptsan_tf"))
    with pytest.raises(UserError, match=rf"^--output gs://{BUCKET}/out: {given} is set but {missing} is not"):
        convert.__wrapped__(["--checkpoint", tf, "--output", f"gs://{BUCKET}/out"])


@pytest.mark.parametrize("mark", ["#", "?"])
def test_a_gs_model_folder_with_a_fragment_or_query_mark_is_refused(mark):
    """tensorstore took `gs://b/q2/a#b` as `gs://b/q2/a`: two such models shared their arrays, and one read the
    other's weights with no error."""
    from gptsan import storage
    from gptsan.errors import UserError

    with pytest.raises(UserError) as caught:
        storage.check_orbax_folder(f"gs://{BUCKET}/q2/a{mark}b", "--output")
    assert str(caught.value) == (f"--output gs://{BUCKET}/q2/a{mark}b: a gs:// path with '{mark}' is not supported "
                                 "(tensorstore, which Orbax reads and writes through, takes it as the end of the "
                                 "object name); give one without '#' or '?'")
    storage.check_orbax_folder(f"/tmp/q2/a{mark}b", "--output")  # a local one is taken as it is


def test_outputs_in_a_bucket_that_does_not_exist_are_refused_before_the_work(emulator, tmp_path):
    """gptsan-encode encoded everything, then ended in a traceback naming an upload URL; gptsan-export's line was
    that URL."""
    from gptsan.convert.export import main as export
    from gptsan.data.encode import main as encode

    (tmp_path / "a.txt").write_text("猫です。\n", encoding="utf-8")
    vocabulary = str(shared_path("vocab", "ja-swe36k.txt"))
    with pytest.raises(Exception) as caught:
        encode.__wrapped__(["--input_files", str(tmp_path / "a.txt"), "--vocabulary", vocabulary, "--output_dir",
                            "gs://no-such-bucket/data", "--quiet"])
    assert str(caught.value) == "--output_dir gs://no-such-bucket/data: bucket no-such-bucket does not exist"
    model = str(shared_path("fixtures", "gptsan_tiny", "gptsan_tf"))
    with pytest.raises(Exception) as caught:
        export.__wrapped__(["--model", model, "--format", "hf", "--output", "gs://no-such-bucket/hf"])
    assert str(caught.value) == "--output gs://no-such-bucket/hf: bucket no-such-bucket does not exist"


def test_a_gs_folder_read_as_a_file_is_named_a_folder(emulator, tmp_path, capsys):
    """gcsfs opens a prefix as an empty file: a folder given as the vocabulary was "empty", as --parameter_file
    "not valid JSON", as --input_file "no lines"; a local folder is "is a folder; expected a file"."""
    from gptsan import storage
    from gptsan.tokenize_cli import main as tokenize

    storage.write_text_atomic(f"gs://{BUCKET}/vocab/ja-swe36k.txt", "あ\n")
    for read in (storage.read_text, storage.read_bytes):
        with pytest.raises(IsADirectoryError) as caught:
            read(f"gs://{BUCKET}/vocab")
        assert caught.value.filename == f"gs://{BUCKET}/vocab"
    assert tokenize(["--vocabulary", f"gs://{BUCKET}/vocab", "--text", "x"]) == 2
    assert capsys.readouterr().err == f"error: gs://{BUCKET}/vocab: is a folder; expected a file\n"
    storage.write_text_atomic(f"gs://{BUCKET}/empty.txt", "")
    assert storage.read_text(f"gs://{BUCKET}/empty.txt") == ""  # an empty file is no folder
