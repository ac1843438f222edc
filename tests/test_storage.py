"""storage: gs:// bucket names GCS would refuse are a user error before any request is made; output files are
checked before any work and written whole."""

import errno
import os
import re
import stat
import threading

import pytest

from gptsan import storage
from gptsan.errors import UserError


@pytest.mark.parametrize("path", ["gs://gptsan-test/run", "gs://abc", "gs://my_bucket.example.com/x/y",
                                  "gs://" + "a" * 63 + "/x", "/local/path", "relative/path"])
def test_valid_names_pass(path):
    assert storage.checked(path) == path


@pytest.mark.parametrize("bucket", ["b", "ab", "Bucket", "-abc", "abc-", "a b", "", "a" * 64,
                                    ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 31])])
def test_invalid_bucket_names_are_one_user_error(bucket):
    with pytest.raises(UserError, match=f"gs://{bucket}/run: '{bucket}' is not a GCS bucket name"):
        storage.checked(f"gs://{bucket}/run")
    with pytest.raises(UserError):
        storage.exists(f"gs://{bucket}/run")  # every storage call goes through the check


def test_an_output_file_is_checked_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match=re.escape(f"--output {tmp_path}: is a folder; give a file name")):
        storage.check_output_file(str(tmp_path), "--output")
    under_a_file = tmp_path / "a_file" / "deeper" / "out.jsonl"
    message = f"--output {under_a_file}: {tmp_path / 'a_file'} is a file, not a folder"
    with pytest.raises(UserError, match=re.escape(message)):
        storage.check_output_file(str(under_a_file), "--output")
    storage.check_output_file(str(tmp_path / "new" / "folders" / "out.jsonl"), "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # the check makes nothing


def test_an_atomic_write_makes_missing_folders_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "new" / "folders" / "out.npy"
    storage.write_bytes_atomic(str(target), b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["out.npy"]
    storage.write_text_atomic(str(target), "日本語\n")
    assert target.read_text(encoding="utf-8") == "日本語\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.npy"]


def test_an_atomic_write_through_a_link_replaces_the_file_it_points_to(tmp_path):
    """The rename used to replace the link itself with a regular file, leaving the linked file as it was."""
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "out.jsonl"
    target.write_text("old\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target)
    storage.write_text_atomic(str(link), "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["out.jsonl"]


def test_what_is_not_a_regular_file_is_written_to_not_replaced(tmp_path):
    """--output /dev/stdout, a pipe or a device: a temp file renamed over it replaced the device node itself
    (as root, --output /dev/full left an 80-byte regular file in /dev). Here a named pipe stands in."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    storage.write_bytes_atomic(str(pipe), b"through the pipe")
    reader.join(timeout=30)
    assert received == [b"through the pipe"]
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_refused_write_names_the_file_asked_for_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """The error used to name the temp file (`/proc/x.jsonl.tmp-5c16ee85: No such file or directory`)."""
    target = tmp_path / "out.jsonl"

    def refuse(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", refuse)
    with pytest.raises(OSError) as raised:
        storage.write_text_atomic(str(target), "x\n")
    assert (raised.value.filename, raised.value.strerror) == (str(target), "No space left on device")
    assert list(tmp_path.iterdir()) == []

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        storage.write_text_atomic(str(target), "x\n")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_takes_away_the_folders_it_made_and_only_those(tmp_path, monkeypatch):
    """A write that failed (a full disk) left behind the missing folders it had made for the file."""
    (tmp_path / "kept").mkdir()

    def refuse(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", refuse)
    for target in (tmp_path / "a" / "b" / "out.npy", tmp_path / "kept" / "new" / "out.npy"):
        with pytest.raises(OSError):
            storage.write_bytes_atomic(str(target), b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []
