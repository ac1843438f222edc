"""Training speed: tokens/s of the project's real train step, its FLOP/s and the fraction of a matmul peak
measured in the same process, for all parameters trainable and for a frozen backbone.

    python bench/train.py --config bench-small --batch 4 --dtype float32 [--steps 5] [--modes all,extended]

Prints one JSON line per mode (keys: bench, config, batch, dtype, tokens_per_s, trainable, flops_per_token,
flop_per_s, matmul_peak_flop_per_s, peak_fraction, plus median figures, XLA's own FLOP count, the warm-up
steps and the load). Timed steps start once a step no longer grows the heap (`warm_up`).

Modes (`trainable`):
  all       every parameter is trained.
  extended  the converter's ignore list for a fine-tune: only the extended layers (`att/an/ln/mlp{l}` for
            l >= num_switch_layers), `ete` and the spout network are trainable; everything else is frozen.

FLOPs are counted analytically as *useful* work (a multiply-add = 2 FLOPs), per token of a T-token row,
no spout input (the bench's batches carry none), forward:
  each layer      attention projections 8d^2 (qkv 6d^2, o 2d^2) + scores and weighted sum 4Td
                  (the full T x T score matrix, as the PaLM MFU formula counts it; gptsan's blocked causal
                  attention computes about 5/8 of it at T 512, so this credits 2.4% of the all-trainable
                  count that is not computed)
  Switch layer    router 2dE + the top-1 expert's FFN 2*2*d*8d = 32d^2 + bypass 2d^2
                  (window padding of the expert matmuls and unused experts are not counted)
  extended layer  p1 and p2: 2*2*d*4d = 16d^2
  head            dense 2d^2 + tied vocabulary projection 2dV
  fwd = L(8d^2 + 4Td) + S(34d^2 + 2dE) + 16Xd^2 + 2d^2 + 2dV
all-trainable:  3 fwd (backward = gradients w.r.t. activations and weights, 2 fwd).
extended-only:  what has to be computed: the forward, then the backward only from the loss down to the first
  extended layer (nothing trainable lies below it, as no spout is fed): the head's activation gradient
  (2d^2 + 2dV; no gradient for the frozen tied embedding or dense kernel) and the extended layers' full
  backward (2 x their forward): fwd + 2d^2 + 2dV + 2X(8d^2 + 4Td + 16d^2).
LayerNorms, softmaxes, activations and the optimizer update are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.flags import config_path, positive_integer  # noqa: E402
from gptsan.errors import UserError, cli_main  # noqa: E402
from gptsan.memory import keep_freed_memory  # noqa: E402
from gptsan.model.config import ModelConfig, load_config  # noqa: E402
from gptsan.model.params import expected_shapes, init_params  # noqa: E402

MODES = ("all", "extended")
PEAK_SIZE = 2048
LAYER_SCOPE = re.compile(r"model/(?:att|an|ln|mlp)(\d+)/")


# Configuration and FLOP counts.
def extended_trainable(name: str, config: ModelConfig) -> bool:
    """Whether `name` stays trainable when fine-tuning only the extended layers (the converter's list)."""
    if name.startswith("pasts/") or name == "model/ete":
        return True
    layer = LAYER_SCOPE.match(name)
    return bool(layer) and int(layer.group(1)) >= config.num_switch_layers


def frozen_names(config: ModelConfig, trainable: str) -> frozenset[str]:
    if trainable == "all":
        return frozenset()
    return frozenset(name for name in expected_shapes(config) if not extended_trainable(name, config))


def forward_flops_per_token(config: ModelConfig, length: int) -> dict[str, float]:
    d, e, v = config.num_hidden, config.num_experts, config.num_vocabulary
    layers, switch, ext = config.num_layers, config.num_switch_layers, config.num_ext_layers
    return {
        "attention": layers * (8 * d * d + 4 * length * d),
        "switch_ff": switch * (34 * d * d + 2 * d * e),
        "extended_ff": ext * 16 * d * d,
        "head": 2 * d * d + 2 * d * v,
    }


def flops_per_token(config: ModelConfig, length: int, trainable: str) -> float:
    """Useful training FLOPs per token (see the module doc for the formula)."""
    parts = forward_flops_per_token(config, length)
    forward = sum(parts.values())
    if trainable == "all":
        return 3.0 * forward
    d = config.num_hidden
    extended = config.num_ext_layers * (8 * d * d + 4 * length * d + 16 * d * d)
    return forward + parts["head"] + 2.0 * extended


# Measurements.
def machine_load() -> float:
    return round(os.getloadavg()[0], 2)


def best_seconds(fn, repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls of fn() (which must block until its work is done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def prepare_matmul(dtype: str, size: int = PEAK_SIZE):
    """A warmed-up jitted square matmul and its FLOPs: the machine's practical peak when timed."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    return (lambda: matmul(a, b).block_until_ready()), 2.0 * size**3


PEAK_READINGS_PER_ROUND = 3  # the best of 5 single readings still came out 15% low in some runs


def interleaved(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Time each callable once per round, in turn (A B C A B C ...), so that a change of machine load hits
    every contender alike; the `matmul` peak PEAK_READINGS_PER_ROUND times (35 ms each at bench size), as
    its best reading is the denominator of every fraction. Returns each one's times."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name] += best_seconds(fn, PEAK_READINGS_PER_ROUND if name == "matmul" else 1)
    return times


def random_batch(config: ModelConfig, batch: int, seed: int = 0) -> dict[str, jax.Array]:
    """Token ids over the ordinary vocabulary, every position counted in the loss."""
    rng = np.random.default_rng(seed)
    length = config.num_contexts
    ids = rng.integers(0, config.num_vocabulary - 8, (batch, length + 1))
    return {"x": jnp.asarray(ids[:, :-1], jnp.int32), "y": jnp.asarray(ids[:, 1:], jnp.int32),
            "i": jnp.arange(batch, dtype=jnp.int32), "num_input": jnp.zeros((batch,), jnp.int32)}


def train_step_and_state(config: ModelConfig, trainable: str, seed: int = 0):
    """The project's jitted train step (gptsan.train, state donated) and a fresh state; before gptsan.train
    exists, a stand-in step of the same shape (Adam on the trainable subtree only). Returns its name too."""
    params = init_params(config, seed)
    frozen = frozen_names(config, trainable)
    try:
        from gptsan.train.compiler_options import step_compiler_options
        from gptsan.train.optim import make_optimizer
        from gptsan.train.precision import LossScale
        from gptsan.train.state import create_state
        from gptsan.train.step import StepOptions, make_train_step
    except ImportError:
        return (*stand_in_step(config, params, frozen), "stand-in")
    optimizer, schedule = make_optimizer("adam", 1e-4, 10)
    state = create_state(params, frozen, optimizer, seed, LossScale.for_dtype(config.dtype))
    step = jax.jit(make_train_step(config, optimizer, schedule, StepOptions()), donate_argnums=0,
                   compiler_options=step_compiler_options(jax.default_backend(), jax.local_device_count()))
    return step, state, "gptsan.train"


def stand_in_step(config: ModelConfig, params: dict, frozen: frozenset[str]):
    """A value_and_grad of cross-entropy + z-loss + aux loss w.r.t. the trainable parameters, then Adam."""
    import optax

    from gptsan.model.params import flatten, unflatten
    from gptsan.model.transformer import GPTSAN

    model, optimizer = GPTSAN(config), optax.adam(1e-4)
    flat = flatten(params)
    trainable = unflatten({k: v for k, v in flat.items() if k not in frozen})
    fixed = unflatten({k: v for k, v in flat.items() if k in frozen})

    def objective(trainable, fixed, batch, rng):
        out = model.apply({"params": unflatten({**flatten(trainable), **flatten(fixed)})}, batch["x"], train=True,
                          rngs={"jitter": rng})
        log_z = jax.nn.logsumexp(out.logits, axis=-1)
        target = jnp.take_along_axis(out.logits, batch["y"][..., None], axis=-1)[..., 0]
        return jnp.mean(log_z - target + 1e-4 * log_z**2) + out.aux_loss

    def step(state, batch):
        trainable, fixed, opt_state, count = state
        loss, grads = jax.value_and_grad(objective)(trainable, fixed, batch, jax.random.key(count))
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), fixed, opt_state, count + 1), {"loss": loss}

    return jax.jit(step, donate_argnums=0), (trainable, fixed, optimizer.init(trainable), jnp.zeros((), jnp.int32))


def compile_step(step, state, batch):
    """The step compiled once for these shapes, and XLA's FLOP count of it (None where not reported; XLA
    counts each loop body once whatever its trip count: the MoE's per-window-size expert loops, most of which
    run zero times, are overcounted)."""
    compiled = step.lower(state, batch).compile()
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        cost = None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return compiled, (float(cost["flops"]) if cost and "flops" in cost else None)


def minor_page_faults() -> int | None:
    """This process's minor page faults so far (None where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


STEADY_STEP_PAGE_FAULTS = 10_000  # a step that grows the heap takes ~500,000 (bench-small)
MAX_WARMUP_STEPS = 5


def warm_up(one_step, max_steps: int = MAX_WARMUP_STEPS) -> int:
    """Runs one_step until a step no longer grows the heap, at most `max_steps` times; returns how many
    ran. The first steps allocate the heap the step reuses from then on, and with oneDNN's buffers fragmenting
    it (gptsan/train/compiler_options.py) the second or third step can still grow it by 2 GB: such a step takes
    ~500,000 page faults and 0.5-3 s longer (bench-small). Timed steps should be the steady state a training
    run spends its time in, so warming up stops at the first step with fewer than STEADY_STEP_PAGE_FAULTS."""
    for count in range(1, max_steps + 1):
        before = minor_page_faults()
        one_step()
        if before is None or minor_page_faults() - before < STEADY_STEP_PAGE_FAULTS:
            return count
    return max_steps


def prepare_train(config: ModelConfig, batch: int, trainable: str):
    """A warmed-up callable running one train step, and what a record needs to know about it."""
    step, state, step_name = train_step_and_state(config, trainable)
    data = random_batch(config, batch)
    compiled, counted = compile_step(step, state, data)
    holder = [state]
    tokens = batch * config.num_contexts
    info = {"tokens": tokens, "train_step": step_name, "xla_flops_per_token": counted / tokens if counted else None}

    def one_step():
        holder[0], metrics = compiled(holder[0], data)
        info["loss"] = float(metrics["loss"])

    info["warmup_steps"] = warm_up(one_step)
    return one_step, info


def train_record(name: str, config: ModelConfig, batch: int, trainable: str, info: dict, seconds: list[float],
                 peak: float) -> dict:
    """The JSON record of one mode: best-step figures (and the median step's), against the best peak."""
    per_token = flops_per_token(config, config.num_contexts, trainable)
    tokens_per_s = info["tokens"] / min(seconds)
    return {
        "bench": "train",
        "config": name,
        "batch": batch,
        "dtype": config.dtype,
        "tokens_per_s": round(tokens_per_s, 1),
        "trainable": trainable,
        "flops_per_token": per_token,
        "flop_per_s": round(per_token * tokens_per_s),
        "matmul_peak_flop_per_s": round(peak),
        "peak_fraction": round(per_token * tokens_per_s / peak, 4),
        "median_tokens_per_s": round(info["tokens"] / float(np.median(seconds)), 1),
        "xla_flops_per_token": info["xla_flops_per_token"],
        "train_step": info["train_step"],
        "warmup_steps": info["warmup_steps"],
        "loss": round(info["loss"], 4),
        "steps": len(seconds),
        "load": machine_load(),
    }


def run(name: str, batch: int, dtype: str, steps: int, modes: list[str]) -> list[dict]:
    config = load_config(config_path(name), dtype=dtype)
    run_matmul, matmul_flops = prepare_matmul(dtype)
    records = []
    for trainable in modes:
        one_step, info = prepare_train(config, batch, trainable)
        times = interleaved({"matmul": run_matmul, "train": one_step}, steps)
        peak = matmul_flops / min(times["matmul"])
        records.append(train_record(name, config, batch, trainable, info, times["train"], peak))
        print(json.dumps(records[-1]), flush=True)
    return records


def comma_list(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    """`a,b` -> ["a", "b"], each one of `allowed`."""
    items = [item for item in value.split(",") if item]
    if not items or set(items) - set(allowed):
        raise UserError(f"{flag}: expected a comma-separated subset of {', '.join(allowed)}")
    return items


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bench-small", help="preset under configs/ or a parameters.json")
    parser.add_argument("--batch", type=positive_integer, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=positive_integer, default=5,
                        help="timed steps, after the warm-up (see warm_up)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: all, extended")
    args = parser.parse_args(argv)
    args.modes = comma_list(args.modes, MODES, "--modes")
    return args


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    run(args.config, args.batch, args.dtype, args.steps, args.modes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
