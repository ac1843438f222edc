"""Beam search: `width` live hypotheses per prompt, a pool of the `width` best finished ones, and early
stopping only when no live hypothesis can still beat the worst finished one.

The search is written over two functions, so it runs on the model's KV cache and on a hand-made scorer alike:
  step(carry, tokens [N]) -> (logits [N, V], carry)   the next-token logits after feeding `tokens`
  gather(carry, rows [N]) -> carry                     pick (and copy) rows of the batch x beam carry
A hypothesis's score is the sum of its tokens' log-probabilities divided by length ** length_penalty
(its length counts the end token). Live hypotheses at the length limit are finished as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gptsan.errors import UserError
from gptsan.generate.decode import feed_map, room_left
from gptsan.generate.prompt import PromptBatch
from gptsan.generate.sampling import ban
from gptsan.model import GPTSAN, KVCache, ModelConfig

NEG_INF = -jnp.inf
Step = Callable[[Any, jax.Array], tuple[jax.Array, Any]]
Gather = Callable[[Any, jax.Array], Any]


@flax.struct.dataclass
class BeamState:
    carry: Any  # the step function's state for B x W rows (the KV cache)
    alive_tokens: jax.Array  # [B, W, N]
    alive_logprob: jax.Array  # [B, W] summed log-probabilities; -inf = empty beam
    done_tokens: jax.Array  # [B, W, N]
    done_score: jax.Array  # [B, W] length-normalised score, best first; -inf = empty slot
    done_logprob: jax.Array  # [B, W]
    done_length: jax.Array  # [B, W] tokens including the end token (if it ended with one)
    limit: jax.Array  # [B] most tokens a hypothesis of that prompt may have
    step: jax.Array  # () tokens in every live hypothesis


@flax.struct.dataclass
class BeamResult:
    tokens: jax.Array  # [B, W, N] best first; the end id fills each after its length
    scores: jax.Array  # [B, W] length-normalised, descending
    logprobs: jax.Array  # [B, W] summed log-probabilities of the tokens (end token included)
    lengths: jax.Array  # [B, W] generated tokens, the end token excluded


def normalise(logprob: jax.Array, length: jax.Array, length_penalty: float) -> jax.Array:
    return logprob / jnp.power(length.astype(jnp.float32), length_penalty)


def best_possible(alive_logprob: jax.Array, length: jax.Array, limit: jax.Array,
                  length_penalty: float) -> jax.Array:
    """An upper bound on the score any continuation of the live hypotheses can reach: log-probabilities
    only fall, so the bound is the current sum normalised at the most favourable length. -> [B]."""
    best = alive_logprob.max(axis=1)
    return jnp.maximum(normalise(best, length, length_penalty), normalise(best, limit, length_penalty))


class BeamSearch:
    def __init__(self, step: Step, gather: Gather, width: int, end_id: int, length_penalty: float = 1.0,
                 banned_ids: tuple[int, ...] = ()):
        self.step_fn, self.gather_fn = step, gather
        self.width, self.end_id = width, end_id
        self.length_penalty, self.banned_ids = length_penalty, banned_ids

    def _expand(self, state: BeamState, logits: jax.Array) -> BeamState:
        """Extend every live hypothesis by every token, keep the best W live and the best W finished."""
        batch, width, steps = state.alive_tokens.shape
        logprobs = jax.nn.log_softmax(ban(logits.astype(jnp.float32), self.banned_ids), axis=-1)
        vocab = logprobs.shape[-1]
        total = state.alive_logprob[..., None] + logprobs.reshape(batch, width, vocab)  # [B, W, V]
        cand_logprob, flat = jax.lax.top_k(total.reshape(batch, width * vocab), 2 * width)  # [B, 2W]
        cand_beam, cand_token = flat // vocab, flat % vocab
        cand_tokens = jnp.take_along_axis(state.alive_tokens, cand_beam[..., None], axis=1)
        cand_tokens = jax.lax.dynamic_update_slice(cand_tokens, cand_token[..., None], (0, 0, state.step))
        length = state.step + 1
        finishing = (cand_token == self.end_id) | (length >= state.limit)[:, None]

        # Finished pool: the best W of (old pool, candidates that finish now).
        cand_score = jnp.where(finishing, normalise(cand_logprob, length, self.length_penalty), NEG_INF)
        pool_score = jnp.concatenate([state.done_score, cand_score], axis=1)
        done_score, pick = jax.lax.top_k(pool_score, width)

        def pool(old, new):
            merged = jnp.concatenate([old, new], axis=1)
            index = pick.reshape(pick.shape + (1,) * (merged.ndim - 2))
            return jnp.take_along_axis(merged, index, axis=1)

        done_tokens = pool(state.done_tokens, cand_tokens)
        done_logprob = pool(state.done_logprob, cand_logprob)
        done_length = pool(state.done_length, jnp.full_like(cand_token, length))

        # Live beams: the best W candidates that do not finish.
        alive_logprob, keep = jax.lax.top_k(jnp.where(finishing, NEG_INF, cand_logprob), width)
        alive_tokens = jnp.take_along_axis(cand_tokens, keep[..., None], axis=1)
        source_beam = jnp.take_along_axis(cand_beam, keep, axis=1)  # [B, W]
        rows = (jnp.arange(batch)[:, None] * width + source_beam).reshape(-1)
        return state.replace(carry=self.gather_fn(state.carry, rows), alive_tokens=alive_tokens,
                             alive_logprob=alive_logprob, done_tokens=done_tokens, done_score=done_score,
                             done_logprob=done_logprob, done_length=done_length, step=length)

    def _finished(self, state: BeamState) -> jax.Array:
        bound = best_possible(state.alive_logprob, state.step, state.limit, self.length_penalty)
        worst_done = state.done_score[:, -1]
        return jnp.all((worst_done > NEG_INF) & (worst_done >= bound) | (state.step >= state.limit))

    def search(self, carry: Any, first_logits: jax.Array, limit: jax.Array, steps: int) -> BeamResult:
        """carry: the step state for B rows after the prompt; first_logits [B, V] the logits that follow it;
        limit [B] the most tokens per prompt (<= steps). Traceable (call inside jit)."""
        batch = first_logits.shape[0]
        width = self.width
        empty = jnp.full((batch, width), NEG_INF, jnp.float32)
        state = BeamState(
            carry=self.gather_fn(carry, jnp.repeat(jnp.arange(batch), width)),
            alive_tokens=jnp.full((batch, width, steps), self.end_id, jnp.int32),
            alive_logprob=empty.at[:, 0].set(0.0),  # one live beam to start from
            done_tokens=jnp.full((batch, width, steps), self.end_id, jnp.int32),
            done_score=empty, done_logprob=empty, done_length=jnp.ones((batch, width), jnp.int32),
            limit=jnp.minimum(limit, steps), step=jnp.zeros((), jnp.int32))
        state = self._expand(state, jnp.repeat(first_logits, width, axis=0))

        def body(s: BeamState) -> BeamState:
            last = jax.lax.dynamic_index_in_dim(s.alive_tokens, s.step - 1, axis=2, keepdims=False)
            logits, carry = self.step_fn(s.carry, last.reshape(-1))
            return self._expand(s.replace(carry=carry), logits)

        state = jax.lax.while_loop(lambda s: ~self._finished(s), body, state)
        ended = jnp.take_along_axis(state.done_tokens, state.done_length[..., None] - 1, axis=2)[..., 0]
        lengths = state.done_length - (ended == self.end_id)
        return BeamResult(tokens=state.done_tokens, scores=state.done_score, logprobs=state.done_logprob,
                          lengths=lengths)


class BeamDecoder:
    """Beam search on the model: prefill the prompts once, copy each prompt's cache into its W beams, and
    reorder the cache rows as beams are kept. Compiles once per input shape."""

    def __init__(self, config: ModelConfig, width: int, end_id: int, length_penalty: float = 1.0,
                 banned_ids: tuple[int, ...] = (), input_map: np.ndarray | None = None):
        """`input_map` [V]: the id fed back for each chosen token (see `Decoder`); default: the token."""
        if width < 1:
            raise UserError(f"--beam_width: expected at least 1, got {width}")
        self.config = config
        self.model = GPTSAN(config, inference=True)
        self.width, self.end_id = width, end_id
        self.length_penalty, self.banned_ids = length_penalty, banned_ids
        self.input_map = feed_map(config, input_map)
        self._search = jax.jit(self._search_impl, static_argnames=("steps",))

    def _search_impl(self, params, ids, pad, num_precontext, spout, limit, input_map, steps: int) -> BeamResult:
        batch, width = ids.shape
        past = 0 if spout is None else 1
        cache = KVCache.allocate(self.config, batch, past + width + steps)
        out = self.model.apply({"params": params}, ids, num_precontext=num_precontext, spout=spout, pad=pad,
                               cache=cache)

        def step(cache: KVCache, tokens: jax.Array):
            out = self.model.apply({"params": params}, input_map[tokens][:, None], cache=cache)
            return out.logits[:, 0], out.cache

        search = BeamSearch(step, KVCache.select_rows, self.width, self.end_id, self.length_penalty, self.banned_ids)
        return search.search(out.cache, out.logits[:, -1], limit, steps)

    def generate(self, params, batch: PromptBatch, max_new: int, spout=None) -> BeamResult:
        if max_new < 1:
            raise UserError(f"--max_generate: expected at least 1, got {max_new}")
        limit = np.minimum(room_left(self.config, batch.lengths, spout is not None), max_new)
        spout = None if spout is None else jnp.asarray(spout, jnp.float32)
        result = self._search(params, jnp.asarray(batch.ids), jnp.asarray(batch.pad),
                              jnp.asarray(batch.num_precontext), spout, jnp.asarray(limit, jnp.int32),
                              self.input_map, steps=int(limit.max()))
        return jax.tree.map(np.asarray, result)
