"""Encoding speed: the SWE tokenizer alone (fast vs the straightforward algorithm) and end-to-end
tfrecord encoding with 1 and 2 processes, on a generated Japanese corpus (default 12 MB).

    python bench/encode.py --vocabulary ../shared/vocab/ja-swe36k.txt [--batch 2] [--size_mb 12]

Prints one JSON object per measurement (bench, config, batch, dtype, tokens_per_s, ...). `batch` is the
number of processes (1 for the tokenizer alone). The straightforward algorithm is timed on a slice of the
corpus (`--naive_mb`), and the fast tokenizer on the same slice, so their ratio is like for like.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.flags import default_vocabulary, positive_integer, positive_number  # noqa: E402
from gptsan.data.encode import EncodeConfig, TokenizerSpec, run  # noqa: E402
from gptsan.data.layout import LayoutSettings  # noqa: E402
from gptsan.errors import cli_main  # noqa: E402
from gptsan.tokenizer.swe import SWETokenizer  # noqa: E402
from gptsan.tokenizer.swe_reference import naive_encode  # noqa: E402

EXTRAS = [
    "😀",
    "🍣",
    "👍🏻",
    "2023年1月5日",
    "03-1234-5678",
    "1,280円",
    "https://example.jp/a",
    "GPTSAN",
    "★",
]


def generate_corpus(tokenizer: SWETokenizer, directory: str, size_mb: float, seed: int = 0) -> list[str]:
    """Files of lines made of random Japanese vocabulary pieces, punctuation and a few extras."""
    rng = np.random.default_rng(seed)
    words = [s[0] for s in tokenizer.spellings[:30000] if s[0] and not s[0].startswith("<")]
    target, written, paths = int(size_mb * 1e6), 0, []
    while written < target:
        lines = []
        for _ in range(2000):
            sentences = []
            for _ in range(rng.integers(1, 4)):
                pieces = [words[k] for k in rng.integers(0, len(words), rng.integers(5, 25))]
                if rng.random() < 0.1:
                    pieces.insert(
                        int(rng.integers(0, len(pieces))), EXTRAS[int(rng.integers(0, len(EXTRAS)))]
                    )
                sentences.append("".join(pieces) + ("。" if rng.random() < 0.8 else "！"))
            lines.append("".join(sentences))
        path = os.path.join(directory, f"corpus_{len(paths):03d}.txt")
        text = "\n".join(lines) + "\n"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written += len(text.encode("utf-8"))
        paths.append(path)
    return paths


def read_lines(paths: list[str], limit_bytes: int | None = None) -> list[str]:
    lines, size = [], 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                lines.append(line.rstrip("\n"))
                size += len(line.encode("utf-8"))
                if limit_bytes is not None and size >= limit_bytes:
                    return lines
    return lines


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a shared machine, the figure that load
    from other work does not distort (wall-clock `tokens_per_s` is reported beside it)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def time_tokenizer(encode, lines: list[str]) -> tuple[int, Timer]:
    with Timer() as timer:
        tokens = sum(len(encode(line)) for line in lines)
    return tokens, timer


def report(bench: str, batch: int, dtype: str, tokens: int, timer: Timer, **extra) -> dict:
    result = {
        "bench": bench,
        "config": "swe",
        "batch": batch,
        "dtype": dtype,
        "tokens_per_s": round(tokens / timer.wall, 1),
        "tokens_per_cpu_s": round(tokens / timer.cpu, 1),
        "tokens": tokens,
        "seconds": round(timer.wall, 3),
        "cpu_seconds": round(timer.cpu, 3),
        "load_average": round(os.getloadavg()[0], 2),
        **extra,
    }
    print(json.dumps(result), flush=True)
    return result


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocabulary", default=str(default_vocabulary()),
                   help="ja-swe36k.txt (default: $GPTSAN_SHARED/vocab, else ../shared/vocab beside the repository)")
    p.add_argument("--config", default="swe", choices=["swe"], help="tokenizer (only swe is benchmarked)")
    p.add_argument("--batch", type=positive_integer, action="append",
                   help="process counts for end-to-end (default 1 and 2)")
    p.add_argument("--dtype", default="int64", choices=["int64"], help="the tfrecord feature type")
    p.add_argument("--size_mb", type=positive_number, default=12.0,
                   help="corpus size (written in files of 2,000 lines, so at least one such file)")
    p.add_argument("--naive_mb", type=positive_number, default=1.0)
    p.add_argument("--num_context", type=int, default=1280)
    args = p.parse_args(argv)
    processes = args.batch or [1, 2]
    EncodeConfig(input_files="", tokenizer=TokenizerSpec("swe", args.vocabulary),  # bad values: before any work
                 layout=LayoutSettings(mode="lm", num_context=args.num_context), num_process=max(processes),
                 output_dir=tempfile.gettempdir()).validate()
    tokenizer = SWETokenizer(args.vocabulary)
    with tempfile.TemporaryDirectory(prefix="gptsan-bench-") as tmp:
        corpus_dir = os.path.join(tmp, "corpus")
        os.makedirs(corpus_dir)
        paths = generate_corpus(tokenizer, corpus_dir, args.size_mb)
        size_mb = sum(os.path.getsize(p) for p in paths) / 1e6
        print(
            json.dumps(
                {
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "corpus_mb": round(size_mb, 2),
                    "files": len(paths),
                    "load_average": round(os.getloadavg()[0], 2),
                }
            ),
            file=sys.stderr,
        )

        sample = read_lines(paths, int(args.naive_mb * 1e6))
        naive_tokens, naive = time_tokenizer(lambda line: naive_encode(tokenizer, line), sample)
        fast_tokens, fast = time_tokenizer(tokenizer.encode, sample)
        assert naive_tokens == fast_tokens, "fast and straightforward tokenizers disagree"
        report("swe_tokenizer_naive", 1, args.dtype, naive_tokens, naive, corpus_mb=args.naive_mb)
        speedup = {
            "speedup_vs_naive": round(naive.wall / fast.wall, 2),
            "cpu_speedup": round(naive.cpu / fast.cpu, 2),
        }
        report("swe_tokenizer_fast", 1, args.dtype, fast_tokens, fast, corpus_mb=args.naive_mb, **speedup)

        tokens, timer = time_tokenizer(tokenizer.encode, read_lines(paths))
        report("swe_tokenizer_fast", 1, args.dtype, tokens, timer, corpus_mb=round(size_mb, 2))

        for count in processes:
            config = EncodeConfig(
                input_files=os.path.join(corpus_dir, "*.txt"),
                tokenizer=TokenizerSpec("swe", args.vocabulary),
                layout=LayoutSettings(mode="lm", num_context=args.num_context),
                output_dir=os.path.join(tmp, f"out{count}"),
                num_process=count,
                progress=False,
            )
            with Timer() as timer:
                summaries = run(config)
            written = sum(s.tokens for s in summaries)
            records = sum(s.records for s in summaries)
            report(
                "encode_end_to_end",
                count,
                args.dtype,
                written,
                timer,
                corpus_mb=round(size_mb, 2),
                records=records,
                mb_per_s=round(size_mb / timer.wall, 2),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
