"""Gradient accumulation over k micro-batches equals one step on the k-times larger batch (also when the
micro-batches count different numbers of targets), and activation rematerialisation changes memory, not
results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.errors import UserError
from gptsan.model.params import flatten, init_params
from gptsan.model.transformer import GPTSAN
from gptsan.train.accumulate import make_accumulating_train_step, split_micro_batches
from gptsan.train.loss import lm_loss
from gptsan.train.optim import make_optimizer
from gptsan.train.precision import LossScale
from gptsan.train.state import create_state
from gptsan.train.step import StepOptions
from tests.train_support import counting_corpus, memory_batches, mini_config

# Comparable set-up: dropless routing (no token's fate depends on which other tokens share its batch),
# no router jitter (its random draws depend on the batch shape), routing groups of one row (group_size =
# T, so the aux loss's per-group means are the same groups either way), and every row counts T-1 target
# tokens (the loss is a per-token mean, so the mean of micro-batch means is the whole-batch mean).
# float32 on CPU; only the summation order differs. Measured over 3 steps: losses 1e-7 relative, gradient
# norms 1e-6 relative, parameters 6.6e-6 absolute (Adam's m/sqrt(v) magnifies rounding of tiny gradients;
# one step moves a parameter by up to lr = 3e-3).
TOLERANCE = 1e-5
PARAM_ATOL = 3e-5  # 1% of one step's largest move


def comparable_config(**runtime):
    return mini_config(routing="dropless", router_jitter=0.0, group_size=16, **runtime)


def run_steps(config, accumulate_steps, steps=3, unequal_targets=False, options=None, frozen=frozenset()):
    """`unequal_targets`: rows 0 and 4 (micro-batch 0 of 4) count 3 targets instead of 15 (the rest `y` = -1)."""
    optimizer, schedule = make_optimizer("adam", 3e-3, 0)
    state = create_state(init_params(config, 0), frozen, optimizer, 0, LossScale.for_dtype("float32"))
    step = jax.jit(make_accumulating_train_step(config, optimizer, schedule, options or StepOptions(),
                                                accumulate_steps))
    corpus = counting_corpus(32, 16, 128, period=8)
    corpus["num_input"] = np.arange(32) % 7  # prefixes of 0-6 tokens (read in hybrid mode only)
    stream = memory_batches(corpus, 8)
    losses, norms = [], []
    for _ in range(steps):
        batch = next(stream)
        if unequal_targets:
            batch = {**batch, "y": jnp.asarray(batch["y"]).at[jnp.asarray([0, 4]), 3:].set(-1)}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms, state


@pytest.mark.parametrize("unequal_targets", [False, True], ids=["equal targets", "unequal targets"])
def test_four_micro_batches_equal_one_batch_four_times_larger(unequal_targets):
    """With unequal targets each micro-batch's loss is weighted by its share of them: a micro-batch with 6
    targets among 96 weighs 1/16, not 1/4 (equal weights, as before: losses 0.04%, 0.06% and 1.6% off the
    whole batch's over three steps, against 1e-7 now)."""
    whole, whole_norms, whole_state = run_steps(comparable_config(), 1, unequal_targets=unequal_targets)
    accumulated, accumulated_norms, accumulated_state = run_steps(comparable_config(), 4,
                                                                  unequal_targets=unequal_targets)
    np.testing.assert_allclose(accumulated, whole, rtol=TOLERANCE)
    np.testing.assert_allclose(accumulated_norms, whole_norms, rtol=TOLERANCE)
    differences = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree_util.tree_leaves(accumulated_state.params), jax.tree_util.tree_leaves(whole_state.params),
        strict=True)]
    print("loss", whole, accumulated, "max parameter difference", max(differences))
    assert max(differences) < PARAM_ATOL
    assert whole[-1] < whole[0]  # the updates did something


def test_accumulated_fine_tune_with_prefixes_and_onehot_spout_equals_one_batch():
    """The same with the tied table and the first layers frozen (the head's path without the table's gradient),
    hybrid mode (each micro-batch row keeps its own num_input prefix) and the one-hot spout of each row's class."""
    options = StepOptions(mode="hybrid", spout="onehot")
    names = flatten(init_params(comparable_config()))
    frozen = frozenset(name for name in names if name.startswith(("model/wte", "model/att0")))
    whole, whole_norms, whole_state = run_steps(comparable_config(), 1, options=options, frozen=frozen)
    accumulated, accumulated_norms, accumulated_state = run_steps(comparable_config(), 4, options=options,
                                                                  frozen=frozen)
    np.testing.assert_allclose(accumulated, whole, rtol=TOLERANCE)
    np.testing.assert_allclose(accumulated_norms, whole_norms, rtol=TOLERANCE)
    for a, b in zip(jax.tree_util.tree_leaves(accumulated_state.params), jax.tree_util.tree_leaves(whole_state.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL)
    assert whole[-1] < whole[0]


def test_micro_batches_take_strided_rows_and_must_divide_the_batch():
    batch = {"x": jnp.arange(8)[:, None] * jnp.ones((1, 3), jnp.int32)}
    micro = split_micro_batches(batch, 4)
    assert micro["x"].shape == (4, 2, 3)
    assert micro["x"][:, :, 0].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(UserError, match="--accumulate_steps 3"):
        split_micro_batches(batch, 3)


def compiled_gradient(policy: str):
    """(loss, gradients) of the mini model with `policy`, and the compiled program's temporary bytes."""
    config = mini_config(routing="capacity", remat=policy)
    params = init_params(config, 0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (8, 16)), jnp.int32)

    def loss(params):
        out = GPTSAN(config).apply({"params": params}, ids, train=True, rngs={"jitter": jax.random.key(1)})
        return lm_loss(out.logits, ids).loss + out.aux_loss

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return compiled(params), compiled.memory_analysis().temp_size_in_bytes


def test_remat_gives_the_same_loss_and_gradients_and_keeps_fewer_activations():
    (plain_loss, plain_grads), plain_bytes = compiled_gradient("none")
    for policy in ("full", "dots"):
        (loss, grads), temporary_bytes = compiled_gradient(policy)
        # Recomputation repeats the same float32 operations: measured 3e-9 absolute on the gradients.
        assert float(loss) == pytest.approx(float(plain_loss), rel=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(plain_grads), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        print(policy, "temporary bytes", temporary_bytes, "without remat", plain_bytes)
        if policy == "full":
            assert temporary_bytes < plain_bytes
