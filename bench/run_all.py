"""Run the CPU benchmarks (training with its HF peer, generation, encoding) one after another as
subprocesses and print their JSON lines as one table, then one line per CPU target (`TARGETS`) with this run's
figure. Took 6-7.5 minutes on a 2-vCPU AMD EPYC with AVX-512 (Zen 5, with the bfloat16 row and the kept-memory
HF worker), 7 min 19 s on a 2-vCPU Zen 1, which skips the bfloat16 row (`--bfloat16`), and 3 min 50 s - 4 min 1 s
on a 2-vCPU Intel Xeon with AVX-512 and AMX (bench/RESULTS.md).

    python bench/run_all.py [--vocabulary ../shared/vocab/ja-swe36k.txt] [--json all.jsonl]
                            [--bfloat16 auto|always|never] [--hf_kept_memory]

peer_hf.py measures training (ours and the HF port, all-trainable and extended-only) and batch-1 decoding
(ours through bench/generate.py's `run`, and the port); train.py adds bfloat16 training where the CPU has
bfloat16 instructions (`--bfloat16`); encode.py the tokenizer and tfrecord encoding on a 2 MB corpus. A bench
that fails is reported and the rest still run; the run then ends with an error line naming it (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.flags import default_vocabulary  # noqa: E402
from gptsan import storage  # noqa: E402
from gptsan.errors import UserError, cli_main  # noqa: E402

HALTPOLL_NS = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def cpu_has_bfloat16() -> bool:
    """Whether the CPU does bfloat16 arithmetic itself (avx512_bf16 or amx_bf16 among /proc/cpuinfo's flags);
    True where that cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def idle_polling() -> str:
    """How long an idle vCPU of this KVM guest polls before it halts (the haltpoll driver's setting), as a note
    for the table's header, or "" where there is no such driver. XLA's matrix-vector products hand work between
    threads dozens of times a decode step, and a halted vCPU waits for the hypervisor to wake it: at 200000 ns
    instead of 0 the matvec chain ran 4-8% faster on the bench host (bench/RESULTS.md, eighteenth session)."""
    try:
        return f", haltpoll guest_halt_poll_ns {HALTPOLL_NS.read_text().strip()}"
    except OSError:
        return ""


def benches(vocabulary: Path, bfloat16: bool, hf_kept_memory: bool = False) -> list[tuple[str, list[str]]]:
    """(script, arguments) of each bench run; `bfloat16`: with the bfloat16 training row; `hf_kept_memory`:
    with the HF port's training also timed with gptsan's malloc setting."""
    return [
        ("peer_hf.py", ["--config", "bench-small", "--batch", "4", "--steps", "4",
                        *(["--hf_kept_memory"] if hf_kept_memory else [])]),
        *([("train.py", ["--config", "bench-small", "--batch", "4", "--steps", "2", "--dtype", "bfloat16",
                         "--modes", "all"])] if bfloat16 else []),
        ("encode.py", ["--vocabulary", str(vocabulary), "--size_mb", "2", "--naive_mb", "0.2"]),
    ]


BF16_SKIPPED = ("this CPU has no bfloat16 instructions, so XLA converts to float32 and back: 84 against 173 "
                "tokens/s for float32 on a Zen 1 host; --bfloat16 always runs it")


def run_bench(script: str, arguments: list[str]) -> tuple[list[dict], int]:
    """The bench's JSON records, and its exit status."""
    path = ROOT / "bench" / script
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(path), *arguments], capture_output=True, text=True, env=env)
    notes = [line for line in result.stderr.splitlines() if line.startswith("# ")]  # the bench's own notes
    print("\n".join([*notes, f"# {script}: {time.perf_counter() - start:.0f} s, exit {result.returncode}"]),
          file=sys.stderr)
    if result.returncode:
        print(result.stderr[-2000:], file=sys.stderr)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")], result.returncode


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


