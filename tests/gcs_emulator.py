"""Run gcp-storage-emulator with one gap filled: media downloads carry the object's `x-goog-generation`
header, as real GCS sends it. tensorstore (Orbax's storage) reads an object's generation from that header
and makes conditional writes against it; without it every read reports generation 0 and the next
conditional write fails ("Malformed StorageGeneration"). Usage: python tests/gcs_emulator.py <emulator args>

Tests start one on loopback with `serving(bucket)` and point gcsfs and tensorstore at it with `client_env(url)`.
(The emulator ignores preconditions such as `ifGenerationMatch=0`, create-if-absent: it overwrites.)
"""

import contextlib
import socket
import subprocess
import sys
import time


def client_env(url: str) -> dict[str, str]:
    """The environment that points gptsan's clients at the emulator at `url` (docs/gcs.md)."""
    return {"STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
            "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (Orbax)
            "NO_GCE_CHECK": "true",  # no metadata-server probe for credentials (offline)
            # gcsfs's experimental bucket-type probe speaks gRPC, which the emulator does not serve.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def serving(bucket: str):
    """An in-memory emulator on a free loopback port, holding the empty `bucket`; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "start", "--host", "127.0.0.1", "--port", str(port),
                               "--in-memory", "--default-bucket", bucket, "-q"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the GCS emulator did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


@contextlib.contextmanager
def serving_this_process(bucket: str, monkeypatch):
    """`serving(bucket)` with this test process's clients pointed at it (`client_env`, set with pytest's
    monkeypatch) and fsspec's cached gcsfs listings dropped; yields the URL."""
    import fsspec

    with serving(bucket) as url:
        for name, value in client_env(url).items():
            monkeypatch.setenv(name, value)
        fsspec.filesystem("gs").invalidate_cache()
        yield url


def main(argv: list[str]) -> int:
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status.value < 300:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])

    objects.download = download_with_generation  # before server.py builds its route table from it

    from gcp_storage_emulator.__main__ import main as emulator_main

    return emulator_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
