"""Training: a pure jitted step over an explicit state, Orbax checkpoints, one straight loop (`run`).

gs:// I/O (tfrecords, JSON, Orbax checkpoints) takes the same code path for real GCS and a local emulator;
see gptsan/__init__.py and docs/gcs.md.
"""
