"""Beam search: finds what greedy misses, equals exhaustive search when wide enough, and on the real model
returns hypotheses sorted by score whose log-probabilities a full forward confirms."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.generate.beam import BeamDecoder, BeamSearch
from gptsan.generate.prompt import Prompt, left_pad, never_sampled, swe_layout
from gptsan.model import GPTSAN
from gptsan.model.inference import to_inference_layout

END = 5


def markov_search(table, width, steps, length_penalty, start_tokens=(0,)):
    """Beam search over a bigram scorer: the next-token logits depend only on the last token."""
    table = jnp.asarray(table)

    def step(carry, tokens):
        return table[tokens], carry

    def gather(carry, rows):
        return carry[rows]

    search = BeamSearch(step, gather, width, END, length_penalty)
    start = jnp.asarray(start_tokens)
    limit = jnp.full(start.shape, steps)
    run = jax.jit(lambda: search.search(jnp.zeros(start.shape), table[start], limit, steps))
    return jax.tree.map(np.asarray, run())


def test_beam_finds_the_sequence_greedy_misses():
    """From token 0: 1 (p .5) leads to four equally likely tokens (.25 each: .125 in all), 2 (p .4) leads to
    3 with p .95 (.38 in all). Greedy takes 1; beam search returns 0 -> 2 -> 3."""
    probs = np.full((6, 6), 1e-6)
    probs[0, 1], probs[0, 2] = 0.5, 0.4
    probs[1, 1:5] = 0.25
    probs[2, 3] = 0.95
    probs[3:, 4] = 1.0
    logits = np.log(probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    greedy = markov_search(logits, width=1, steps=2, length_penalty=0.0)
    beam = markov_search(logits, width=4, steps=2, length_penalty=0.0)
    assert greedy.tokens[0, 0, 0] == 1
    np.testing.assert_array_equal(beam.tokens[0, 0], [2, 3])
    normalised = probs / probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(beam.logprobs[0, 0], np.log(normalised[0, 2] * normalised[2, 3]), atol=1e-4)
    assert beam.logprobs[0, 0] > greedy.logprobs[0, 0] + 1.0
    assert np.all(np.diff(beam.scores[0]) <= 0)


def score(logprobs, start, seq, length_penalty):
    prev = (start, *seq[:-1])
    return sum(logprobs[a, b] for a, b in zip(prev, seq, strict=True)) / len(seq) ** length_penalty


def exhaustive(logprobs, start, steps, length_penalty, top):
    """Every sequence of at most `steps` tokens that stops at END (or at the limit): the best `top` scores."""
    scores = []
    for length in range(1, steps + 1):
        for seq in itertools.product(range(logprobs.shape[0]), repeat=length):
            if END not in seq[:-1] and (length == steps or seq[-1] == END):
                scores.append(score(logprobs, start, seq, length_penalty))
    return sorted(scores, reverse=True)[:top]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -0.5])
def test_wide_beam_equals_exhaustive_search(length_penalty):
    """With width >= V^(steps-1) no live hypothesis is ever dropped: the pool must be the exact top list,
    finished hypotheses (ending in END) and length-limited ones alike (ties may come in either order)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (6, 6)).astype(np.float32)
    logits[:, END] += 0.5
    logprobs = np.asarray(jax.nn.log_softmax(logits.astype(np.float64), axis=-1))
    steps, width = 3, 36
    result = markov_search(logits, width, steps, length_penalty, start_tokens=(0, 4))
    for row, start in enumerate((0, 4)):
        expected = exhaustive(logprobs, start, steps, length_penalty, width)
        np.testing.assert_allclose(result.scores[row], expected, atol=1e-4)
        seen = set()
        for tokens, length, reported in zip(result.tokens[row], result.lengths[row], result.scores[row],
                                            strict=True):
            seq = tuple(int(t) for t in tokens[:min(length + 1, steps)])
            assert END not in seq[:length] and len(seq) == length + (seq[-1] == END)
            np.testing.assert_allclose(reported, score(logprobs, start, seq, length_penalty), atol=1e-4)
            seen.add(seq)
        assert len(seen) == width


