"""Encode text into GPTSAN tfrecords, with the original tool's flags. Same as `gptsan-encode`;
runs from any working directory. See `gptsan/data/encode.py` for the flags and the record layout."""

import os
import sys

try:
    import gptsan  # noqa: F401
except ImportError:  # run from a checkout without installing: put the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptsan.data.encode import main

if __name__ == "__main__":
    sys.exit(main())
