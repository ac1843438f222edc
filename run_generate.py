#!/usr/bin/env python3
"""The original command line: run_generate.py --model DIR --context TEXT [--top_k 120] [--beam_width N] ...

A thin wrapper over `gptsan.generate.cli` (also installed as the `gptsan-generate` console script); it runs
from any directory.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptsan.generate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