def test_beam_on_the_model_is_sorted_and_scored_right(tiny, tiny_cases):
    config, params = tiny
    weights = to_inference_layout(params)
    special = swe_layout(config.num_vocabulary)
    prompts = [Prompt(tuple(int(t) for t in row)) for row in tiny_cases["greedy_prompt"]]
    prompts[1] = Prompt(prompts[1].ids[:5])  # left-padded by 3
    decoder = BeamDecoder(config, width=4, end_id=special.end, length_penalty=1.0,
                          banned_ids=never_sampled(special))
    result = decoder.generate(weights, left_pad(prompts, special.nottoken), max_new=12)
    # Every hypothesis (and the fixture's greedy sequence) rescored by one causal forward over prompt +
    # tokens, right-padded to 20 (a causal query never sees what follows it).
    sequences, spans = [], []
    for row, prompt in enumerate(prompts):
        assert np.all(np.diff(result.scores[row]) <= 0)
        for hyp in range(4):
            length = result.lengths[row, hyp]
            tokens = [int(t) for t in result.tokens[row, hyp, :min(length + 1, 12)]]
            sequences.append(list(prompt.ids) + tokens)
            spans.append((len(prompt.ids), len(tokens)))
    greedy = [int(t) for t in tiny_cases["greedy_out"][0]]
    sequences.append(greedy)
    spans.append((8, 12))
    ids = np.zeros((len(sequences), 20), np.int32)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = seq
    logits = np.asarray(jax.jit(GPTSAN(config).apply)({"params": params}, jnp.asarray(ids)).logits, np.float64)
    logits[..., list(never_sampled(special))] = -np.inf
    logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    totals = [logprobs[i, start - 1 + np.arange(n), ids[i, start:start + n]].sum()
              for i, (start, n) in enumerate(spans)]
    np.testing.assert_allclose(result.logprobs.reshape(-1), totals[:8], atol=1e-3)
    normalised = [total / n for total, (_, n) in zip(totals, spans, strict=True)]
    np.testing.assert_allclose(result.scores.reshape(-1), normalised[:8], atol=1e-3)
    assert result.logprobs[0, 0] >= totals[8] - 1e-4  # at least as likely as the greedy continuation


def test_beam_with_spout_and_prefix_is_scored_right(tiny, tiny_cases):
    """A 6-token prompt with a 4-token bidirectional prefix (left-padded by 7) and a 13-token one with 9, each
    with its spout vector; 335 (frequent here) as the end token, so hypotheses end early and late; 92 and 233
    fed back as the separator (the input map). Every hypothesis's log-probability and score (length penalty
    0.5) is what a full forward over prompt + fed tokens, with that spout and prefix, gives it."""
    config, params = tiny
    ids, spout = tiny_cases["input_ids"], jnp.asarray(tiny_cases["spout"])
    special = swe_layout(config.num_vocabulary)
    prompts = [Prompt(tuple(int(t) for t in ids[0, :6]), 4), Prompt(tuple(int(t) for t in ids[1, :13]), 9)]
    width, steps = 3, 8
    input_map = np.arange(config.num_vocabulary, dtype=np.int32)
    input_map[[92, 233]] = special.separator
    decoder = BeamDecoder(config, width=width, end_id=335, length_penalty=0.5, banned_ids=never_sampled(special),
                          input_map=input_map)
    result = decoder.generate(to_inference_layout(params), left_pad(prompts, special.nottoken), steps, spout=spout)
    forward = jax.jit(lambda x, n, s: GPTSAN(config).apply({"params": params}, x, num_precontext=n, spout=s).logits)
    assert result.lengths.min() < steps - 1 and result.lengths.max() == steps  # ended early, and at the limit
    assert np.isin(result.tokens, [92, 233]).any()
    for row, prompt in enumerate(prompts):
        assert np.all(np.diff(result.scores[row]) <= 0)
        for hyp in range(width):
            tokens = [int(t) for t in result.tokens[row, hyp, :min(result.lengths[row, hyp] + 1, steps)]]
            sequence = np.zeros((1, len(prompt.ids) + steps), np.int32)  # right-padded: one compile per prompt
            sequence[0, :len(prompt.ids) + len(tokens)] = list(prompt.ids) + input_map[tokens].tolist()
            logits = np.asarray(forward(sequence, jnp.asarray([prompt.num_precontext]), spout[row:row + 1]),
                                np.float64)[0]
            logits[:, list(never_sampled(special))] = -np.inf
            logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
            total = logprobs[len(prompt.ids) - 1 + np.arange(len(tokens)), tokens].sum()
            np.testing.assert_allclose(result.logprobs[row, hyp], total, atol=1e-3)
            np.testing.assert_allclose(result.scores[row, hyp], total / len(tokens) ** 0.5, atol=1e-3)
