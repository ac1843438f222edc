#!/usr/bin/env python3
"""The original command line: run_languagemodel.py --model DIR --context "...[MASK]..." --output out.json

A thin wrapper over `gptsan.generate.languagemodel` (also installed as the `gptsan-languagemodel` console
script); it runs from any directory.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptsan.generate.languagemodel import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
