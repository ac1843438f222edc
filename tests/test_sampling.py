"""Token choice: top-k / top-p / banned ids never leave the allowed set; sampling follows the softmax;
seeded and reproducible."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.errors import UserError
from gptsan.generate.sampling import Sampler, ban, categorical, next_token, nucleus_in_place, row_keys

TRIALS = 4000  # rows, each with its own logits and key: one call samples them all
VOCAB = 50
BANNED = (3, 7)


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 2, (TRIALS, VOCAB)).astype(np.float32)
    values[:, BANNED[0]] = 50.0  # a banned id that would otherwise always win
    return values


def sample(logits, sampler, seed=0):
    keys = row_keys(jax.random.key(seed), jnp.arange(logits.shape[0]), jnp.asarray(0))
    return np.asarray(jax.jit(next_token, static_argnums=2)(keys, jnp.asarray(logits), sampler))


def allowed_set(logits, top_k, top_p, temperature=1.0):
    """Reference: per row, the ids top-k then top-p (smallest prefix reaching top_p) may pick."""
    allowed = np.zeros(logits.shape, bool)
    for row, values in enumerate(logits):
        values = values.astype(np.float64).copy()
        values[list(BANNED)] = -np.inf
        order = np.argsort(-values, kind="stable")[: top_k or VOCAB]
        scaled = values[order] / temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        allowed[row, order[before < top_p]] = True
    return allowed


@pytest.mark.parametrize("top_k, top_p, temperature",
                         [(5, 1.0, 1.0), (0, 0.5, 1.0), (10, 0.7, 0.6), (1, 1.0, 1.0), (0, 0.95, 2.0),
                          (0, 1.0, 1.0), (VOCAB + 5, 1.0, 0.8)])  # the last two: no cut, nothing sorted
def test_sampled_tokens_stay_in_the_allowed_set(logits, top_k, top_p, temperature):
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, banned_ids=BANNED)
    allowed = allowed_set(logits, top_k, top_p, temperature)
    for seed in range(3):
        tokens = sample(logits, sampler, seed)
        assert allowed[np.arange(TRIALS), tokens].all()
        assert not np.isin(tokens, BANNED).any()
    if top_k != 1 and top_p > 0.6:
        assert len(np.unique(tokens)) > 1  # it does sample


@pytest.mark.parametrize("top_p, temperature", [(0.3, 1.0), (0.9, 1.0), (0.99, 0.5)])
def test_the_unsorted_nucleus_is_the_sorted_prefix(logits, top_p, temperature):
    """Without a top-k cut the nucleus is found without sorting (a probability threshold by bisection); it
    keeps exactly the ids of the sorted rule, row by row."""
    scaled = ban(jnp.asarray(logits), BANNED) / temperature
    kept = np.asarray(jax.jit(nucleus_in_place, static_argnums=1)(scaled, top_p))
    np.testing.assert_array_equal(kept & ~np.isin(np.arange(VOCAB), BANNED), allowed_set(logits, 0, top_p,
                                                                                       temperature))


def test_greedy_is_the_argmax_without_banned_ids(logits):
    tokens = sample(logits, Sampler(temperature=0.0, banned_ids=BANNED))
    masked = logits.copy()
    masked[:, list(BANNED)] = -np.inf
    np.testing.assert_array_equal(tokens, masked.argmax(-1))


def test_sampling_follows_the_softmax():
    """One row repeated: frequencies match softmax(logits / T) within 4 standard errors."""
    row = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    tokens = sample(np.tile(row, (TRIALS, 1)), Sampler(temperature=0.7))
    probs = np.exp(row / 0.7) / np.exp(row / 0.7).sum()
    freq = np.bincount(tokens, minlength=len(row)) / TRIALS
    assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / TRIALS))


def test_the_two_stage_draw_follows_the_softmax():
    """Over more candidates than a block, a block is drawn by its mass, then a candidate in it: the frequencies
    still match softmax(logits) within 4 standard errors, and a block without mass (all -inf) is never drawn.
    11 candidates in blocks of 4: the last block is padded."""
    row = np.array([2.0, 1.0, -np.inf, 0.5, -np.inf, -np.inf, -np.inf, -np.inf, 0.0, -1.0, 1.5], np.float32)
    keys = jax.random.split(jax.random.key(3), TRIALS)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: categorical(k, jnp.asarray(row), block=4)))(keys))
    probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    freq = np.bincount(draws, minlength=len(row)) / TRIALS
    assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / TRIALS) + 1e-12)
    assert freq[np.isinf(row)].sum() == 0


def test_seeded_and_reproducible(logits):
    sampler = Sampler(top_k=20, banned_ids=BANNED)
    np.testing.assert_array_equal(sample(logits, sampler, seed=1), sample(logits, sampler, seed=1))
    assert (sample(logits, sampler, seed=1) != sample(logits, sampler, seed=2)).mean() > 0.3


@pytest.mark.parametrize("kwargs, flag", [({"top_k": -1}, "--top_k"), ({"top_p": 0.0}, "--top_p"),
                                          ({"top_p": 1.5}, "--top_p"), ({"temperature": -1.0}, "--temperature")])
def test_bad_sampler_settings_are_user_errors(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        Sampler(**kwargs)
