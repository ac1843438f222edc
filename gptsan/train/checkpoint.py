"""Train-state checkpoints with Orbax in `train_params.output_dir` (local or gs://).

Saved every `checkpoint_per_steps` steps and every `checkpoint_per_hours` hours (async), on request
(preemption) and at the end; `max_to_keep_save` kept. A checkpoint holds the whole TrainState (parameters,
optimizer state, loss scale, step, rng and data position) and the run's parameters.json.

A save that fails (a gs:// bucket deleted during the run, the storage server out of reach, permission refused,
a full disk) is one UserError naming output_dir, the step and what failed. Orbax reports such a failure of a
save in flight from its background threads, in pages of logged tracebacks, and may then raise the error at the
next save, at close, or not at all (it logs "one or more items may not be finalized" and goes on): while a save
is in flight its error logs are held back, and the save counts as failed when it raised or logged an error.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import flax.serialization
import numpy as np
import orbax.checkpoint as ocp

from gptsan import storage
from gptsan.checkpoint.native import drop_late_orbax_reads
from gptsan.checkpoint.validate import error_summary
from gptsan.errors import AbandonsBackgroundWork, UserError, path_error
from gptsan.train.state import TrainState


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int, every_steps: int, every_hours: float,
                 async_save: bool = True, processes: int = 1, time_check_every: int = 1):
        self.every_steps = max(int(every_steps), 0)
        self.every_seconds = float(every_hours) * 3600.0
        self.shared = processes > 1
        self.time_check_every = max(int(time_check_every), 1)
        # cleanup_tmp_directories: a save cut short (a second Ctrl-C, a killed process) leaves a
        # `STEP.orbax-checkpoint-tmp` folder, removed when the next run starts (one run at a time holds the
        # output_dir, local or gs://: gptsan/train/output_lock.py).
        options = ocp.CheckpointManagerOptions(max_to_keep=max(int(max_to_keep), 1), create=True,
                                               enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.directory = str(directory)
        self.manager = ocp.CheckpointManager(storage.absolute(self.directory), options=options)
        # Orbax removes them in a thread that only its next save waits for (not `close`): a run that ended before
        # saving (a resume refused for another --optimizer) exited while the thread ran, and the interpreter's
        # shutdown printed its "cannot schedule new futures" traceback after the error line. Waited for here
        # (no public call waits for it in orbax-checkpoint 0.12.8; tests/test_train_resume.py checks it is waited).
        wait_for_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait_for_cleanup is not None:
            wait_for_cleanup()
        self.last_save = time.monotonic()
        self.last_saved_step = self.manager.latest_step()
        self.newest_complete = self.last_saved_step  # the newest step whose save is known to have completed
        self.in_flight: int | None = None  # the step whose save was started and not yet seen to complete
        self.held_errors = HeldOrbaxErrors()
        drop_late_orbax_reads()  # a failed restore's or save's other reads, still in flight
        self._saved_run: tuple[int, dict] | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_run(self) -> dict:
        """The record of the run that saved the latest checkpoint (its settings), without its state."""
        step = self.manager.latest_step()
        if self._saved_run is not None and self._saved_run[0] == step:  # read once (a gs:// read is slow)
            return self._saved_run[1]
        try:
            run = self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
        except Exception as err:  # orbax raises several types for unreadable data
            raise self.unreadable(step, err) from None
        self._saved_run = (step, run)
        return run

    def unreadable(self, step: int, err: Exception) -> UserError:
        return UserError(f"{self.directory}: cannot resume from its step-{step} checkpoint (truncated, corrupt or "
                         f"from another model?): {error_summary(err)}; move {step}/ aside to resume from an "
                         "earlier one")

    def restore(self, abstract_state: TrainState) -> TrainState:
        """The latest checkpoint's state, laid out as `abstract_state` (shapes, dtypes and shardings)."""
        target = flax.serialization.to_state_dict(abstract_state)
        step = self.manager.latest_step()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as err:  # orbax/tensorstore raise several types for unreadable or mismatched data
            raise self.unreadable(step, err) from None
        return flax.serialization.from_state_dict(abstract_state, restored["state"])

    def due(self, step: int) -> bool:
        """Whether to save after `step` (called after every step, by every process)."""
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        if self.every_seconds <= 0:
            return by_steps
        by_time = time.monotonic() - self.last_save >= self.every_seconds
        if self.shared:
            # A save is collective, so every process must decide alike; their clocks do not. Process 0's decides,
            # at every `time_check_every`-th step only (the broadcast waits for the step, as logging does).
            from jax.experimental import multihost_utils

            by_time = step % self.time_check_every == 0 and bool(
                multihost_utils.broadcast_one_to_all(np.asarray(by_time)))
        return by_steps or by_time

    def save(self, step: int, state: TrainState, run: dict[str, Any]) -> None:
        if step == self.last_saved_step:  # e.g. the final save right after a periodic one
            return
        self.finish_save_in_flight()
        self.in_flight = step
        logging.getLogger("absl").addFilter(self.held_errors)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)), run=ocp.args.JsonSave(run)),
                force=True)
        except Exception as err:  # orbax/tensorstore/gcsfs raise several types
            raise self.save_failed(err) from None
        self.last_save = time.monotonic()
        self.last_saved_step = step

    def finish_save_in_flight(self) -> None:
        """Wait for the save in flight (async) to finish; a UserError when it failed."""
        if self.in_flight is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self.save_failed(err) from None
        if self.held_errors.records:  # failed without raising
            raise self.save_failed(self.held_errors.first_error())
        logging.getLogger("absl").removeFilter(self.held_errors)
        self.newest_complete, self.in_flight = self.in_flight, None

    def save_failed(self, err: BaseException) -> AbandonsBackgroundWork:
        """The one-line error for the save in flight; Orbax's held error logs are dropped (the save's threads
        may log more while the process ends: the filter stays), and so are its writes still retrying."""
        logged = [record.exc_info[1] for record in self.held_errors.records if record.exc_info and record.exc_info[1]]
        self.held_errors.records.clear()
        reason = storage.remote_failure(self.directory, err, *logged) if storage.is_remote(self.directory) else \
            error_summary(err)
        newest = f"the last checkpoint saved is step {self.newest_complete}" if self.newest_complete is not None \
            else "no checkpoint was saved before it"
        failed = f"{self.directory}: saving the step-{self.in_flight} checkpoint failed"
        return AbandonsBackgroundWork(f"{failed}: {reason}; {newest}")

    @contextlib.contextmanager
    def errors_abandon_the_save_in_flight(self):
        """An error that ends the run while a save is in flight (a UserError, or an OSError about a path: with a
        gs:// output_dir failing, the metrics file's write can fail before the save does) becomes an
        AbandonsBackgroundWork with the same line, so the tool exits after it instead of waiting for Orbax's save
        thread, not a daemon, while TensorStore retries its writes (a bucket deleted mid-run: 4 min and more)."""
        try:
            yield
        except AbandonsBackgroundWork:
            raise
        except UserError as err:
            if self.in_flight is None:
                raise
            raise AbandonsBackgroundWork(str(err)) from err
        except OSError as err:
            if self.in_flight is None or err.filename is None:
                raise
            raise AbandonsBackgroundWork(path_error(err)) from err

    def close(self) -> None:
        """Wait for async saves to finish, then release the manager."""
        self.finish_save_in_flight()
        self.manager.close()


class HeldOrbaxErrors(logging.Filter):
    """Holds back Orbax's error logs (with their tracebacks) while a save is in flight, instead of printing them."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "orbax" in record.pathname:
            self.records.append(record)
            return False
        return True

    def first_error(self) -> BaseException:
        """The exception of the first held log, or its message as one."""
        record = self.records[0]
        if record.exc_info and record.exc_info[1] is not None:
            return record.exc_info[1]
        return RuntimeError(record.getMessage())
