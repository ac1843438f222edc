"""Multi-process start-up with `jax.distributed`: one process per host (TPU pod slice, GPU node, CPU box).

    initialize_processes("10.0.0.1:8476", num_processes=2, process_id=0)  # GPU/CPU: from the flags
    initialize_processes()  # TPU pods, SLURM, Open MPI: JAX reads the cluster's own environment

After it, `jax.devices()` lists every process's devices and one jitted step runs over all of them (SPMD):
each process feeds its share of the batch (the data pipeline reads files/records k, k+P, ...,
`make_array_from_process_local_data` assembles the global batch), Orbax writes each checkpoint once
(every process writes its own shards, process 0 the metadata) and only process 0 logs.
CPU processes exchange collectives over gloo (JAX's default CPU client has no cross-process collectives).
"""

from __future__ import annotations

from gptsan.errors import UserError


def initialize_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> None:
    """Join this process to the run; must come before the first JAX computation."""
    import jax

    if coordinator_address and (not num_processes or num_processes < 1 or process_id is None
                                or not 0 <= process_id < num_processes):
        raise UserError("--coordinator_address: also give --num_processes N and --process_id in 0..N-1")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address or None, num_processes or None,
                                   process_id if coordinator_address else None)
    except (RuntimeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--coordinator_address {coordinator_address}: cannot join the run ({reason})") from None

