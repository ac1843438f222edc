"""gs:// failures and noise, against a GCS emulator on loopback: a checkpoint save that fails on gs:// (the bucket
deleted during the run) is one error line, and gs:// access through an emulator never asks the GCE metadata
server for credentials."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.gcs_emulator import serving_this_process

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "gptsan-robust"


@pytest.fixture
def emulator(monkeypatch):
    pytest.importorskip("gcp_storage_emulator", reason="pip install gcp-storage-emulator (the test extra)")
    with serving_this_process(BUCKET, monkeypatch) as url:
        yield url


DELETED_BUCKET_RUN = f"""
import json, logging, os
import fsspec
import numpy as np
from gptsan import storage
from gptsan.errors import UserError
from gptsan.train.checkpoint import Checkpointer

logged = []
class Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.ERROR:
            logged.append(record.getMessage())
logging.getLogger().addHandler(Collect())
logging.getLogger().setLevel(logging.INFO)

output_dir = "gs://{BUCKET}/run"
checkpointer = Checkpointer(output_dir, max_to_keep=3, every_steps=1, every_hours=0)  # async, as training's
state = {{"w": np.arange(4, dtype=np.float32)}}
checkpointer.save(1, state, {{"step": 1}})
checkpointer.manager.wait_until_finished()
fsspec.filesystem("gs", skip_instance_cache=True, token="anon").rm("{BUCKET}", recursive=True)
try:
    checkpointer.save(2, state, {{"step": 2}})
    checkpointer.close()
    save_error = None
except UserError as err:
    save_error = str(err)
try:
    storage.write_text_atomic(output_dir + "/metrics.jsonl", "{{}}\\n")
    metrics_error = None
except OSError as err:
    metrics_error = [err.filename, err.strerror]
print(json.dumps({{"save": save_error, "logged": logged, "metrics": metrics_error}}), flush=True)
os._exit(0)  # as the tool does after this error: the abandoned save's writes retry for minutes
"""


def test_a_checkpoint_save_on_a_deleted_bucket_is_one_error(emulator):
    """The bucket deleted during a run: Orbax's async save failed in its background threads, which logged pages
    of tracebacks, then raised a FileNotFoundError that named only an upload URL (a traceback). Now the save is one
    UserError naming output_dir, the step and the missing bucket, with Orbax's and gcsfs's error logs held back;
    the metrics file written beside it is one named error too. (In a process of its own: the abandoned save's
    threads go on retrying, and their late error logs reached the next test's checkpointer.)"""
    import json

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", DELETED_BUCKET_RUN], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    output_dir = f"gs://{BUCKET}/run"
    assert result["save"] == (f"{output_dir}: saving the step-2 checkpoint failed: bucket {BUCKET} does not "
                              "exist (deleted?); the last checkpoint saved is step 1")
    assert result["logged"] == []
    assert result["metrics"] == [f"{output_dir}/metrics.jsonl", f"bucket {BUCKET} does not exist (deleted?)"]


def test_an_error_while_a_save_is_in_flight_abandons_it(tmp_path):
    """With the bucket deleted mid-run, the metrics file's write failed before the checkpoint save did: its error
    line came, then the process waited 240 s and more (until killed) for Orbax's save thread, which retried its
    writes. An error that ends the run while a save is in flight now abandons it, with the same line; once no
    save is in flight, errors pass unchanged."""
    import errno

    from gptsan.errors import AbandonsBackgroundWork, UserError
    from gptsan.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(tmp_path / "run"), max_to_keep=3, every_steps=1, every_hours=0)
    metrics_failed = OSError(errno.ENOENT, f"bucket {BUCKET} does not exist (deleted?)", f"gs://{BUCKET}/run/m.jsonl")
    checkpointer.save(1, {"w": np.arange(4, dtype=np.float32)}, {"step": 1})  # async: in flight
    for raised, line in [(metrics_failed, f"gs://{BUCKET}/run/m.jsonl: bucket {BUCKET} does not exist (deleted?)"),
                         (UserError("a data error"), "a data error")]:
        with pytest.raises(AbandonsBackgroundWork) as caught, checkpointer.errors_abandon_the_save_in_flight():
            raise raised
        assert str(caught.value) == line
    checkpointer.close()
    for raised in (metrics_failed, UserError("a data error"), OSError("no path")):
        with pytest.raises(type(raised)) as caught, checkpointer.errors_abandon_the_save_in_flight():
            raise raised
        assert caught.value is raised


