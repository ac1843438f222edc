"""storage.checked: gs:// bucket names GCS would refuse are a user error before any request is made."""

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
