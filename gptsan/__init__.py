"""gptsan: the GPTSAN Switch-Transformer suite on JAX.

gs:// paths go through one code path for real GCS and a local emulator (docs/gcs.md): fsspec/gcsfs for
files (honours STORAGE_EMULATOR_HOST) and Orbax/tensorstore for checkpoints (honours
TENSORSTORE_GCS_HTTP_URL). Orbax names paths with etils' epath, which would use TensorFlow's gs:// client
(fixed endpoint, no emulator) whenever TensorFlow is installed; EPATH_USE_TF=false, set here before any
Orbax use unless the user chose otherwise, makes it use gcsfs instead.
"""

import os

os.environ.setdefault("EPATH_USE_TF", "false")

# JAX sets TF_CPP_MIN_LOG_LEVEL to 1 when it loads, which would open TensorFlow's C++ warnings too (a failed save
# printed two lines before gptsan's one): gptsan.tf_runtime needs the user's own setting, read here, before that.
USER_TF_CPP_MIN_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")

__version__ = "0.1.0"
