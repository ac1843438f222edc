"""Cached decoding: fixture greedy tokens, equality with a full-recompute reference, left padding, stopping,
streaming, and compiling once per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.errors import UserError
from gptsan.generate.decode import Decoder
from gptsan.generate.prompt import Prompt, left_pad, never_sampled, swe_layout
from gptsan.generate.sampling import Sampler, next_token, row_keys
from gptsan.model import GPTSAN
from gptsan.model.inference import to_inference_layout


def prompts_of(rows) -> list[Prompt]:
    return [Prompt(tuple(int(t) for t in row)) for row in rows]


def recompute_reference(config, params, ids, steps, sampler, end_id, spout=None, num_precontext=None, seed=0,
                        input_map=None):
    """Uncached decoding: a full forward over prompt + generated tokens for every new token. The sequence
    sits in a fixed [B, prompt + steps] buffer (one compile); a causal query never sees the slots after it.
    `input_map`: the id fed for each generated token (default: the token itself)."""
    batch, width = ids.shape
    forward = jax.jit(lambda p, x: GPTSAN(config).apply({"params": p}, x, num_precontext=num_precontext,
                                                          spout=spout).logits)
    buffer = np.zeros((batch, width + steps), np.int32)
    buffer[:, :width] = ids
    tokens = np.zeros((batch, steps), np.int32)
    key, rows = jax.random.key(seed), jnp.arange(batch)
    for step in range(steps):
        logits = forward(params, jnp.asarray(buffer))[:, width + step - 1]
        tokens[:, step] = np.asarray(next_token(row_keys(key, rows, jnp.asarray(step)), logits, sampler))
        buffer[:, width + step] = tokens[:, step] if input_map is None else input_map[tokens[:, step]]
    for row in tokens:  # after the first end token a row holds only end tokens
        ends = np.flatnonzero(row == end_id)
        if len(ends):
            row[ends[0]:] = end_id
    return tokens


def test_greedy_reproduces_fixture(tiny, tiny_cases):
    config, params = tiny
    weights = to_inference_layout(params)
    prompt = tiny_cases["greedy_prompt"]
    special = swe_layout(config.num_vocabulary)
    decoder = Decoder(config, Sampler(temperature=0.0, banned_ids=never_sampled(special)), special.end)
    result = decoder.generate(weights, left_pad(prompts_of(prompt), special.nottoken), max_new=12)
    np.testing.assert_array_equal(result.tokens, tiny_cases["greedy_out"][:, prompt.shape[1]:])
    np.testing.assert_array_equal(result.lengths, [12, 12])


@pytest.mark.parametrize("sampler", [Sampler(temperature=0.0), Sampler(temperature=0.8, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_cached_equals_recomputed_with_spout_and_prefix(tiny, tiny_cases, sampler):
    """50 tokens with a spout vector and a prefix-LM prompt: prompt 13 + spout 1 + 50 = the 64-token context."""
    config, params = tiny
    weights = to_inference_layout(params)
    special = swe_layout(config.num_vocabulary)
    ids = tiny_cases["input_ids"][:, :13]
    spout = jnp.asarray(tiny_cases["spout"])
    prefix = tiny_cases["num_precontext"]  # 7 and 13
    prompts = [Prompt(tuple(int(t) for t in row), int(n)) for row, n in zip(ids, prefix, strict=True)]
    decoder = Decoder(config, sampler, special.end)
    result = decoder.generate(weights, left_pad(prompts, special.nottoken), max_new=50, spout=spout, seed=3)
    reference = recompute_reference(config, params, ids, 50, sampler, special.end, spout, jnp.asarray(prefix),
                                    seed=3)
    assert result.tokens.shape == (2, 50)
    np.testing.assert_array_equal(result.tokens, reference)


def test_generated_tokens_are_fed_back_through_the_input_map(tiny, tiny_cases):
    """Sentence punctuation is generated as itself but fed back as `<|separator|>` (as in training inputs):
    here the fixture's frequent greedy tokens 344 and 335 are fed as the separator id."""
    config, params = tiny
    special = swe_layout(config.num_vocabulary)
    input_map = np.arange(config.num_vocabulary, dtype=np.int32)
    input_map[[344, 335]] = special.separator
    prompt = tiny_cases["greedy_prompt"]
    sampler = Sampler(temperature=0.0, banned_ids=never_sampled(special))
    mapped = Decoder(config, sampler, special.end, input_map).generate(
        to_inference_layout(params), left_pad(prompts_of(prompt), special.nottoken), max_new=12)
    reference = recompute_reference(config, params, prompt, 12, sampler, special.end, input_map=input_map)
    np.testing.assert_array_equal(mapped.tokens, reference)
    assert not np.array_equal(mapped.tokens, tiny_cases["greedy_out"][:, prompt.shape[1]:])


