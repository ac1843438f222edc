"""gptsan-demo entry point (the full pipeline arrives with issue 7)."""


def main(argv=None) -> int:
    print("demo: not yet - the end-to-end demo arrives with issue 7; run `make test` meanwhile.")
    return 0
