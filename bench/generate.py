"""Decode speed against the memory-bandwidth bound.

    python bench/generate.py --config bench-small --batch 1 [--dtype float32|bfloat16] [--new_tokens 128]
                             [--top_k 120] [--top_p 1.0]

Random weights of configs/NAME.json (`init_params`), a 16-token prompt per row, 128 new tokens by top-k
sampling (k 120, gptsan-generate's default; no end token, so every row runs all steps). Prints one JSON object
per measurement: tokens/s of the decode loop (prefill excluded, timed separately), the bytes one decode step
reads (weights it touches + the KV cache it attends over), and that traffic as a fraction of the memory
bandwidth measured in the same process. Batch-1 decode is memory bound, so the fraction is how close it is to
the hardware's limit.

The bandwidth is read (large float32 sums) before and after every decode repeat, and each repeat's fraction is
taken against the better of its two readings; `bandwidth_fraction` is the (lower) median repeat's. The host's read
bandwidth changes state for tens of seconds at a time (on the 2-vCPU bench machine: 38-48 GB/s or 70-77 GB/s),
so a repeat is compared with the bound of its own moment; `bandwidth_fraction_of_best` (best decode over best
reading of the whole run) is printed too. `matvec_chain_ms` is XLA's own floor for the step, measured the way
the decode is: the same weight matrices multiplied by one vector in sequence (`matvec_chain`), nothing else, for
as many steps in one jitted loop, run after every decode repeat; `fraction_of_matvec_chain` is the (lower)
median over repeats of the chain's time per step / the decode's, each repeat against the chain run after it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.flags import config_path, positive_integer  # noqa: E402
from gptsan.errors import UserError, cli_main  # noqa: E402
from gptsan.generate.decode import Decoder  # noqa: E402
from gptsan.generate.prompt import Prompt, left_pad  # noqa: E402
from gptsan.generate.sampling import Sampler  # noqa: E402
from gptsan.generate.weights import cast_for_compute  # noqa: E402
from gptsan.memory import keep_freed_memory  # noqa: E402
from gptsan.model import flatten, init_params, load_config  # noqa: E402
from gptsan.model.dense import matmul  # noqa: E402
from gptsan.model.inference import to_inference_layout  # noqa: E402

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


def matvec_chain(config, weights, steps: int):
    """XLA's floor for a batch-1 decode step on these weights (inference layout, one row), timed as the decode
    is timed: every matrix the step reads, multiplied by one vector in the step's order, each product feeding
    the next, and nothing else (no attention over the cache, norms or sampling), `steps` times in one jitted
    loop whose next vector comes from the last. A Switch layer reads one expert, picked by `lax.switch` as the
    decoder does and changed every step, so no step finds its experts in cache. Returns a function that runs
    the loop once and gives seconds per step."""
    flat = flatten(weights)
    d = config.num_hidden

    def product(x, scope, name="kernel"):  # x @ the matrix, or through its transposed copy where there is one
        if f"{scope}/{name}_t" in flat:
            return matmul(x, flat[f"{scope}/{name}_t"], transposed=True)
        return x @ flat[f"{scope}/{name}"].reshape(x.shape[-1], -1)

    def expert_branch(layer, e):
        scope = f"model/moe{layer}"
        return lambda x: product(jax.nn.relu(product(x, f"{scope}/wi", f"expert{e}")), f"{scope}/wo", f"expert{e}")

    def one_step(step, carry):
        x, total = carry
        for layer in range(config.num_layers):
            x = product(x, f"model/att{layer}/qkv")[:, :d]
            x = product(x, f"model/att{layer}/o")
            if layer < config.num_switch_layers:
                route = product(x, f"model/moe{layer}/switch_gating").sum()  # float32: the router weights stay so
                x = x + product(x, f"model/moe{layer}/softmlp") + route.astype(x.dtype)
                branches = [expert_branch(layer, e) for e in range(config.num_experts)]
                x = jax.lax.switch((step + layer) % config.num_experts, branches, x)
            else:
                x = product(jax.nn.relu(product(x, f"model/mlp{layer}/p1")), f"model/mlp{layer}/p2")
        x = product(x, "model/dense")
        total = total + jnp.argmax(x @ flat["model/wte_t"])
        return x / (1 + jnp.max(jnp.abs(x))), total  # bounded, and the next step depends on this one

    @jax.jit
    def loop(x, first):
        return jax.lax.fori_loop(first, first + steps, one_step, (x, jnp.zeros((), jnp.int32)))

    x = jnp.ones((1, d), flat["model/wte_t"].dtype)
    calls = itertools.count(1)  # each run starts at another step, so its experts differ
    jax.block_until_ready(loop(x, 0))

    def seconds_per_step() -> float:
        start = time.perf_counter()
        jax.block_until_ready(loop(x, next(calls)))
        return (time.perf_counter() - start) / steps

    return seconds_per_step


def lower_median(values: list):
    return sorted(values)[(len(values) - 1) // 2]


def run(config_name: str, batch: int, dtype: str, new_tokens: int, repeats: int, top_k: int = 120,
        top_p: float = 1.0) -> dict:
    sampler = Sampler(top_k=top_k, top_p=top_p)  # bad settings fail here, before any work
    config = load_config(config_path(config_name), dtype=dtype)
    room = config.num_contexts - PROMPT_TOKENS
    if not 2 <= new_tokens <= room:  # the decoder stops at the context's end: steps not run were counted as run
        raise UserError(f"--new_tokens: expected 2 to {room} (the {PROMPT_TOKENS}-token prompt's room in "
                        f"{config_name}'s {config.num_contexts}-token context), got {new_tokens}")
    params = cast_for_compute(init_params(config), dtype)
    weights = to_inference_layout(params, batch)  # as gptsan-generate reads them
    rng = np.random.default_rng(0)
    prompts = [Prompt(tuple(int(t) for t in rng.integers(0, config.num_vocabulary - 7, PROMPT_TOKENS)))
               for _ in range(batch)]
    prompt_batch = left_pad(prompts, 0)
    decoder = Decoder(config, sampler, end_id=-1)  # no end token: every row decodes all steps

    def timed_run(seed: int) -> tuple[float, float]:
        start = time.perf_counter()
        state = decoder.start(weights, prompt_batch, new_tokens, seed=seed)
        jax.block_until_ready(state)
        prefilled = time.perf_counter()
        state = decoder.advance(weights, state, new_tokens)
        jax.block_until_ready(state)
        return prefilled - start, time.perf_counter() - prefilled

    timed_run(0)  # compile
    # the chain reads one expert per layer, as a batch of one does
    chain = matvec_chain(config, weights, new_tokens - 1) if batch == 1 else None
    readings, runs, chain_times = [measure_bandwidth()], [], []
    for seed in range(1, repeats + 1):
        runs.append(timed_run(seed))
        chain_times.append(chain() if chain else float("nan"))
        readings.append(measure_bandwidth())
    weights_bytes, cache = bytes_per_step(config, params, batch, PROMPT_TOKENS + new_tokens)
    traffic_gb = (weights_bytes + cache) / 1e9
    # each repeat against the better reading of its own moment (module doc); the lower median is reported
    paired = [(traffic_gb * (new_tokens - 1) / decode_s / max(before, after), max(before, after))
              for (_, decode_s), before, after in zip(runs, readings[:-1], readings[1:], strict=True)]
    fraction, bandwidth = lower_median(paired)
    prefill_s, decode_s = min(runs)
    steps_per_s = (new_tokens - 1) / decode_s
    return {
        "bench": "generate", "config": config_name, "batch": batch, "dtype": dtype,
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens, "top_k": top_k, "top_p": top_p,
        "tokens_per_s": round(steps_per_s * batch, 2), "step_ms": round(1000 / steps_per_s, 3),
        "prefill_s": round(prefill_s, 4),
        "weight_bytes_per_step": int(weights_bytes), "cache_bytes_per_step": int(cache),
        "bytes_per_token": int((weights_bytes + cache) / batch),
        "bandwidth_gbs": round(bandwidth, 2),
        "bandwidth_readings_gbs": [round(min(readings), 1), round(max(readings), 1)],
        "bandwidth_fraction": round(fraction, 3),
        "bandwidth_fraction_of_best": round(traffic_gb * steps_per_s / max(readings), 3),
        "matvec_chain_ms": round(1000 * min(chain_times), 3) if chain else None,
        "fraction_of_matvec_chain": round(lower_median([
            chain_s * (new_tokens - 1) / decode_s for (_, decode_s), chain_s in zip(runs, chain_times, strict=True)
        ]), 3) if chain else None,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    }


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="bench-small", help="preset under configs/ or a parameters.json")
    parser.add_argument("--batch", type=positive_integer, nargs="+", default=[1])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new_tokens", type=int, default=128, help="2 up to the context's room after the prompt")
    parser.add_argument("--repeats", type=positive_integer, default=3)
    parser.add_argument("--top_k", type=int, default=120, help="sample among the k likeliest (0 = all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as gptsan-generate does
    for batch in args.batch:
        print(json.dumps(run(args.config, batch, args.dtype, args.new_tokens, args.repeats, args.top_k, args.top_p)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