COLUMNS = [
    ("bench", "bench"), ("config", "config"), ("batch", "batch"), ("dtype", "dtype"),
    ("mode", "trainable"), ("tokens/s", "tokens_per_s"), ("peak fraction", "peak_fraction"),
    ("bandwidth fraction", "bandwidth_fraction"), ("of XLA's matvec chain", "fraction_of_matvec_chain"),
    ("HF tokens/s", "hf_tokens_per_s"), ("vs HF", "ratio"),
    ("HF tokens/s, kept memory", "hf_keep_memory_tokens_per_s"), ("vs HF, kept memory", "ratio_hf_keep_memory"),
    ("load", "load"),
]


def table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for record in records:
        lines.append("| " + " | ".join(fmt(record.get(key)) for _, key in COLUMNS) + " |")
    return "\n".join(lines)


# The CPU targets (float32, bench-small, all measured in the same run): (what, bench, trainable, key, floor).
TARGETS = (
    ("all-trainable training, fraction of the matmul peak", "peer_hf_train", "all", "peak_fraction", 0.60),
    ("all-trainable training, times the HF port", "peer_hf_train", "all", "ratio", 1.2),
    ("extended-only training, times the HF port", "peer_hf_train", "extended", "ratio", 1.2),
    ("batch-1 decode, fraction of the memory bandwidth", "peer_hf_decode", None, "bandwidth_fraction", 0.80),
)


def target_lines(records: list[dict]) -> list[str]:
    """One line per target: its figure in this run and whether it is met."""
    lines = []
    for what, bench, trainable, key, floor in TARGETS:
        found = [r for r in records if r.get("bench") == bench and r.get(key) is not None
                 and (trainable is None or r.get("trainable") == trainable)]
        if not found:
            lines.append(f"target: {what} >= {floor}: not measured")
            continue
        value = found[0][key]
        lines.append(f"target: {what} >= {floor}: {value:.3f} ({'met' if value >= floor else 'not met'})")
    return lines


@cli_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabulary", type=Path, default=default_vocabulary(),
                        help="ja-swe36k.txt for encode.py (default: $GPTSAN_SHARED/vocab, else ../shared/vocab)")
    parser.add_argument("--json", help="also write every record to this JSON-lines file")
    parser.add_argument("--bfloat16", choices=["auto", "always", "never"], default="auto",
                        help="the bfloat16 training row: auto = where the CPU has bfloat16 instructions")
    parser.add_argument("--hf_kept_memory", action="store_true",
                        help="also time the HF port's training with gptsan's malloc setting (peer_hf.py)")
    args = parser.parse_args(argv)
    if args.json:  # before minutes of benches, not after them
        storage.check_output_file(args.json, "--json")
    bfloat16 = args.bfloat16 == "always" or (args.bfloat16 == "auto" and cpu_has_bfloat16())
    if not bfloat16:
        print(f"# train.py bfloat16: skipped ({'--bfloat16 never' if args.bfloat16 == 'never' else BF16_SKIPPED})",
              file=sys.stderr)
    records, failed = [], []
    for script, arguments in benches(args.vocabulary, bfloat16, args.hf_kept_memory):
        if script == "encode.py" and not args.vocabulary.exists():
            print(f"# encode.py: vocabulary {args.vocabulary} not found, skipped", file=sys.stderr)
            continue
        found, status = run_bench(script, arguments)
        records += found
        if status:
            failed.append(f"{script} (exit {status})")
    print(f"machine load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs{idle_polling()}")
    print(table(records))
    print("\n".join(target_lines(records)))
    if args.json:
        storage.write_text_atomic(args.json, "".join(json.dumps(r) + "\n" for r in records))
    if failed:  # the table holds what the others measured; the run as a whole did not succeed
        raise UserError(f"{len(failed)} bench{'es' * (len(failed) > 1)} failed: {', '.join(failed)} (their output "
                        "above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
