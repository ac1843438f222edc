"""A few training steps of the mini model on a data 2 x expert 2 x model 2 mesh, as one process of a
multi-process run (script) or in-process over 8 local devices (import): the test compares the two.

    python tests/distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID CHECKPOINT_DIR
prints the losses (process 0 only) as one JSON line.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

STEPS = 3
GLOBAL_BATCH = 8


def train_losses(checkpoint_dir: str | None = None) -> list[float]:
    import jax
    import numpy as np

    from gptsan.data.schema import FEATURES
    from gptsan.model.params import abstract_params, init_params
    from gptsan.model.sharding import batch_sharding, make_mesh, under_mesh
    from gptsan.train.checkpoint import Checkpointer
    from gptsan.train.loop import state_shardings
    from gptsan.train.optim import make_optimizer
    from gptsan.train.precision import LossScale
    from gptsan.train.state import create_state
    from gptsan.train.step import StepOptions, make_train_step
    from tests.train_support import counting_corpus, memory_batches, mini_config

    config = mini_config(routing="capacity", group_size=16)
    mesh = make_mesh(model=2, expert=2)
    optimizer, schedule = make_optimizer("adam", 3e-3, 0)
    init = functools.partial(create_state, frozen_names=frozenset(), optimizer=optimizer, seed=0,
                             loss_scale=LossScale.for_dtype("float32"))
    shardings = state_shardings(jax.eval_shape(init, abstract_params(config)), config, mesh, optimizer,
                                frozenset())
    state = jax.jit(lambda: init(init_params(config, 0)), out_shardings=shardings)()
    batch_shard = {name: batch_sharding(mesh) for name in FEATURES}
    step = jax.jit(under_mesh(make_train_step(config, optimizer, schedule, StepOptions(spout="uniform")), mesh),
                   in_shardings=(shardings, batch_shard), out_shardings=(shardings, None), donate_argnums=0)
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
