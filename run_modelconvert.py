#!/usr/bin/env python3
"""The original command line: run_modelconvert.py --checkpoint SRC --output DST --add_extra_stage N.

A thin wrapper over `gptsan.convert.cli` (also installed as the `gptsan-convert` console script); it runs
from any directory.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptsan.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
