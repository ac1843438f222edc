"""The original optimizer (Adam without bias correction, decoupled weight decay except biases, warmup then
inverse square root), clipping, and the dynamic loss scale, against hand-computed references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptsan.errors import UserError
from gptsan.train.optim import inverse_sqrt_schedule, make_optimizer, schedule_count, weight_decay_mask
from gptsan.train.precision import LossScale, compute_dtype


def test_schedule_warms_up_linearly_then_stays_flat_then_decays():
    schedule = inverse_sqrt_schedule(0.01, 100)  # 1/base_lr^2 = 10,000
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 50, 99)], [0.0, 0.005, 0.0099], rtol=1e-6)
    np.testing.assert_allclose([float(schedule(s)) for s in (100, 5000, 10_000)], [0.01] * 3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(40_000)), 1 / 200, rtol=1e-6)


def test_weight_decay_spares_only_names_with_bias():
    params = {"model": {"dense_1": {"bias": 0}, "an0": {"g": 0, "b": 0}, "wob": 0,
                        "mlp2": {"p1": {"kernel": 0, "bias": 0}}}}
    expected = {"dense_1": {"bias": False}, "an0": {"g": True, "b": True}, "wob": True,
                "mlp2": {"p1": {"kernel": True, "bias": False}}}
    assert weight_decay_mask(params) == {"model": expected}


def test_adam_matches_the_original_update_without_bias_correction():
    lr, wd, b1, b2, eps = 0.1, 0.01, 0.9, 0.999, 1e-8
    optimizer, _ = make_optimizer("adam", lr, 0)
    params = {"w": {"kernel": jnp.asarray([1.0, -2.0])}, "b": {"bias": jnp.asarray([0.5])}}
    grads = [{"w": {"kernel": jnp.asarray([0.3, -0.1])}, "b": {"bias": jnp.asarray([0.2])}},
             {"w": {"kernel": jnp.asarray([-0.5, 0.4])}, "b": {"bias": jnp.asarray([0.1])}}]
    state = optimizer.init(params)
    expect = {"w": np.array([1.0, -2.0]), "b": np.array([0.5])}
    m = {k: np.zeros_like(v) for k, v in expect.items()}
    v = {k: np.zeros_like(v) for k, v in expect.items()}
    for g in grads:
        updates, state = optimizer.update(g, state, params)
        params = {"w": {"kernel": params["w"]["kernel"] + updates["w"]["kernel"]},
                  "b": {"bias": params["b"]["bias"] + updates["b"]["bias"]}}
        for key, leaf in (("w", "kernel"), ("b", "bias")):
            grad = np.asarray(g[key][leaf])
            m[key] = b1 * m[key] + (1 - b1) * grad
            v[key] = b2 * v[key] + (1 - b2) * grad**2
            update = m[key] / (np.sqrt(v[key]) + eps) + (wd * expect[key] if key == "w" else 0)
            expect[key] = expect[key] - lr * update
    np.testing.assert_allclose(params["w"]["kernel"], expect["w"], rtol=1e-6)
    np.testing.assert_allclose(params["b"]["bias"], expect["b"], rtol=1e-6)


def _two_updates(optimizer, grads):
    params = {"w": jnp.zeros(2)}
    state = optimizer.init(params)
    for g in grads:
        updates, state = optimizer.update({"w": jnp.asarray(g)}, state, params)
    return np.asarray(updates["w"])


def test_clip_gradients_rescales_to_the_global_norm():
    """Clipping at 0.01 equals feeding the unclipped optimizer gradients rescaled to norm <= 0.01 (the
    second, small gradient passes unchanged), and differs from not clipping."""
    raw = [np.array([3.0, 4.0]), np.array([0.001, -0.002])]
    clipped = [raw[0] * 0.01 / 5.0, raw[1]]
    with_clip, _ = make_optimizer("adam", 0.1, 0, clip_norm=0.01)
    without, _ = make_optimizer("adam", 0.1, 0)
    np.testing.assert_allclose(_two_updates(with_clip, raw), _two_updates(without, clipped), rtol=1e-6)
    assert not np.allclose(_two_updates(with_clip, raw), _two_updates(without, raw), rtol=1e-2)


def test_adamw_cosine_needs_a_length_and_bad_names_are_user_errors():
    with pytest.raises(UserError, match="--max_training_step"):
        make_optimizer("adamw_cosine", 1e-3, 10, total_steps=-1)
    with pytest.raises(UserError, match=r"^--optimizer adamw_cosine: --max_training_step 10 leaves no steps for the "
                                        r"cosine after train_params.num_warmup_steps 10$"):  # optax's ValueError
        make_optimizer("adamw_cosine", 1e-3, 10, total_steps=10)
    with pytest.raises(UserError, match="--optimizer"):
        make_optimizer("sgd", 1e-3, 10)
    for norm in (0.0, -1.0, float("nan"), float("inf")):  # nan skipped every step's update
        with pytest.raises(UserError, match=rf"^--clip_gradients: expected a finite positive norm, got {norm}$"):
            make_optimizer("adam", 1e-3, 10, clip_norm=norm)
    with pytest.raises(UserError, match="--use_bfloat16 and --use_mixed_precision"):
        compute_dtype(True, True)


def test_dynamic_loss_scale_shrinks_on_overflow_and_grows_after_good_steps():
    scale = LossScale.for_dtype("float16", period=3)
    assert float(scale.scale) == 2.0**15
    scale = scale.update(jnp.asarray(False))
    assert float(scale.scale) == 2.0**14 and int(scale.good_steps) == 0
    for _ in range(2):
        scale = scale.update(jnp.asarray(True))
    assert float(scale.scale) == 2.0**14 and int(scale.good_steps) == 2
    scale = scale.update(jnp.asarray(True))
    assert float(scale.scale) == 2.0**15 and int(scale.good_steps) == 0
    static = LossScale.for_dtype("bfloat16")
    assert float(static.update(jnp.asarray(False)).scale) == 1.0


def _run(optimizer, params, grads):
    state = optimizer.init(params)
    for g in grads:
        updates, state = optimizer.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_adamw_cosine_equals_optax_adamw_on_a_warmup_cosine_schedule(clip_norm):
    """12 updates (3 of warmup, the cosine over 10, then its floor of 0) against optax's own AdamW (bias
    correction, weight decay 0.01 decoupled and masked off the biases), behind global-norm clipping when asked.
    Gradients of mixed sizes, so that clipping at 0.5 acts on some steps only."""
    rng = np.random.default_rng(0)
    params = {"w": {"kernel": jnp.asarray([1.0, -2.0, 0.5])}, "b": {"bias": jnp.asarray([0.5, 0.1])}}
    grads = [jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape) * rng.choice([1e-3, 1.0]),
                                                          jnp.float32), params) for _ in range(12)]
    ours, schedule = make_optimizer("adamw_cosine", 0.1, 3, clip_norm=clip_norm, total_steps=10)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 1, 3, 10, 11)],
                               [0.0, 0.1 / 3, 0.1, 0.0, 0.0], atol=1e-7)
    reference = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10), 0.9, 0.999, 1e-8,
                            weight_decay=0.01, mask={"w": {"kernel": True}, "b": {"bias": False}})
    if clip_norm is not None:
        reference = optax.chain(optax.clip_by_global_norm(clip_norm), reference)
    got, want = _run(ours, params, grads), _run(reference, params, grads)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(got["w"]["kernel"], params["w"]["kernel"])


def test_adam_warms_up_over_the_update_count():
    """The original Adam's updates read the warmup by the number of updates applied: lr * t / warmup for update
    t = 0, 1, ..., (so the first update moves nothing), then base_lr; weight decay scaled by the same rate."""
    lr, warmup, wd, b1, b2, eps = 0.1, 4, 0.01, 0.9, 0.999, 1e-8
    optimizer, _ = make_optimizer("adam", lr, warmup)
    grads = [np.array([0.3, -0.1]), np.array([-0.5, 0.4]), np.array([0.2, 0.2]), np.array([0.1, -0.3]),
             np.array([0.05, 0.6]), np.array([-0.2, 0.1])]
    params = {"w": jnp.asarray([1.0, -2.0])}
    state = optimizer.init(params)
    expect, m, v = np.array([1.0, -2.0]), np.zeros(2), np.zeros(2)
    for t, g in enumerate(grads):
        updates, state = optimizer.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        rate = lr * min(t / warmup, 1.0)
        expect = expect - rate * (m / (np.sqrt(v) + eps) + wd * expect)
        np.testing.assert_allclose(params["w"], expect, rtol=1e-6, err_msg=f"update {t}")
    assert int(schedule_count(state)) == len(grads)
