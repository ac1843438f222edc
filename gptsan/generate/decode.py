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
from collections.abc import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptsan.errors import UserError
from gptsan.generate.prompt import PromptBatch
from gptsan.generate.sampling import Sampler, next_token, row_keys
from gptsan.model import GPTSAN, KVCache, ModelConfig


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array  # [B, N] generated tokens; the end id after a row has stopped
    last: jax.Array  # [B] the newest token (the next input)
    step: jax.Array  # () tokens generated so far
    done: jax.Array  # [B] row has stopped
    lengths: jax.Array  # [B] tokens generated before the end token
    limit: jax.Array  # [B] most tokens the row may generate (room left in the context window)
    rows: jax.Array  # [B] row ids that seed each row's sampling
    seed_key: jax.Array


@dataclasses.dataclass(frozen=True)
class Generated:
    tokens: np.ndarray  # [B, N] (the end id fills each row after its length)
    lengths: np.ndarray  # [B] generated tokens per row, the end token excluded


def room_left(config: ModelConfig, lengths: np.ndarray, has_spout: bool) -> np.ndarray:
    """How many tokens each row may generate: prompt + spout slot + generated tokens fit num_contexts."""
    room = config.num_contexts - int(has_spout) - np.asarray(lengths)
    if (room <= 0).any():
        longest = int(np.max(lengths))
        raise UserError(f"prompt: {longest} tokens leave no room to generate in the model's "
                        f"{config.num_contexts}-token context")
    return room


class Decoder:
    """Prefill + jitted decoding loop for one model config and one Sampler."""

    def __init__(self, config: ModelConfig, sampler: Sampler, end_id: int):
        self.config = config
        self.sampler = sampler
        self.end_id = end_id
        self.model = GPTSAN(config)
        self._start = jax.jit(self._start_impl, static_argnames=("steps",))
        self._advance = jax.jit(self._advance_impl, donate_argnames=("state",))

    # Traced functions.
    def _choose(self, state: DecodeState, logits: jax.Array) -> DecodeState:
        """Pick the next token of every live row from logits [B, V] and record it."""
        keys = row_keys(state.seed_key, state.rows, state.step)
        token = next_token(keys, logits, self.sampler)
        token = jnp.where(state.done, self.end_id, token)
        ended = ~state.done & (token == self.end_id)
        lengths = state.lengths + (~state.done & ~ended)
        done = state.done | ended | (lengths >= state.limit)
        tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
        return state.replace(tokens=tokens, last=token, step=state.step + 1, done=done, lengths=lengths)

    def _start_impl(self, params, ids, pad, num_precontext, spout, limit, rows, seed, steps: int):
        batch, width = ids.shape
        past = 0 if spout is None else 1
        cache = KVCache.allocate(self.config, batch, past + width + steps)
        out = self.model.apply({"params": params}, ids, num_precontext=num_precontext, spout=spout, pad=pad,
                               cache=cache)
        state = DecodeState(
            cache=out.cache, tokens=jnp.full((batch, steps), self.end_id, jnp.int32),
            last=ids[:, -1], step=jnp.zeros((), jnp.int32), done=jnp.zeros((batch,), bool),
            lengths=jnp.zeros((batch,), jnp.int32), limit=limit, rows=rows, seed_key=jax.random.key(seed))
        return self._choose(state, out.logits[:, -1])

    def _advance_impl(self, params, state: DecodeState, num_steps) -> DecodeState:
        stop = jnp.minimum(state.step + num_steps, state.tokens.shape[1])

        def running(s: DecodeState):
            return (s.step < stop) & ~jnp.all(s.done)

        def one_step(s: DecodeState):
            out = self.model.apply({"params": params}, s.last[:, None], cache=s.cache)
            return self._choose(s.replace(cache=out.cache), out.logits[:, 0])

        return jax.lax.while_loop(running, one_step, state)

    # Host API.
    def start(self, params, batch: PromptBatch, max_new: int, spout=None, seed: int = 0,
              rows=None) -> DecodeState:
        """Prefill and choose the first token. `rows` [B]: the ids that seed each row's sampling (default
        0..B-1), so a row samples the same tokens whatever batch it is in."""
        if max_new < 1:
            raise UserError(f"--max_generate: expected at least 1, got {max_new}")
        limit = np.minimum(room_left(self.config, batch.lengths, spout is not None), max_new)
        steps = int(limit.max())
        rows = np.arange(len(limit)) if rows is None else np.asarray(rows)
        spout = None if spout is None else jnp.asarray(spout, jnp.float32)
        return self._start(params, jnp.asarray(batch.ids), jnp.asarray(batch.pad),
                           jnp.asarray(batch.num_precontext), spout, jnp.asarray(limit, jnp.int32),
                           jnp.asarray(rows, jnp.int32), seed, steps=steps)

    def advance(self, params, state: DecodeState, num_steps: int) -> DecodeState:
        """Up to `num_steps` more tokens (fewer when every row has stopped)."""
        return self._advance(params, state, jnp.asarray(num_steps, jnp.int32))

    def generate(self, params, batch: PromptBatch, max_new: int, spout=None, seed: int = 0,
                 rows=None) -> Generated:
        state = self.start(params, batch, max_new, spout, seed, rows)
        state = self.advance(params, state, state.tokens.shape[1])
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