def test_no_metadata_server_probe_against_an_emulator(emulator):
    """With STORAGE_EMULATOR_HOST set, gcsfs filesystems (gptsan's, and those Orbax makes through etils epath) use
    anonymous credentials: gcsfs asked google.auth for default credentials, which probed the GCE metadata server and
    logged "Authentication failed using Compute Engine authentication due to unavailable metadata server." (or,
    with NO_GCE_CHECK unset off GCE, "Compute Engine Metadata server unavailable ..." after timeouts) in every tool
    whose logging was set up (Orbax's, training's)."""
    import fsspec

    fsspec.filesystem("gs", skip_instance_cache=True, token="anon").pipe(f"{BUCKET}/hello.txt", b"hello")
    command = ("import logging; logging.basicConfig()\n"  # as the tools' logging is set up (absl, Orbax)
               "from gptsan import storage\n"
               "from etils import epath\n"
               f"print(storage.read_text('gs://{BUCKET}/hello.txt'))\n"
               f"print(epath.Path('gs://{BUCKET}/hello.txt').read_text())\n")  # Orbax's path class
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["hello", "hello"]
    assert "metadata server" not in result.stderr.lower(), result.stderr


def test_a_remote_read_error_without_a_file_name_gets_the_path_and_what_failed():
    """gcsfs raised a server out of reach as aiohttp's ClientConnectorError, an OSError naming no file: reading a
    gs:// vocabulary, ids or model ended in a 106-line traceback after a minute of retries. Within
    `remote_errors_named` it names the path and says what failed, which the tools print in one line."""
    from gptsan import storage

    with pytest.raises(OSError) as caught, storage.remote_errors_named(f"gs://{BUCKET}/v.txt"):
        raise OSError("Cannot connect to host 127.0.0.1:9 ssl:default [Connect call failed ('127.0.0.1', 9)]")
    assert caught.value.filename == f"gs://{BUCKET}/v.txt"
    assert caught.value.strerror == ("cannot reach the storage server (Cannot connect to host 127.0.0.1:9 "
                                     "ssl:default [Connect call failed ('127.0.0.1', 9)])")
    for kept in (FileNotFoundError(f"{BUCKET}/v.txt"), OSError(2, "No such file", "/local/v.txt")):
        with pytest.raises(OSError) as caught, storage.remote_errors_named(f"gs://{BUCKET}/v.txt"):
            raise kept
        assert caught.value is kept  # a missing file is the caller's to name; a named one is named already
    with pytest.raises(OSError) as caught, storage.remote_errors_named("/local/v.txt"):
        raise OSError(28, "No space left on device")
    assert caught.value.filename is None  # local: left as it is


def test_gcsfs_notice_of_an_unknown_bucket_layout_is_not_shown():
    """gcsfs logged "Could not determine bucket type ..., falling back to GCSFileSystem" (after 60 s) before the
    error line when the server was out of reach; it works on as before, so the notice is not for the user."""
    import logging

    import gptsan.storage  # noqa: F401 - installs the filter on gcsfs's logger

    shown = []

    class Collect(logging.Handler):
        def emit(self, record):
            shown.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("gcsfs")
    logger.addHandler(handler)
    try:
        logger.warning("Could not determine bucket type for bucket name b: Timeout of 60.0s exceeded, last "
                       "exception: 503 failed to connect, falling back to GCSFileSystem")
        logger.warning("another gcsfs warning")
    finally:
        logger.removeHandler(handler)
    assert shown == ["another gcsfs warning"]


@pytest.mark.slow
def test_a_gs_vocabulary_on_a_server_out_of_reach_is_one_error_line():
    """End to end (about 35-90 s of gcsfs's retries and its bucket-layout probe): one line, exit 2."""
    env = {**os.environ, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9", "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "gptsan.tokenize_cli", "--vocabulary", f"gs://{BUCKET}/v.txt",
                             "--text", "a"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == (f"error: gs://{BUCKET}/v.txt: cannot reach the storage server (Cannot connect to host "
                             "127.0.0.1:9 ssl:default [Connect call failed ('127.0.0.1', 9)])\n")
