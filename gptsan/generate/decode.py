"""Cached decoding: one prefill over the (left-padded) prompts, then a jitted `while_loop` that feeds one
token per step through a preallocated KV cache.

    decoder = Decoder(config, Sampler(top_k=120), end_id=special.end)
    result = decoder.generate(params, left_pad(prompts, pad_id), max_new=300, spout=None, seed=0)

Each row stops at its first end token or when its prompt plus generated tokens fill `num_contexts`
(the spout, when given, takes one of those positions). `Decoder.stream` yields the tokens in chunks of steps.
Both functions compile once per input shape and Sampler.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptsan.errors import UserError
from gptsan.generate.prompt import PromptBatch
from gptsan.generate.sampling import Sampler, next_token, row_keys
from gptsan.model import GPTSAN, KVCache, ModelConfig
from gptsan.seed import LARGEST_SEED


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array  # [B, N] generated tokens; the end id after a row has stopped
    last: jax.Array  # [B] the next input: the newest token as the model is fed it (`feed`)
    step: jax.Array  # () tokens generated so far
    done: jax.Array  # [B] row has stopped
    lengths: jax.Array  # [B] tokens generated before the end token
    limit: jax.Array  # [B] most tokens the row may generate (room left in the context window)
    rows: jax.Array  # [B] row ids that seed each row's sampling
    seed_key: jax.Array
    end_id: jax.Array  # () the token that stops a row
    feed: jax.Array  # [V] the input id for each token (sentence punctuation -> separator, as in training)


@dataclasses.dataclass(frozen=True)
class Generated:
    tokens: np.ndarray  # [B, N] (the end id fills each row after its length)
    lengths: np.ndarray  # [B] generated tokens per row, the end token excluded


def room_after(config: ModelConfig, lengths: np.ndarray, has_spout: bool) -> np.ndarray:
    """How many tokens each row may generate (0 or less: none): prompt + spout slot + generated tokens fit
    num_contexts."""
    return config.num_contexts - int(has_spout) - np.asarray(lengths)


def room_left(config: ModelConfig, lengths: np.ndarray, has_spout: bool) -> np.ndarray:
    """`room_after`, where every row has room."""
    room = room_after(config, lengths, has_spout)
    if (room <= 0).any():
        longest = int(np.max(lengths))
        raise UserError(f"prompt: {longest} tokens leave no room to generate in the model's "
                        f"{config.num_contexts}-token context")
    return room


def feed_map(config: ModelConfig, input_map: np.ndarray | None) -> jax.Array:
    """[V] int32: the id fed back for each generated token; the token itself when no map is given."""
    if input_map is None:
        input_map = np.arange(config.num_vocabulary, dtype=np.int32)
    return jnp.asarray(input_map, jnp.int32)


def _choose(sampler: Sampler, state: DecodeState, logits: jax.Array) -> DecodeState:
    """Pick the next token of every live row from logits [B, V] and record it."""
    keys = row_keys(state.seed_key, state.rows, state.step)
    token = next_token(keys, logits, sampler)
    token = jnp.where(state.done, state.end_id, token)
    ended = ~state.done & (token == state.end_id)
    lengths = state.lengths + (~state.done & ~ended)
    done = state.done | ended | (lengths >= state.limit)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    return state.replace(tokens=tokens, last=state.feed[token], step=state.step + 1, done=done, lengths=lengths)


def _start(config: ModelConfig, sampler: Sampler, params, ids, pad, num_precontext, spout, limit, rows, seed,
           end_id, feed, steps: int) -> DecodeState:
    """Prefill the prompts into a fresh cache and choose the first token."""
    batch, width = ids.shape
    past = 0 if spout is None else 1
    cache = KVCache.allocate(config, batch, past + width + steps)
    model = GPTSAN(config, inference=True)
    out = model.apply({"params": params}, ids, num_precontext=num_precontext, spout=spout, pad=pad, cache=cache)
    state = DecodeState(
        cache=out.cache, tokens=jnp.full((batch, steps), end_id, jnp.int32), last=ids[:, -1],
        step=jnp.zeros((), jnp.int32), done=jnp.zeros((batch,), bool), lengths=jnp.zeros((batch,), jnp.int32),
        limit=limit, rows=rows, seed_key=jax.random.key(seed), end_id=jnp.asarray(end_id, jnp.int32), feed=feed)
    return _choose(sampler, state, out.logits[:, -1])


def _advance(config: ModelConfig, sampler: Sampler, params, state: DecodeState, num_steps) -> DecodeState:
    """Feed one token a step through the cache until `num_steps` more tokens or every row stopped."""
    model = GPTSAN(config, inference=True)
    stop = jnp.minimum(state.step + num_steps, state.tokens.shape[1])

    def running(s: DecodeState):
        return (s.step < stop) & ~jnp.all(s.done)

    def one_step(s: DecodeState):
        out = model.apply({"params": params}, s.last[:, None], cache=s.cache)
        return _choose(sampler, s.replace(cache=out.cache), out.logits[:, 0])

    return jax.lax.while_loop(running, one_step, state)


def _generate(config, sampler, params, ids, pad, num_precontext, spout, limit, rows, seed, end_id, feed,
              steps: int) -> DecodeState:
    state = _start(config, sampler, params, ids, pad, num_precontext, spout, limit, rows, seed, end_id, feed,
                   steps)
    return _advance(config, sampler, params, state, steps)


@functools.cache
def compiled(config: ModelConfig, sampler: Sampler) -> dict[str, Callable]:
    """The jitted functions for one model config and Sampler, shared by every Decoder that uses them."""
    return {
        "generate": jax.jit(functools.partial(_generate, config, sampler), static_argnames=("steps",)),
        "start": jax.jit(functools.partial(_start, config, sampler), static_argnames=("steps",)),
        "advance": jax.jit(functools.partial(_advance, config, sampler), donate_argnames=("state",)),
    }


class Decoder:
    """Prefill + jitted decoding loop for one model config and one Sampler."""

    def __init__(self, config: ModelConfig, sampler: Sampler, end_id: int, input_map: np.ndarray | None = None):
        """`input_map` [V]: the id fed back for each generated token (`Tokenizer.model_input_map()`: sentence
        punctuation is fed as `<|separator|>`, as the model saw it in training); default: the token itself."""
        self.config = config
        self.sampler = sampler
        self.end_id = end_id
        self.input_map = feed_map(config, input_map)
        self.compiled = compiled(config, sampler)

    def _inputs(self, batch: PromptBatch, max_new: int, spout, seed: int, rows) -> tuple[tuple, int]:
        if max_new < 1:
            raise UserError(f"--max_generate: expected at least 1, got {max_new}")
        limit = np.minimum(room_left(self.config, batch.lengths, spout is not None), max_new)
        rows = np.arange(len(limit)) if rows is None else np.asarray(rows)
        spout = None if spout is None else jnp.asarray(spout, jnp.float32)
        if not 0 <= seed <= LARGEST_SEED:
            raise UserError(f"--seed: expected an integer from 0 to {LARGEST_SEED}, got {seed}")
        # uint32: a Python int reaches jit as int32, and --seed 2**31..2**32-1 ended in an OverflowError
        inputs = (jnp.asarray(batch.ids), jnp.asarray(batch.pad), jnp.asarray(batch.num_precontext), spout,
                  jnp.asarray(limit, jnp.int32), jnp.asarray(rows, jnp.int32), np.uint32(seed), self.end_id,
                  self.input_map)
        return inputs, int(limit.max())

    def start(self, params, batch: PromptBatch, max_new: int, spout=None, seed: int = 0,
              rows=None) -> DecodeState:
        """Prefill and choose the first token. `rows` [B]: the ids that seed each row's sampling (default
        0..B-1), so a row samples the same tokens whatever batch it is in."""
        inputs, steps = self._inputs(batch, max_new, spout, seed, rows)
        return self.compiled["start"](params, *inputs, steps=steps)

    def advance(self, params, state: DecodeState, num_steps: int) -> DecodeState:
        """Up to `num_steps` more tokens (fewer when every row has stopped)."""
        return self.compiled["advance"](params, state, jnp.asarray(num_steps, jnp.int32))

    def generate(self, params, batch: PromptBatch, max_new: int, spout=None, seed: int = 0,
                 rows=None) -> Generated:
        inputs, steps = self._inputs(batch, max_new, spout, seed, rows)
        state = self.compiled["generate"](params, *inputs, steps=steps)
        return Generated(np.asarray(state.tokens), np.asarray(state.lengths))

    def stream(self, params, batch: PromptBatch, max_new: int, spout=None, seed: int = 0, rows=None,
               chunk: int = 8) -> Iterator[np.ndarray]:
        """Yield the tokens as they come: [B, n] arrays, n <= chunk (the end id fills stopped rows). The
        concatenation equals `generate(...).tokens` cut at the last step any row was live."""
        state = self.start(params, batch, max_new, spout, seed, rows)
        emitted = 0
        while True:
            step, done = int(state.step), bool(np.all(np.asarray(state.done)))
            if step > emitted:
                yield np.asarray(state.tokens[:, emitted:step])
                emitted = step
            if done or step >= state.tokens.shape[1]:
                return
            state = self.advance(params, state, chunk)
