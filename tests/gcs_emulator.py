"""Run gcp-storage-emulator with one gap filled: media downloads carry the object's `x-goog-generation`
header, as real GCS sends it. tensorstore (Orbax's storage) reads an object's generation from that header
and makes conditional writes against it; without it every read reports generation 0 and the next
conditional write fails ("Malformed StorageGeneration"). Usage: python tests/gcs_emulator.py <emulator args>
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status.value < 300:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = download_with_generation  # before server.py builds its route table from it

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
