"""Train a GPTSAN model (the original's command line). See `gptsan-train --help`."""

from gptsan.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
