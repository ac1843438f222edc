"""The train step: frozen parameters stay bit-identical without optimizer slots, the loss falls (float32,
bfloat16), float16 overflow skips the step, and the spout path carries the record's class id. Its gradients equal
autodiff of the plain loss, its loss terms the spec's on the reference logits, and the learning rate it logs is
the one it applies."""

import importlib.abc
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.errors import UserError
from gptsan.model import load_config, unflatten
from gptsan.model.params import flatten, init_params
from gptsan.train.metrics import eval_summary
from gptsan.train.optim import make_optimizer
from gptsan.train.precision import LossScale
from gptsan.train.state import check_frozen_names, create_state
from gptsan.train.step import StepOptions, make_train_step
from tests.train_support import class_corpus, counting_corpus, memory_batches, mini_config


def extended_fixture(tiny_tf_dir, tiny_names, extra: int = 2):
    """The fixture model with `extra` new extended layers, as the converter makes it: original weights
    copied, new layers and the re-shaped `pasts/out/kernel` freshly initialised."""
    base = load_config(tiny_tf_dir / "parameters.json")
    config = base.replace(num_ext_layers=base.num_ext_layers + extra, routing="capacity")
    fresh = flatten(init_params(config, seed=1))
    for name, value in tiny_names.items():
        if fresh[name].shape == value.shape:
            fresh[name] = jnp.asarray(value)
    return config, unflatten(fresh)


def train(config, params, frozen, corpus, steps, *, lr=3e-3, warmup=0, spout="none", batch_size=8):
    optimizer, schedule = make_optimizer("adam", lr, warmup)
    state = create_state(params, frozen, optimizer, 0, LossScale.for_dtype(config.dtype))
    step = jax.jit(make_train_step(config, optimizer, schedule, StepOptions(spout=spout)))
    stream = memory_batches(corpus, batch_size)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, next(stream))
        losses.append(float(metrics["cross_entropy"]))
    return state, losses, step


def test_frozen_parameters_bit_identical_and_without_optimizer_slots(tiny_tf_dir, tiny_names):
    config, params = extended_fixture(tiny_tf_dir, tiny_names)
    ignore = json.loads((tiny_tf_dir / "ignore-params.json").read_text())  # every original non-spout name
    frozen = check_frozen_names(ignore, config)
    corpus = counting_corpus(16, config.num_contexts, config.num_vocabulary)
    state, _, _ = train(config, params, frozen, corpus, steps=3, spout="onehot", batch_size=4)

    before, after = flatten(params), flatten(state.all_params)
    assert set(after) == set(before)
    for name in frozen:
        assert np.array_equal(np.asarray(after[name]), np.asarray(before[name])), name
    trainable = set(before) - frozen
    assert trainable == {n for n in before if n.startswith("pasts/") or any(
        f"{kind}{layer}/" in n for kind in ("att", "an", "ln", "mlp") for layer in (4, 5))}
    for name in trainable:
        assert not np.array_equal(np.asarray(after[name]), np.asarray(before[name])), name
    adam = state.opt_state[0]  # (adam moments, weight decay, learning rate)
    assert set(flatten(adam.mu)) == trainable and set(flatten(adam.nu)) == trainable
    slot_sizes = sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.opt_state))
    assert slot_sizes == 2 * sum(np.size(before[n]) for n in trainable) + 1  # + the schedule's step count


def test_ignore_list_naming_unknown_parameters_is_a_user_error(tiny_tf_dir):
    config = load_config(tiny_tf_dir / "parameters.json")
    with pytest.raises(UserError, match="model/att9/qkv/kernel"):
        check_frozen_names(["model/wte", "model/att9/qkv/kernel"], config)


# The counting corpus has 8 tokens, each followed by the next (mod 8): a model that ignores the context
# can do no better than the unigram entropy ln 8 = 2.08; a fresh model starts at ln 128 = 4.85.
UNIGRAM_ENTROPY = math.log(8)


