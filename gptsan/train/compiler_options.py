"""XLA options for compiling the train and eval steps: oneDNN for the matmuls on x86 CPUs.

XLA's CPU backend runs a batched matmul on one thread: attention's products (B x H small matrices of
T x dh) reached ~220 GFLOP/s on a 2-core host whose large matmuls reach 450-490, so a training step's
attention used half the machine. oneDNN, given each matmul on its own (`INDIVIDUAL_DOT`), spreads them over
the cores: 310-440 GFLOP/s, the large matmuls as before. (Its `DOT` fusion type, which also pulls
element-wise producers into the matmul, aborted the process on exp -> matmul with jaxlib 0.10.2.)
Generation does not use it: oneDNN's matrix-vector products ran batch-1 decoding at a third of the speed.

With more than one CPU device in the process (`--xla_force_host_platform_device_count`, as the tests and
`gptsan-plan` simulate a mesh) the devices share the cores and oneDNN's threads oversubscribe them (the quick
demo on 8 such devices: 99 s -> 125 s), so the steps keep XLA's defaults there.
XLA's persistent compilation cache cannot store a program with oneDNN matmuls (jaxlib 0.10.2: "ToProto is not
implemented for thunk kind: onednn-fusion", a warning at every save), so where one is configured
(JAX_COMPILATION_CACHE_DIR) the steps keep XLA's defaults and are cached. Set GPTSAN_ONEDNN_MATMULS=0 to
compile with XLA's defaults always.

The price is memory. oneDNN allocates its own buffers inside some matmuls, every step: a re-laid-out copy of an
operand it reads transposed or as the right-hand side (bench-small: 299 MB for the vocabulary projection's
weight gradient, 74 MB for the tied table, and 20-23 MB ones). They are allocated while the step's
2.1 GB scratch buffer is live and leave the heap fragmented, so now and then the scratch buffer no longer fits
where it was and the heap grows by its size: a bench-small step then takes 518,000 page faults (+0.5-5 s) and the
resident memory grows by 2 GB, twice in 40 steps (5.0 GB resident with XLA's defaults; 8.1 GB, then 10.1 GB,
with oneDNN; jaxlib 0.10.2; another run: 7.9, 10.0, then 12.0 GB within 15 steps after warming up).
GPTSAN_ONEDNN_MATMULS=0 trades the speed back for the memory.

On x86 CPUs without AVX-512 (AMD Zen 1-3, Intel client CPUs) it is off unless GPTSAN_ONEDNN_MATMULS=1, which
is not safe there. Without AVX-512 oneDNN runs every float32 matmul through its gemm-based implementation
(`gemm:jit:f32` in ONEDNN_VERBOSE's lines, every dot of the step), which for a batched product (attention's
per-head products) calls its sgemm inside its own `parallel` over the batch, and the sgemm parallelizes again:
in jaxlib 0.10.2 XLA's thread pool for oneDNN (`OneDnnThreadPool::parallel_for`) mishandles that nesting. A step
with num_contexts 1280 and a 36,000-token vocabulary (GPTSAN's own shapes, a small model) hung for good at its
first step in 6 of 6 runs at two model widths (two of XLA's threads waiting in nested `parallel`s, no thread
left to run their work), and at width 128 aborted with a corrupted heap ("double free or corruption", the free
inside the nested `parallel_for`) in 3 of 3 runs; pinned to one core (`taskset -c 0`), 2 of 2 ran (2-vCPU AMD
EPYC, Zen 1; jaxlib 0.10.2). AVX-512 CPUs get other oneDNN matmul kernels, and there, in months of the suite's
benchmarks and tests, no step ever hung or crashed.
"""

from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp

CPUINFO = "/proc/cpuinfo"
ONEDNN_MATMULS = {"xla_cpu_use_onednn": True,
                  "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def step_compiler_options(platform_name: str, local_devices: int) -> dict | None:
    """`jax.jit`'s compiler_options for a train or eval step on `platform_name` ("cpu", "gpu", "tpu") with
    `local_devices` devices in this process: oneDNN matmuls on one x86 CPU device with AVX-512 (or any x86 CPU
    with GPTSAN_ONEDNN_MATMULS=1) whose jaxlib accepts the options, else None (XLA's defaults)."""
    chosen = os.environ.get("GPTSAN_ONEDNN_MATMULS", "")
    if (platform_name != "cpu" or local_devices != 1 or chosen == "0"
            or platform.machine().lower() not in ("x86_64", "amd64") or jax.config.jax_compilation_cache_dir
            or (chosen != "1" and not has_avx512())):
        return None
    try:  # a jaxlib without these options refuses them at compile time
        jax.jit(lambda a: a @ a, compiler_options=ONEDNN_MATMULS).lower(jnp.ones((2, 2))).compile()
    except Exception:  # noqa: BLE001 - any refusal means: keep XLA's defaults
        return None
    return dict(ONEDNN_MATMULS)


def has_avx512() -> bool:
    """Whether this CPU has AVX-512 (Linux's /proc/cpuinfo flags; False where that cannot be read)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as cpuinfo:
            return any(line.startswith("flags") and " avx512f" in line for line in cpuinfo)
    except OSError:
        return False