@pytest.mark.parametrize("sampler", [Sampler(temperature=0.0), Sampler(temperature=0.8, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_left_padded_batch_equals_each_prompt_alone(tiny, tiny_cases, sampler):
    """A 5-token causal prompt and a 13-token prefix-LM prompt, each with its own spout vector: batched
    (the short one left-padded by 8) and alone, 50 tokens. Sampling is keyed by row id, not by batch."""
    config, params = tiny
    weights = to_inference_layout(params)
    special = swe_layout(config.num_vocabulary)
    ids = tiny_cases["input_ids"]
    prompts = [Prompt(tuple(int(t) for t in ids[0, :5])), Prompt(tuple(int(t) for t in ids[1, :13]), 9)]
    spout = jnp.asarray(tiny_cases["spout"])
    decoder = Decoder(config, sampler, special.end)
    batched = decoder.generate(weights, left_pad(prompts, special.nottoken), 50, spout=spout, seed=5)
    for i, prompt in enumerate(prompts):
        alone = decoder.generate(weights, left_pad([prompt], special.nottoken), 50, spout=spout[i:i + 1],
                                 seed=5, rows=[i])
        np.testing.assert_array_equal(batched.tokens[i], alone.tokens[0])
        assert batched.lengths[i] == alone.lengths[0]


def test_each_row_stops_at_its_end_token(tiny, tiny_cases):
    """Fixture row 1 greedily continues 125 492 7 335 ...: with 335 as the end token it stops after 3 tokens
    and the other row is unaffected."""
    config, params = tiny
    weights = to_inference_layout(params)
    prompt = tiny_cases["greedy_prompt"]
    special = swe_layout(config.num_vocabulary)
    decoder = Decoder(config, Sampler(temperature=0.0, banned_ids=never_sampled(special)), end_id=335)
    result = decoder.generate(weights, left_pad(prompts_of(prompt), special.nottoken), max_new=12)
    np.testing.assert_array_equal(result.lengths, [12, 3])
    np.testing.assert_array_equal(result.tokens[0], tiny_cases["greedy_out"][0, 8:])
    np.testing.assert_array_equal(result.tokens[1], [125, 492, 7] + [335] * 9)


def test_generation_stays_inside_the_context(tiny, tiny_cases):
    config, params = tiny
    weights = to_inference_layout(params)
    ids = np.tile(tiny_cases["input_ids"], 3)  # 72 tokens: too long for the 64-token context
    decoder = Decoder(config, Sampler(temperature=0.0), end_id=config.num_vocabulary - 1)
    result = decoder.generate(weights, left_pad(prompts_of([ids[0, :60], ids[1, :50]]), 0), max_new=300)
    assert result.tokens.shape == (2, 14)
    np.testing.assert_array_equal(result.lengths, [4, 14])
    with pytest.raises(UserError, match="no room"):
        decoder.generate(weights, left_pad(prompts_of([ids[0, :64]]), 0), max_new=5)


def test_stream_yields_the_generated_tokens_in_chunks(tiny, tiny_cases):
    config, params = tiny
    weights = to_inference_layout(params)
    special = swe_layout(config.num_vocabulary)
    decoder = Decoder(config, Sampler(temperature=0.0, banned_ids=never_sampled(special)), special.end)
    batch = left_pad(prompts_of(tiny_cases["greedy_prompt"]), special.nottoken)
    whole = decoder.generate(weights, batch, max_new=12)
    chunks = list(decoder.stream(weights, batch, max_new=12, chunk=5))
    assert [c.shape[1] for c in chunks] == [1, 5, 5, 1]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole.tokens)


def test_decoding_compiles_once_per_shape(tiny, tiny_cases):
    config, params = tiny
    weights = to_inference_layout(params)
    sampler = Sampler(top_k=11)  # used by no other test
    ids = tiny_cases["input_ids"]
    for offset in range(3):
        decoder = Decoder(config, sampler, end_id=int(ids[0, offset + 12]))
        decoder.generate(weights, left_pad(prompts_of(ids[:, offset:offset + 10]), 0), max_new=16, seed=offset)
    assert decoder.compiled["generate"]._cache_size() == 1


def test_every_seed_the_flag_takes_samples_reproducibly(tiny, tiny_cases):
    """--seed takes 0..2**32-1: a seed from 2**31 reached the jitted loop as a Python int (int32) and ended in an
    OverflowError. Each seed gives the tokens of the uncached reference keyed by it, twice the same, and
    different seeds different tokens."""
    config, params = tiny
    weights = to_inference_layout(params)
    special = swe_layout(config.num_vocabulary)
    prompt = tiny_cases["greedy_prompt"]
    sampler = Sampler(temperature=1.0, banned_ids=never_sampled(special))
    decoder = Decoder(config, sampler, special.end)
    batch = left_pad(prompts_of(prompt), special.nottoken)
    results = {}
    for seed in (7, 2**31, 2**32 - 1):
        results[seed] = decoder.generate(weights, batch, max_new=8, seed=seed).tokens
        reference = recompute_reference(config, params, prompt, 8, sampler, special.end, seed=seed)
        np.testing.assert_array_equal(results[seed], reference)
    np.testing.assert_array_equal(decoder.generate(weights, batch, max_new=8, seed=2**32 - 1).tokens,
                                  results[2**32 - 1])
    assert not np.array_equal(results[2**31], results[2**32 - 1])
    assert not np.array_equal(results[7], results[2**31])
    with pytest.raises(UserError, match="--seed"):
        decoder.generate(weights, batch, max_new=8, seed=2**32)
