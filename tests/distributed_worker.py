"""A few training steps of the mini model on a data 2 x expert 2 x model 2 mesh, as one process of a
multi-process run (script) or in-process over 8 local devices (import): the test compares the two.

    python tests/distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID CHECKPOINT_DIR
prints the losses (process 0 only) as one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = 3
GLOBAL_BATCH = 8


def train_losses(checkpoint_dir: str | None = None) -> list[float]:
    import jax
    import numpy as np

    from gptsan.model.sharding import make_mesh
    from gptsan.train.checkpoint import Checkpointer
    from tests.train_support import counting_corpus, memory_batches, mini_config, sharded_training

    state, step, batch_shard = sharded_training(mini_config(routing="capacity", group_size=16),
                                                make_mesh(model=2, expert=2), spout="uniform")
    stream = memory_batches(counting_corpus(32, 16, 128, period=8), GLOBAL_BATCH)
    rows = GLOBAL_BATCH // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    losses = []
    for _ in range(STEPS):
        batch = next(stream)  # every process sees the global batch and feeds only its own rows
        local = {name: np.asarray(value[mine]) for name, value in batch.items()}
        global_batch = {name: jax.make_array_from_process_local_data(batch_shard[name], value)
                        for name, value in local.items()}
        state, metrics = step(state, global_batch)
        losses.append(float(metrics["loss"]))
    if checkpoint_dir:
        checkpointer = Checkpointer(checkpoint_dir, max_to_keep=1, every_steps=0, every_hours=0)
        checkpointer.save(STEPS, state, {"losses": losses})
        checkpointer.close()
    return losses


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gptsan.train.distributed import initialize_processes

    coordinator, num_processes, process_id, checkpoint_dir = sys.argv[1:5]
    initialize_processes(coordinator, int(num_processes), int(process_id))
    import jax

    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    losses = train_losses(checkpoint_dir)
    if jax.process_index() == 0:
        print(json.dumps({"losses": losses}))
