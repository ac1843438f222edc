"""gptsan against its peer, the Hugging Face port (transformers 4.40.2 GPTSanJapaneseForConditionalGeneration on
torch CPU), on the same config, measured in the same run, step for step in turn, so the ratio holds on a busy
machine.

    python bench/peer_hf.py --config bench-small --batch 4 [--steps 3] [--parts all,extended,decode]
                            [--hf_kept_memory]

Parts: training with all parameters trainable; training with only the extended layers (+ ete and the spout
network) trainable — the HF model gets requires_grad False elsewhere; batch-1 decoding (HF `generate` with
use_cache, top-k 120 sampling, a 16-token prompt, 128 new tokens; ours from bench/generate.py when present).
Prints one JSON line per part with both figures and `ratio` = ours / HF (> 1: gptsan is faster).
Needs the `peer` extra (torch, transformers).

Training steps of the port run in worker processes, each as its users get it: `hf` with glibc's default
malloc (the port as shipped), and with --hf_kept_memory also `hf_keep_memory` with gptsan's
`keep_freed_memory` (which gptsan's commands apply to themselves, and which helps torch as much: 1.00-1.07x
instead of 1.16x all-trainable on a Zen 1, bench/RESULTS.md). `ratio` is against the port as shipped;
`ratio_hf_keep_memory` against the tuned one. The workers start first and warm up while ours compiles (warm-up
counts steps or page faults, not time, so sharing the cores changes nothing but the wall time); then the parent
process (ours, the matmul peak) asks each worker for one step per round and times it, nothing else running.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import train as ours  # noqa: E402  (bench/train.py)

from bench.flags import config_path, positive_integer  # noqa: E402
from gptsan.errors import UserError, cli_main  # noqa: E402
from gptsan.memory import keep_freed_memory  # noqa: E402
from gptsan.model.config import ModelConfig, load_config  # noqa: E402

PARTS = ("all", "extended", "decode")
PROMPT_TOKENS = 16
NEW_TOKENS = 128
TOP_K = 120


def hf_model(config: ModelConfig):
    """A randomly initialised HF port of `config` (float32, dropout 0)."""
    import torch
    from transformers import GPTSanJapaneseConfig, GPTSanJapaneseForConditionalGeneration

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf = config.to_hf_config()
    hf["expert_capacity"] = config.num_contexts  # the port's per-row cap; never drop, as our dropless routing
    return GPTSanJapaneseForConditionalGeneration(GPTSanJapaneseConfig(**hf))


def hf_trainable(name: str, config: ModelConfig) -> bool:
    """The HF names of the parameters `bench/train.py`'s extended mode trains (extended layers, ete, spout)."""
    if name.startswith("model.spout.") or name.startswith("model.extra_position_embeddings."):
        return True
    if name.startswith("model.blocks."):
        return int(name.split(".")[2]) >= config.num_switch_layers
    return False


