"""gptsan-demo: the whole GPTSAN workflow on a generated sample corpus (arrives with issue 7)."""

import sys


def main(argv=None) -> int:
    print("demo: not yet - the end-to-end demo arrives with issue 7; run `make test` meanwhile.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
