"""Training: a pure jitted step over an explicit state, Orbax checkpoints, one straight loop (`run`)."""
