"""TensorFlow, imported lazily where it is the tool (tf.data, tfrecords, original TF checkpoints) and quietly:
its C++ start-up lines (the oneDNN notice, absl's pre-init warning, CPU feature notes) and its Python logger's
lines (`ERROR:tensorflow:...`, `WARNING:tensorflow:...`) would share stderr with gptsan's own one-line errors
and progress. A user's own TF_CPP_MIN_LOG_LEVEL / TF_ENABLE_ONEDNN_OPTS settings win; the Python logger
follows TF_CPP_MIN_LOG_LEVEL."""

from __future__ import annotations

import functools
import logging
import os

PYTHON_LOG_LEVELS = {"0": logging.INFO, "1": logging.WARNING, "2": logging.ERROR}  # else (3): fatal only


@functools.cache
def tensorflow():
    """The `tensorflow` module, imported with its C++ logging off and its Python logger at the same level."""
    from gptsan import USER_TF_CPP_MIN_LOG_LEVEL

    os.environ["TF_CPP_MIN_LOG_LEVEL"] = USER_TF_CPP_MIN_LOG_LEVEL or "3"  # not JAX's 1 (gptsan/__init__.py)
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice ignores the level above
    import tensorflow as tf

    tf.get_logger().setLevel(PYTHON_LOG_LEVELS.get(os.environ["TF_CPP_MIN_LOG_LEVEL"], logging.CRITICAL))
    return tf
