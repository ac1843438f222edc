#!/usr/bin/env python3
"""The original command line: run_training.py --input_files GLOB --parameter_file parameters.json ...

A thin wrapper over `gptsan.train.cli` (also installed as the `gptsan-train` console script); it runs from
any directory.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptsan.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
