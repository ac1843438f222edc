"""TensorFlow, imported lazily where it is the tool (tf.data, tfrecords, original TF checkpoints) and quietly:
its C++ start-up lines (the oneDNN notice, absl's pre-init warning, CPU feature notes) would share stderr
with gptsan's own one-line errors and progress. A user's own TF_CPP_MIN_LOG_LEVEL / TF_ENABLE_ONEDNN_OPTS
settings win."""

from __future__ import annotations

import os


def tensorflow():
    """The `tensorflow` module, imported with its C++ logging off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice ignores the level above
    import tensorflow as tf

    return tf
