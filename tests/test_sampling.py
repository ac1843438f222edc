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


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (0, 0.9), (400, 1.0)])  # two-stage draws, nucleus, top-k
@pytest.mark.parametrize("temperature", [1e-8, 1e-20, 2e-38])
def test_a_tiny_temperature_samples_the_argmax(top_k, top_p, temperature):
    """As T -> 0 sampling becomes greedy. Unshifted, logits / T reached 1e9 and more, where XLA's fused
    `exp(s - max)` (a multiply-add that skips the rounding of s) gave draw blocks a mass of inf or 0: up to
    half of these draws (depending on the shape XLA compiled for) left the argmax, and at T 2e-38 every draw
    (logit inf, nan probabilities: token 0)."""
    rng = np.random.default_rng(4)
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, banned_ids=BANNED)
    for batch, vocab in [(1, 768), (4, 768), (4, 512)]:  # over 2 draw blocks (DRAW_BLOCK 256)
        rows = rng.normal(0, 3, (batch, vocab)).astype(np.float32) + 30
        masked = rows.copy()
        masked[:, list(BANNED)] = -np.inf
        for seed in range(8):
            np.testing.assert_array_equal(sample(rows, sampler, seed), masked.argmax(-1), err_msg=f"{batch}x{vocab}")


def test_a_subnormal_temperature_is_a_user_error():
    """float32 flushes a subnormal divisor to 0 (every logit nan, token 0): refused, like the other settings."""
    with pytest.raises(UserError, match="--temperature: expected 0 .greedy. or at least 1.175e-38"):
        Sampler(temperature=1e-40)
    assert Sampler(temperature=float(np.finfo(np.float32).tiny)).temperature > 0


def claimed_distribution(row, sampler):
    """What `sampler` claims to sample from for logits `row`: softmax(row / T) over the top_k likeliest
    (banned ids excluded), cut to the smallest prefix reaching top_p, renormalised. float64."""
    values = row.astype(np.float64)
    values[list(sampler.banned_ids)] = -np.inf
    order = np.argsort(-values, kind="stable")[: sampler.top_k or len(row)]
    probs = np.exp((values[order] - values[order[0]]) / sampler.temperature)
    probs /= probs.sum()
    keep = np.cumsum(probs) - probs < sampler.top_p
    claimed = np.zeros(len(row))
    claimed[order[keep]] = probs[keep] / probs[keep].sum()
    return claimed


@pytest.mark.parametrize("sampler", [
    Sampler(temperature=0.8, top_p=0.8, banned_ids=BANNED),  # nucleus in place, two-stage draw
    Sampler(temperature=1.3, top_k=4, banned_ids=BANNED),  # top-k, one-stage draw
    Sampler(top_k=300, top_p=0.95, banned_ids=BANNED),  # sorted nucleus of 300, two-stage draw
    Sampler(temperature=1.5, banned_ids=BANNED),  # no cut: 600 candidates, two-stage draw
], ids=["top_p", "top_k", "top_k_top_p", "temperature"])
def test_cut_sampling_follows_the_renormalised_softmax(sampler):
    """600 logits (over 2 draw blocks), the likely ones spread over both: the draws have exactly the claimed
    support, and the frequencies of the likely tokens, and of the rest together, match the claimed
    probabilities within 4 standard errors."""
    row = np.random.default_rng(5).normal(-3, 1, 600).astype(np.float32)
    likely = [10, 270, 300, 520, 599, 100, 400, 255, 256]
    row[likely] = [3.0, 2.6, 2.3, 2.0, 1.5, 1.0, 0.6, 0.3, 0.1]
    row[BANNED[0]] = 50.0
    claimed = claimed_distribution(row, sampler)
    tokens = sample(np.tile(row, (TRIALS, 1)), sampler, seed=6)
    assert set(np.unique(tokens)) <= set(np.flatnonzero(claimed))
    counts = np.bincount(tokens, minlength=len(row))
    rest = np.setdiff1d(np.arange(len(row)), likely)
    freq = np.append(counts[likely], counts[rest].sum()) / TRIALS
    probs = np.append(claimed[likely], claimed[rest].sum())
    np.testing.assert_array_less(np.abs(freq - probs), 4 * np.sqrt(probs * (1 - probs) / TRIALS) + 1e-12)