@pytest.mark.parametrize("dtype, threshold", [
    # float32 reaches 1.12 after 80 steps (measured): below the unigram entropy, so it uses the context.
    ("float32", UNIGRAM_ENTROPY - 0.4),
    # bfloat16 measured 1.98 after 80 steps: it has learnt the corpus's token distribution (4.85 -> ~2.0).
    ("bfloat16", UNIGRAM_ENTROPY + 0.12),
])
def test_loss_falls_on_a_learnable_corpus(dtype, threshold):
    config = mini_config(routing="capacity", dtype=dtype)
    corpus = counting_corpus(64, config.num_contexts, config.num_vocabulary, period=8)
    _, losses, _ = train(config, init_params(config, 0), frozenset(), corpus, steps=80, warmup=5)
    assert losses[0] == pytest.approx(math.log(config.num_vocabulary), abs=0.1)
    assert np.mean(losses[-5:]) < threshold, losses[::10]


def test_float16_overflow_skips_the_step_and_keeps_finite_weights():
    config = mini_config(routing="capacity", dtype="float16")
    params = init_params(config, 0)
    corpus = counting_corpus(16, config.num_contexts, config.num_vocabulary, period=8)
    state, _, step = train(config, params, frozenset(), corpus, steps=2)
    batch = next(memory_batches(corpus, 8, seed=1))

    # Inject an overflow: a loss scale so large that the float16 backward pass overflows.
    overflowing = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(1e30)))
    skipped, metrics = step(overflowing, batch)
    assert not bool(metrics["update_applied"])
    for old, new in zip(jax.tree_util.tree_leaves((state.params, state.opt_state)),
                        jax.tree_util.tree_leaves((skipped.params, skipped.opt_state)), strict=True):
        assert np.array_equal(np.asarray(old), np.asarray(new))  # parameters and Adam's moments kept
    assert float(skipped.loss_scale.scale) == pytest.approx(5e29)
    assert int(skipped.step) == int(state.step) + 1

    # Training continues from there once the scale is sane, with finite weights.
    resumed = skipped.replace(loss_scale=skipped.loss_scale.replace(scale=jnp.float32(2.0**10)))
    for _ in range(3):
        resumed, metrics = step(resumed, batch)
        assert bool(metrics["update_applied"]) and np.isfinite(float(metrics["loss"]))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(resumed.params))


def expressive_frozen_model(config, seed=0):
    """A fresh mini model whose (frozen) head can make confident predictions (wte N(0,1), dense kernel
    N(0, 1/d); fresh GPTSAN init gives near-constant logits) and whose spout net passes a signal (kernels
    N(0, 1/P) instead of the vanishing N(0, 0.01) through eight tanh layers)."""
    rng = np.random.default_rng(seed)
    params = flatten(init_params(config, seed))
    for name, std in (("model/wte", 1.0), ("model/dense/kernel", config.num_hidden ** -0.5)):
        params[name] = jnp.asarray(rng.normal(0, std, params[name].shape), jnp.float32)
    for name in params:
        if name.startswith("pasts/"):
            spread = config.num_spout ** -0.5
            params[name] = jnp.asarray(rng.normal(0, spread, params[name].shape), jnp.float32)
    return unflatten(params)


def test_onehot_spout_carries_the_class_id():
    """Targets depend only on the record's class id (4 classes) and the inputs are noise: with every
    non-spout parameter frozen, only the spout path can bring the loss below ln 4 = 1.39, the best a model
    blind to the class can do. Measured: mean 0.63 over the last 100 of 600 steps (a spout fed uniform
    noise instead, same set-up: 5.1)."""
    config = mini_config(routing="capacity")
    params = expressive_frozen_model(config)
    frozen = frozenset(n for n in flatten(params) if not n.startswith("pasts/"))
    corpus = class_corpus(64, config.num_contexts, num_classes=4)
    _, losses, _ = train(config, params, frozen, corpus, steps=600, lr=3e-3, spout="onehot")
    assert np.mean(losses[-100:]) < math.log(4) - 0.5, losses[::50]


