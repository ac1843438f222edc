"""storage: gs:// bucket names GCS would refuse are a user error before any request is made; output files are
checked before any work and written whole."""

import re

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
