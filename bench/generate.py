"""Decode speed against the memory-bandwidth bound.

    python bench/generate.py --config bench-small --batch 1 [--dtype float32|bfloat16] [--new_tokens 128]

Random weights of configs/NAME.json (`init_params`), a 16-token prompt per row, 128 new tokens by top-k
sampling (k 120; no end token, so every row runs all steps). Prints one JSON object per measurement:
tokens/s of the decode loop (prefill excluded, timed separately), the bytes one decode step reads (weights it
touches + the KV cache it attends over), and that traffic as a fraction of the memory bandwidth measured in
the same process (the best of large float32 sums taken before and after each decode repeat). Batch-1 decode
is memory bound, so the fraction is how close it is to the hardware's limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptsan.generate.decode import Decoder  # noqa: E402
from gptsan.generate.prompt import Prompt, left_pad  # noqa: E402
from gptsan.generate.sampling import Sampler  # noqa: E402
from gptsan.generate.weights import cast_for_compute  # noqa: E402
from gptsan.memory import keep_freed_memory  # noqa: E402
from gptsan.model import flatten, init_params, load_config  # noqa: E402
from gptsan.model.inference import to_inference_layout  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPT_TOKENS = 16
BANDWIDTH_BYTES = 512 * 2**20


def measure_bandwidth(repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of several sums over a 512 MiB float32 array."""
    data = jnp.ones((BANDWIDTH_BYTES // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(data).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return BANDWIDTH_BYTES / best / 1e9


def bytes_per_step(config, params, batch: int, cache_length: int) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) one decode step reads. Position tables contribute one row per token
    and the spout network does not run; each Switch layer reads the experts its tokens chose, counted as the
    expected number of distinct experts among `batch` uniformly routed tokens."""
    experts_used = config.num_experts * (1 - (1 - 1 / config.num_experts) ** batch)
    weights = 0.0
    for name, value in flatten(params).items():
        size = value.size * value.dtype.itemsize
        if name.startswith("pasts/"):
            continue
        if name in ("model/wpe", "model/ete"):
            size = batch * value.shape[1] * value.dtype.itemsize
        elif name.endswith(("/wi/kernel", "/wo/kernel")):
            size *= experts_used / config.num_experts
        weights += size
    itemsize = jnp.dtype(config.dtype).itemsize
    cache = 2 * config.num_layers * batch * cache_length * config.num_hidden * itemsize
    return weights, float(cache)


def run(config_name: str, batch: int, dtype: str, new_tokens: int, repeats: int) -> dict:
    config = load_config(CONFIGS / f"{config_name}.json", dtype=dtype)
    params = cast_for_compute(init_params(config), dtype)
    weights = to_inference_layout(params, batch)  # as gptsan-generate reads them
    rng = np.random.default_rng(0)
    prompts = [Prompt(tuple(int(t) for t in rng.integers(0, config.num_vocabulary - 7, PROMPT_TOKENS)))
               for _ in range(batch)]
    prompt_batch = left_pad(prompts, 0)
    decoder = Decoder(config, Sampler(top_k=120), end_id=-1)  # no end token: every row decodes all steps

    def timed_run(seed: int) -> tuple[float, float]:
        start = time.perf_counter()
        state = decoder.start(weights, prompt_batch, new_tokens, seed=seed)
        jax.block_until_ready(state)
        prefilled = time.perf_counter()
        state = decoder.advance(weights, state, new_tokens)
        jax.block_until_ready(state)
        return prefilled - start, time.perf_counter() - prefilled

    timed_run(0)  # compile
    # The bandwidth is measured between the decode repeats and the best kept, like the decode time: on a shared
    # machine a reference taken once, at a busy moment, would understate the hardware and flatter the fraction.
    runs, bandwidths = [], [measure_bandwidth()]
    for seed in range(1, repeats + 1):
        runs.append(timed_run(seed))
        bandwidths.append(measure_bandwidth())
    prefill_s, decode_s = min(runs)
    steps_per_s = (new_tokens - 1) / decode_s
    bandwidth = max(bandwidths)
    weights, cache = bytes_per_step(config, params, batch, PROMPT_TOKENS + new_tokens)
    return {
        "bench": "generate", "config": config_name, "batch": batch, "dtype": dtype,
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens,
        "tokens_per_s": round(steps_per_s * batch, 2), "step_ms": round(1000 / steps_per_s, 3),
        "prefill_s": round(prefill_s, 4),
        "weight_bytes_per_step": int(weights), "cache_bytes_per_step": int(cache),
        "bytes_per_token": int((weights + cache) / batch),
        "bandwidth_gbs": round(bandwidth, 2),
        "bandwidth_fraction": round((weights + cache) * steps_per_s / 1e9 / bandwidth, 3),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="bench-small", help="configs/NAME.json")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as gptsan-generate does
    for batch in args.batch:
        print(json.dumps(run(args.config, batch, args.dtype, args.new_tokens, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