def test_metrics_file_is_strict_json_when_a_loss_is_not_finite(tmp_path):
    from gptsan.train.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), enabled=True, total_steps=2, first_step=0, progress=False)
    writer.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "accuracy": 0.5,
                     "expert_load": [[0.25, float("nan")]], "skipped": True})
    writer.close()

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=reject)
    assert row == {"step": 1, "split": "train", "loss": None, "grad_norm": None, "accuracy": 0.5,
                   "expert_load": [[0.25, None]], "skipped": True}


def test_a_resumed_run_drops_the_rows_it_trains_again(tmp_path):
    """A run killed after its last checkpoint had logged steps its successor trains again: they were in the
    file twice. The rows past the resumed step go (and a line the kill cut), the rows up to it stay."""
    from gptsan.train.metrics import MetricsWriter

    rows = [json.dumps({"step": step, "split": "train", "loss": 1.0}) + "\n" for step in range(1, 6)]
    rows.insert(3, json.dumps({"step": 3, "split": "eval", "loss": 2.0}) + "\n")
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 6, "spl')
    writer = MetricsWriter(str(tmp_path), enabled=True, total_steps=None, first_step=3, progress=False)
    writer.write(4, {"loss": 0.5})
    writer.close()
    logged = [(row["step"], row["split"]) for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text()
                                                          .splitlines())]
    assert logged == [(1, "train"), (2, "train"), (3, "train"), (3, "eval"), (4, "train")]


class ImportRecorder(importlib.abc.MetaPathFinder):
    """Records the top-level modules an import statement looks for (and finds none itself)."""

    def __init__(self):
        self.looked_for = set()

    def find_spec(self, fullname, path=None, target=None):
        self.looked_for.add(fullname.split(".")[0])
        return None


