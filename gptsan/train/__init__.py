"""Training: a pure jitted step over an explicit state, Orbax checkpoints, one straight loop (`run`).

gs:// I/O goes through one path for real GCS and a local emulator: tfrecords and JSON through fsspec/gcsfs
(honours STORAGE_EMULATOR_HOST), Orbax checkpoints through tensorstore (honours TENSORSTORE_GCS_HTTP_URL)
with etils' paths on gcsfs rather than TensorFlow's fixed-endpoint GCS client (EPATH_USE_TF=false, set
here unless the user chose otherwise, before Orbax is first used).
"""

import os

os.environ.setdefault("EPATH_USE_TF", "false")
