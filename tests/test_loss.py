"""The fused head loss (`tied_head_loss`, hand-written gradient) against the definition (`lm_loss` on logits
made by the same tied projection): every loss term and the gradients of each differentiable term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.train.loss import BIAS_COLUMNS, lm_loss, tied_head_loss

BATCH, LENGTH, HIDDEN, VOCAB = 2, 7, 16, 50


def inputs(seed: int, ignored: float):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (BATCH, LENGTH, HIDDEN))
    embedding = jax.random.normal(keys[1], (VOCAB, HIDDEN)) * 0.5
    bias = jax.random.normal(keys[2], (VOCAB,))
    targets = jax.random.randint(keys[3], (BATCH, LENGTH), 0, VOCAB)
    drop = jax.random.uniform(jax.random.fold_in(keys[3], 1), (BATCH, LENGTH)) < ignored
    return hidden, embedding, bias, jnp.where(drop, -1, targets)


def reference(hidden, embedding, bias, targets):
    logits = jnp.einsum("btd,vd->btv", hidden, embedding.astype(hidden.dtype),
                        preferred_element_type=jnp.float32) + bias
    return lm_loss(logits, targets)


@pytest.mark.parametrize("ignored", [0.0, 0.4, 1.0])
def test_terms_equal_the_definition(ignored):
    hidden, embedding, bias, targets = inputs(0, ignored)
    want, got = reference(hidden, embedding, bias, targets), tied_head_loss(hidden, embedding, bias, targets)
    for name in ("loss", "cross_entropy", "z_loss", "accuracy", "tokens"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, err_msg=name)


def test_accuracy_counts_the_argmax():
    hidden, embedding, bias, _ = inputs(1, 0.0)
    logits = jnp.einsum("btd,vd->btv", hidden, embedding) + bias
    targets = jnp.argmax(logits, axis=-1).at[0, :3].add(1) % VOCAB  # 3 of 14 wrong
    got = tied_head_loss(hidden, embedding, bias, targets)
    assert float(got.accuracy) == pytest.approx(11 / 14)


@pytest.mark.parametrize("term", ["loss", "cross_entropy", "z_loss"])
@pytest.mark.parametrize("ignored", [0.0, 0.4])
def test_gradients_equal_autodiff_of_the_definition(term, ignored):
    hidden, embedding, bias, targets = inputs(2, ignored)

    def objective(loss_fn):
        return lambda h, e, b: 3.0 * getattr(loss_fn(h, e, b, targets), term)

    want = jax.grad(objective(reference), argnums=(0, 1, 2))(hidden, embedding, bias)
    got = jax.jit(jax.grad(objective(tied_head_loss), argnums=(0, 1, 2)))(hidden, embedding, bias)
    for name, w, g in zip(("hidden", "embedding", "bias"), want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * float(jnp.abs(w).max()), err_msg=name)


def test_bfloat16_hidden_gives_float32_logit_terms_and_matching_gradients():
    hidden, embedding, bias, targets = inputs(3, 0.2)
    hidden = hidden.astype(jnp.bfloat16)
    want = jax.grad(lambda h, e, b: reference(h, e, b, targets).loss, argnums=(0, 1, 2))(hidden, embedding, bias)
    got = jax.grad(lambda h, e, b: tied_head_loss(h, e, b, targets).loss, argnums=(0, 1, 2))(hidden, embedding, bias)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == got[2].dtype == jnp.float32
    np.testing.assert_allclose(tied_head_loss(hidden, embedding, bias, targets).loss,
                               reference(hidden, embedding, bias, targets).loss, rtol=1e-5)
    for w, g in zip(want, got, strict=True):
        scale = float(jnp.abs(w.astype(jnp.float32)).max())
        np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32), atol=0.02 * scale)


def dot_output_shapes(jaxpr) -> set[tuple[int, ...]]:
    """The output shapes of every dot_general in a jaxpr, nested ones (custom_vjp, pjit) included."""
    shapes = set()
    for equation in jaxpr.eqns:
        if equation.primitive.name == "dot_general":
            shapes.add(tuple(equation.outvars[0].aval.shape))
        for value in equation.params.values():
            for inner in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    shapes |= dot_output_shapes(inner.jaxpr)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    shapes |= dot_output_shapes(inner)
    return shapes


@pytest.mark.parametrize("embedding_trained", [True, False])
def test_bias_gradient_with_and_without_the_tables_gradient(embedding_trained):
    """In float32 the bias gradient comes out of the table's gradient product (a column of ones beside the
    head's input), made as [d + BIAS_COLUMNS, V] (`_table_gradient`). With the table frozen that product is not
    made for the bias alone."""
    hidden, embedding, bias, targets = inputs(4, 0.3)

    def objective(loss_fn, **kwargs):
        return lambda h, b: loss_fn(h, embedding, b, targets, **kwargs).loss

    want = jax.grad(objective(reference), argnums=(0, 1))(hidden, bias)
    trained = objective(tied_head_loss, embedding_trained=embedding_trained)
    got = jax.jit(jax.grad(trained, argnums=(0, 1)))(hidden, bias)
    for name, w, g in zip(("hidden", "bias"), want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * float(jnp.abs(w).max()), err_msg=name)
    shapes = dot_output_shapes(jax.make_jaxpr(jax.grad(trained, argnums=(0, 1)))(hidden, bias).jaxpr)
    assert ((HIDDEN + BIAS_COLUMNS, VOCAB) in shapes) == embedding_trained