def test_tensorboard_events_hold_each_steps_scalars_and_expert_loads(tmp_path, monkeypatch):
    """The events hold what was written, and writing them does not import torch (tensorboardX did when torch
    was installed: 1.5 s more start-up)."""
    from gptsan.tf_runtime import tensorflow
    from gptsan.train.metrics import MetricsWriter

    recorder = ImportRecorder()
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    writer = MetricsWriter(str(tmp_path), enabled=True, total_steps=2, first_step=0, progress=False)
    writer.write(1, {"loss": 2.5, "accuracy": 0.25, "expert_load": [[0.75, 0.25]], "skipped": False})
    writer.write(2, {"loss": 2.0, "accuracy": 0.5, "expert_load": [[0.5, 0.5]], "skipped": False})
    writer.write(2, {"loss": 2.25}, prefix="eval")
    writer.close()
    assert "torch" not in recorder.looked_for

    tf = tensorflow()
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    seen = {}
    for event in tf.compat.v1.train.summary_iterator(str(events)):
        for value in event.summary.value:
            seen[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    assert seen == {("train/loss", 1): 2.5, ("train/accuracy", 1): 0.25,
                    ("train/expert_load/layer0/expert0", 1): 0.75, ("train/expert_load/layer0/expert1", 1): 0.25,
                    ("train/loss", 2): 2.0, ("train/accuracy", 2): 0.5,
                    ("train/expert_load/layer0/expert0", 2): 0.5, ("train/expert_load/layer0/expert1", 2): 0.5,
                    ("eval/loss", 2): 2.25}


def test_eval_metrics_weigh_each_target_token_once():
    """An evaluation over batches of 100 and 20 target tokens: the per-token means of the whole (a plain mean of
    the batch means gave the short batch the weight of the full one: loss 3.0, accuracy 0.25, tokens 60)."""
    rows = [{"loss": 2.0, "cross_entropy": 1.5, "accuracy": 0.5, "tokens": 100.0},
            {"loss": 4.0, "cross_entropy": 3.0, "accuracy": 0.0, "tokens": 20.0}]
    summary = eval_summary(rows)
    assert summary == pytest.approx({"loss": 280 / 120, "cross_entropy": 210 / 120, "accuracy": 50 / 120,
                                     "tokens": 120.0})
    # batches with no targets at all (every eval record without any): the plain mean, not a division by zero
    empty = eval_summary([{"loss": 1.0, "tokens": 0.0}, {"loss": 3.0, "tokens": 0.0}])
    assert empty == {"loss": 2.0, "tokens": 0.0}


def head_test_params(config, seed=0):
    """Fresh mini parameters with a tied table and vocabulary bias large enough that the head's gradients are far
    from zero (fresh GPTSAN init: wob 0 and near-constant logits)."""
    rng = np.random.default_rng(seed)
    params = flatten(init_params(config, seed))
    params["model/wte"] = jnp.asarray(rng.normal(0, 0.3, params["model/wte"].shape), jnp.float32)
    params["model/wob"] = jnp.asarray(rng.normal(0, 0.5, params["model/wob"].shape), jnp.float32)
    return unflatten(params)


@pytest.mark.parametrize("frozen", [(), ("model/wte",), ("model/wob",), ("model/wte", "model/wob")],
                         ids=["both trained", "table frozen", "bias frozen", "both frozen"])
def test_step_gradients_equal_autodiff_of_the_plain_loss(frozen):
    """The step's gradients (fused tied head with its hand-written gradient, told whether the table is trained;
    the table's gradient summed from the head and the embedding lookup) equal jax.grad of the definition:
    lm_loss on the model's logits plus the aux loss, with the same spout and router jitter draws. Measured:
    4e-7 relative for every parameter, in each combination of a trained or frozen table and bias."""
    from gptsan.model.transformer import GPTSAN
    from gptsan.train.loss import lm_loss
    from gptsan.train.state import merge_params
    from gptsan.train.step import loss_and_grads

    config = mini_config(routing="capacity")
    optimizer, _ = make_optimizer("adam", 1e-3, 0)
    state = create_state(head_test_params(config), frozenset(frozen), optimizer, 0, LossScale.for_dtype("float32"))
    batch = {k: jnp.asarray(v) for k, v in next(memory_batches(counting_corpus(16, 16, 128, period=8), 8)).items()}
    batch["y"] = batch["y"].at[0, 4:].set(-1)  # rows count different numbers of targets
    model = GPTSAN(config)

    def plain(trainable, frozen_params):
        spout_rng, jitter_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
        spout = jax.nn.one_hot(batch["i"] % config.num_spout, config.num_spout)
        out = model.apply({"params": merge_params(trainable, frozen_params)}, batch["x"], spout=spout, train=True,
                          rngs={"jitter": jitter_rng})
        return lm_loss(out.logits, batch["y"]).loss + out.aux_loss

    @jax.jit
    def both(state):
        ours, _, _ = loss_and_grads(model, StepOptions(spout="onehot"), state, batch)
        return ours, jax.grad(plain)(state.params, state.frozen)

    ours, want = map(flatten, both(state))
    assert set(ours) == set(want) == set(flatten(state.params))
    assert ("model/wte" in ours) == ("model/wte" not in frozen) and ("model/wob" in ours) == ("model/wob" not in frozen)
    for name, value in want.items():
        scale = float(jnp.abs(value).max())
        assert scale > 0, name
        np.testing.assert_allclose(ours[name], value, rtol=0, atol=1e-5 * scale, err_msg=name)


def fixture_batch(tiny_cases, class_ids=(0, 0), num_input=(0, 0)):
    """The fixture's input ids with next-token targets (some -1: row 0's positions 3-5, and each row's last)."""
    ids = tiny_cases["input_ids"]
    y = np.concatenate([ids[:, 1:], np.full((len(ids), 1), -1)], axis=1)
    y[0, 3:6] = -1
    return {"x": jnp.asarray(ids, jnp.int32), "y": jnp.asarray(y, jnp.int32), "i": jnp.asarray(class_ids, jnp.int32),
            "num_input": jnp.asarray(num_input, jnp.int32)}


def reference_terms(logits: np.ndarray, y: np.ndarray) -> dict:
    """Spec section 1's loss terms by hand (float64): cross-entropy over y != -1, 1e-4 * logZ^2, accuracy."""
    logits = logits.astype(np.float64)
    counted = y >= 0
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, np.where(counted, y, 0)[..., None], axis=-1)[..., 0]
    n = counted.sum()
    return {"cross_entropy": ((log_z - target) * counted).sum() / n, "z_loss": 1e-4 * (log_z**2 * counted).sum() / n,
            "accuracy": ((logits.argmax(-1) == y) * counted).sum() / n, "tokens": n}