def prepare_hf_train(config: ModelConfig, batch: int, trainable: str, keep_memory: bool):
    """A warmed-up callable running one HF train step (forward with labels, backward, Adam), and how many warm-up
    steps ran. With `keep_memory` it is warmed up by the rule our step is (`train.warm_up`); with glibc's default
    malloc, which gives buffers over 32 MB back to the kernel at every free, no step is ever free of page faults
    (the rule would always run its most, 5 steps), so two: the first allocates, the second is the steady state."""
    import torch

    model = hf_model(config).train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable == "all" or hf_trainable(name, config))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = ours.random_batch(config, batch)
    x = torch.as_tensor(np.array(data["x"]), dtype=torch.long)  # a copy: torch warned of a read-only array
    y = torch.as_tensor(np.array(data["y"]), dtype=torch.long)

    def one_step():
        loss = model(input_ids=x, labels=y, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return one_step, ours.warm_up(one_step, max_steps=ours.MAX_WARMUP_STEPS if keep_memory else 2)


def measure_hf_decode(config: ModelConfig, repeats: int, new_tokens: int) -> dict:
    """Batch-1 cached decoding: new_tokens - 1 steps' time = generate(new_tokens) - generate(1 new) (the prefill).
    Timed with torch on every core and on one thread (a busy machine makes the port's many small ops wait on
    each other's threads); the port is credited with the faster."""
    import torch

    model = hf_model(config).eval()
    rng = np.random.default_rng(0)
    prompt = torch.as_tensor(rng.integers(0, config.num_vocabulary - 8, (1, PROMPT_TOKENS)), dtype=torch.long)

    def generate(count: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=count, min_new_tokens=count, do_sample=True,
                                 top_k=TOP_K, use_cache=True, pad_token_id=config.num_vocabulary - 4)
        if out.shape[1] != PROMPT_TOKENS + count:
            raise RuntimeError(f"HF generate returned {out.shape[1] - PROMPT_TOKENS} new tokens")
        return time.perf_counter() - start

    rates = {}
    for threads in (os.cpu_count(), 1):
        torch.set_num_threads(threads)
        generate(2)
        prefill = min(generate(1) for _ in range(repeats))
        full = min(generate(new_tokens) for _ in range(repeats))
        rates[threads] = (new_tokens - 1) / (full - prefill)
    torch.set_num_threads(os.cpu_count())
    return {"tokens_per_s": max(rates.values()), "tokens_per_s_by_threads": rates}


def ours_decode(name: str, repeats: int, new_tokens: int) -> dict | None:
    """bench/generate.py's batch-1 figure (the generation engineer's bench), or None where it is absent."""
    path = Path(__file__).resolve().parent / "generate.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(name, 1, "float32", new_tokens, repeats)


class HFTrainWorker:
    """A child process holding a warmed-up HF train step; `step()` runs one there and returns when done."""

    def __init__(self, name: str, batch: int, trainable: str, keep_memory: bool):
        """Starts the worker; it builds and warms up its step meanwhile (`wait_until_ready`)."""
        command = [sys.executable, __file__, "--config", name, "--batch", str(batch), "--parts", trainable,
                   "--worker", "keep_memory" if keep_memory else "default_malloc"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.warmup_steps = None

    def wait_until_ready(self) -> None:
        self.warmup_steps = int(self._expect("ready"))

    def _expect(self, word: str) -> str:
        """Reads the worker's next line, `word` and what follows it; returns what follows."""
        line = self.process.stdout.readline().strip()
        if line.split(" ")[0] != word:
            raise RuntimeError(f"HF worker: expected {word!r}, got {line!r} (exit {self.process.poll()})")
        return line[len(word):].strip()

    def step(self) -> None:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        self._expect("done")

    def close(self) -> None:
        if self.warmup_steps is None:  # still warming up: the parent failed before the timed rounds
            self.process.kill()
        self.process.stdin.close()
        self.process.wait()


def serve_hf_steps(name: str, batch: int, trainable: str, keep_memory: bool) -> None:
    """The worker's side: prepare the port's step, then run one per `step` line on stdin."""
    if keep_memory:
        keep_freed_memory()
    step, warmup_steps = prepare_hf_train(load_config(config_path(name), dtype="float32"), batch, trainable,
                                          keep_memory)
    print(f"ready {warmup_steps}", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            step()
            print("done", flush=True)


def train_part(name: str, config: ModelConfig, batch: int, trainable: str, steps: int,
               hf_kept_memory: bool = False) -> dict:
    """Ours, the HF port (as shipped, and with kept memory if asked) and the matmul peak, one step each in turn
    for `steps` rounds."""
    started = time.perf_counter()
    workers = {"hf": HFTrainWorker(name, batch, trainable, keep_memory=False)}
    if hf_kept_memory:
        workers["hf_keep_memory"] = HFTrainWorker(name, batch, trainable, keep_memory=True)
    try:
        run_matmul, matmul_flops = ours.prepare_matmul("float32")
        our_step, info = ours.prepare_train(config, batch, trainable)
        ours_ready = time.perf_counter()
        for worker in workers.values():
            worker.wait_until_ready()
        all_ready = time.perf_counter()
        times = ours.interleaved({"matmul": run_matmul, "ours": our_step,
                                  **{key: worker.step for key, worker in workers.items()}}, steps)
    finally:
        for worker in workers.values():
            worker.close()
    print(f"# peer_hf.py {trainable}: ours compiled and warmed up in {ours_ready - started:.0f} s, the HF workers "
          f"(started with it) ready {all_ready - ours_ready:.0f} s later, {steps} timed rounds in "
          f"{time.perf_counter() - all_ready:.0f} s", file=sys.stderr)
    peak = matmul_flops / min(times["matmul"])
    record = ours.train_record(name, config, batch, trainable, info, times["ours"], peak)
    record["bench"] = "peer_hf_train"
    for key in workers:
        hf_tokens_per_s = info["tokens"] / min(times[key])
        record.update({
            f"{key}_tokens_per_s": round(hf_tokens_per_s, 1),
            f"{key}_peak_fraction": round(record["flops_per_token"] * hf_tokens_per_s / peak, 4),
            f"{key}_median_tokens_per_s": round(info["tokens"] / float(np.median(times[key])), 1),
            f"{key}_warmup_steps": workers[key].warmup_steps,
        })
    record["ratio"] = round(record["tokens_per_s"] / record["hf_tokens_per_s"], 3)
    if hf_kept_memory:
        record["ratio_hf_keep_memory"] = round(record["tokens_per_s"] / record["hf_keep_memory_tokens_per_s"], 3)
    record["load"] = ours.machine_load()
    return record


def decode_part(name: str, config: ModelConfig, repeats: int) -> dict:
    # as many as the context holds after the prompt (tiny: 48): steps the context has no room for were counted
    new_tokens = min(NEW_TOKENS, config.num_contexts - PROMPT_TOKENS)
    started = time.perf_counter()
    mine = ours_decode(name, repeats, new_tokens)  # first: torch's idle OpenMP threads keep spinning after the port's
    ours_done = time.perf_counter()
    theirs = measure_hf_decode(config, repeats, new_tokens)
    print(f"# peer_hf.py decode: ours in {ours_done - started:.0f} s, HF in {time.perf_counter() - ours_done:.0f} s",
          file=sys.stderr)
    record = {"bench": "peer_hf_decode", "config": name, "batch": 1, "dtype": "float32",
              "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens,
              "hf_tokens_per_s": round(theirs["tokens_per_s"], 2),
              "hf_tokens_per_s_by_threads": {k: round(v, 2) for k, v in theirs["tokens_per_s_by_threads"].items()},
              "tokens_per_s": round(mine["tokens_per_s"], 2) if mine else None,
              **{key: mine.get(key) if mine else None for key in (
                  "bandwidth_fraction", "bandwidth_readings_gbs", "bandwidth_fraction_of_best", "matvec_chain_ms",
                  "fraction_of_matvec_chain")},
              "ratio": round(mine["tokens_per_s"] / theirs["tokens_per_s"], 3) if mine else None,
              "load": ours.machine_load()}
    return record


def run(name: str, batch: int, steps: int, parts: list[str], hf_kept_memory: bool = False) -> list[dict]:
    config = load_config(config_path(name), dtype="float32")
    records = []
    for part in parts:
        if part == "decode":
            records.append(decode_part(name, config, 3))
        else:
            records.append(train_part(name, config, batch, part, steps, hf_kept_memory))
        print(json.dumps(records[-1]), flush=True)
    return records


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bench-small", help="preset under configs/ or a parameters.json")
    parser.add_argument("--batch", type=positive_integer, default=4, help="training batch (decoding is batch 1)")
    parser.add_argument("--steps", type=positive_integer, default=3, help="timed steps (decode: repeats)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: all, extended, decode")
    parser.add_argument("--hf_kept_memory", action="store_true",
                        help="also time the port's training with gptsan's malloc setting (keep_freed_memory)")
    parser.add_argument("--worker", choices=["default_malloc", "keep_memory"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = ours.comma_list(args.parts, PARTS, "--parts")
    return args


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        serve_hf_steps(args.config, args.batch, args.parts[0], args.worker == "keep_memory")
        return 0
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:  # found before our step compiles, not as two tracebacks after it
        raise UserError(f"peer_hf.py needs {' and '.join(missing)}: pip install -e \".[peer]\"")
    config_path(args.config)  # a bad --config, before anything runs
    keep_freed_memory()  # as gptsan's commands do (the HF decode part runs here too)
    run(args.config, args.batch, args.steps, args.parts, args.hf_kept_memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