@pytest.mark.parametrize("case, mode, spout, batch_args", [
    ("logits_causal", "lm", "none", {}),
    ("logits_prefix", "hybrid", "none", {"num_input": "num_precontext"}),
    ("logits_spout_onehot", "lm", "onehot", {"class_ids": "onehot classes"}),
], ids=["causal", "hybrid prefix", "onehot spout"])
def test_eval_step_terms_equal_the_spec_on_the_reference_logits(tiny, tiny_cases, case, mode, spout, batch_args):
    """The eval step's loss terms on the fixture model equal the spec's definitions computed by hand from the
    reference (HF port) logits: the record's num_input as the prefix in hybrid mode, and the one-hot spout of
    class id i mod P (ids 49 and 15 of P = 16: the fixture's one-hot vectors of classes 1 and 15)."""
    from gptsan.train.step import make_eval_step

    config, params = tiny
    arguments = {"num_input": tiny_cases["num_precontext"], "class_ids": [1 + 3 * config.num_spout, 15]}
    assert np.array_equal(np.eye(config.num_spout)[[1, 15]], tiny_cases["spout_onehot"])
    batch = fixture_batch(tiny_cases, **{key: arguments[key] for key in batch_args})
    optimizer, _ = make_optimizer("adam", 1e-3, 0)
    state = create_state(params, frozenset(), optimizer, 0, LossScale.for_dtype("float32"))
    metrics = jax.jit(make_eval_step(config, StepOptions(mode=mode, spout=spout)))(state, batch)
    want = reference_terms(tiny_cases[case], np.asarray(batch["y"]))
    for name in ("cross_entropy", "accuracy", "tokens"):
        assert float(metrics[name]) == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
    # loss = cross-entropy + z-loss + aux loss; the aux loss of this input is 0.031 (see the test below)
    aux = float(metrics["loss"]) - want["cross_entropy"] - want["z_loss"]
    assert 0.02 < aux < 0.04, aux


def test_aux_loss_equals_the_spec_on_the_hf_ports_router_probabilities(tiny, tiny_cases, tiny_hf_dir):
    """The training step's router aux loss (eval routing: no jitter; 48 tokens, one routing group) equals
    0.01 * E^2 * mean_e(mean router probability of e * fraction of tokens routed to e), summed over the Switch
    layers, computed from the HF port's router logits (taken with forward hooks: the port's own router
    outputs crash, spec section 7)."""
    torch = pytest.importorskip("torch", reason="torch is an optional peer dependency ([peer] extra)")
    transformers = pytest.importorskip("transformers", reason="transformers is an optional peer dependency")
    from gptsan.model.transformer import GPTSAN
    from gptsan.train.step import _forward

    config, params = tiny
    hf = transformers.GPTSanJapaneseForConditionalGeneration.from_pretrained(tiny_hf_dir).eval()
    router_logits = []
    for layer in range(config.num_switch_layers):
        hf.model.blocks[layer].feed_forward.mlp.router.classifier.register_forward_hook(
            lambda module, inputs, output: router_logits.append(output.detach().numpy().astype(np.float64)))
    with torch.no_grad():
        hf(input_ids=torch.tensor(tiny_cases["input_ids"]))
    want = 0.0
    for logits in router_logits:
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = (probs / probs.sum(-1, keepdims=True)).reshape(-1, config.num_experts)
        routed = np.eye(config.num_experts)[probs.argmax(-1)].mean(0)
        want += 0.01 * config.num_experts**2 * np.mean(routed * probs.mean(0))

    out, _ = _forward(GPTSAN(config), params, fixture_batch(tiny_cases), StepOptions(), jax.random.key(0),
                      train=False)
    assert len(router_logits) == config.num_switch_layers
    assert float(out.aux_loss) == pytest.approx(want, rel=1e-5)


def test_spout_vectors_follow_the_spec():
    """--spout_vector (spec section 6): onehot = one_hot(i mod P); half_onehot = one_hot(i mod P/2) joined with
    U(0,1) noise drawn each step; uniform = fresh U(0,1) each step; stateless_uniform = U(0,1) seeded by i alone
    (the same vector for the same i whatever the step); none = no spout."""
    from gptsan.train.spout import spout_vectors

    p = 8
    ids = jnp.asarray([0, 3, 9, 17, 3], jnp.int32)
    step_a, step_b = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(spout_vectors("onehot", ids, p, step_a), np.eye(p)[[0, 3, 1, 1, 3]])
    half = np.asarray(spout_vectors("half_onehot", ids, p, step_a))
    np.testing.assert_array_equal(half[:, :4], np.eye(4)[[0, 3, 1, 1, 3]])
    assert ((half[:, 4:] >= 0) & (half[:, 4:] < 1)).all() and len(np.unique(half[:, 4:])) == half[:, 4:].size
    assert not np.array_equal(half, spout_vectors("half_onehot", ids, p, step_b))
    for kind in ("uniform", "stateless_uniform"):
        a, b = np.asarray(spout_vectors(kind, ids, p, step_a)), np.asarray(spout_vectors(kind, ids, p, step_b))
        assert a.shape == (5, p) and a.dtype == np.float32 and ((a >= 0) & (a < 1)).all()
        assert np.array_equal(a, b) == (kind == "stateless_uniform")
    stateless = np.asarray(spout_vectors("stateless_uniform", ids, p, step_a))
    np.testing.assert_array_equal(stateless[1], stateless[4])  # the same class id, the same vector
    assert len({row.tobytes() for row in stateless}) == 4
    assert spout_vectors("none", ids, p, step_a) is None


@pytest.mark.parametrize("accumulate_steps", [1, 2])
def test_learning_rate_metric_is_the_rate_a_step_applies_after_a_skipped_step(accumulate_steps):
    """A skipped float16 step counts in TrainState.step but not in the optimizer's schedule (its update, the
    schedule's count included, is left out). The logged learning rate is the one the step applies: after a skip
    at step 2 of a 4-step warmup, step 3 applies the rate of step 2 (the parameters equal those of the same step
    taken without the skip), 2.5e-3, which the metric used to report as schedule(step) = 5e-3."""
    from gptsan.train.accumulate import make_accumulating_train_step

    config = mini_config(routing="dropless", router_jitter=0.0, dtype="float16")  # nothing depends on the step
    optimizer, schedule = make_optimizer("adam", 1e-2, 4)
    loss_scale = LossScale.for_dtype("float16").replace(scale=jnp.float32(2.0**10))
    state = create_state(init_params(config, 0), frozenset(), optimizer, 0, loss_scale)
    step = jax.jit(make_accumulating_train_step(config, optimizer, schedule, StepOptions(), accumulate_steps))
    batch = next(memory_batches(counting_corpus(16, 16, 128, period=8), 8))
    with_scale = lambda state, scale: state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(scale)))  # noqa: E731

    first, metrics = step(state, batch)
    assert float(metrics["learning_rate"]) == 0.0 and bool(metrics["update_applied"])
    skipped, metrics = step(with_scale(first, 1e30), batch)
    assert not bool(metrics["update_applied"]) and float(metrics["learning_rate"]) == pytest.approx(2.5e-3)
    after_skip, metrics = step(with_scale(skipped, 2.0**10), batch)
    without_skip, unskipped_metrics = step(first, batch)
    assert int(after_skip.step) == 3 and int(without_skip.step) == 2
    for a, b in zip(jax.tree_util.tree_leaves(after_skip.params), jax.tree_util.tree_leaves(without_skip.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)  # the same update: the rate of step 2 was applied
    assert float(metrics["learning_rate"]) == float(unskipped_metrics["learning_rate"]) == pytest.approx(2.5e-3)
