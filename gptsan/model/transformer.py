"""The GPTSAN model: embeddings, Switch stages then extended stages, the tied head, and the spout.

Parameter tree (Linen `params` collection) = GPTSAN's variable names split at '/':
`{"model": {"wte", "wpe", "ete"?, "wob", "dense": {"kernel"}, "dense_1": {"bias"}, "att{l}": ..., ...},
  "pasts": {"mlp{i}": {"kernel"}, "out": {"kernel"}}}`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gptsan.model.attention import Attention, attention_mask
from gptsan.model.config import ModelConfig
from gptsan.model.dense import DenseFF, InferenceProjection
from gptsan.model.moe import SwitchFF
from gptsan.model.norm import LayerNorm
from gptsan.model.spout import Spout
from gptsan.model.weights import Bias, Kernel, normal, param, zeros


@flax.struct.dataclass
class KVCache:
    """Preallocated keys/values for incremental decoding: per layer, k[l] and v[l] [B * H, S, dh].

    One array per layer, so that a layer writes and reads its own in place (a slice of a stacked [L, ...]
    array is copied before the attention matmuls read it), with batch and heads as one leading axis: the
    matmuls' batch axis as they read it, without a reshape that would make XLA copy the written cache.
    Slot layout per row: [spout slot (if any)] [left padding] [tokens...]. `index` is the next free slot,
    `pad` [B] the left-padding count and `past` (0 or 1) whether slot 0 holds a spout key/value.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    index: jax.Array
    pad: jax.Array
    past: jax.Array

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, length: int, dtype: Any = None) -> KVCache:
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (batch * config.num_header, length, config.head_dim)
        layers = range(config.num_layers)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers), v=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   index=jnp.zeros((), jnp.int32), pad=jnp.zeros((batch,), jnp.int32), past=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    def select_rows(self, rows: jax.Array) -> KVCache:
        """The cache of batch rows `rows` [B'] (beam search's reordering)."""
        batch = self.pad.shape[0]

        def gather(x):  # [B * H, S, dh] -> [B' * H, S, dh]
            per_row = x.reshape(batch, -1, *x.shape[1:])[rows]
            return per_row.reshape(-1, *x.shape[1:])

        return self.replace(k=tuple(map(gather, self.k)), v=tuple(map(gather, self.v)), pad=self.pad[rows])


@flax.struct.dataclass
class Output:
    logits: jax.Array | None  # [B, T, V] float32; None when the model was asked for head_input only
    aux_loss: jax.Array  # scalar, summed over Switch layers
    dropped_fraction: jax.Array  # scalar, mean over Switch layers
    expert_load: jax.Array  # [S, E] fraction of tokens routed to each expert
    cache: KVCache | None = None
    hidden_states: tuple[jax.Array, ...] = ()  # each layer's output [B, T, d] when asked for
    head_input: jax.Array | None = None  # [B, T, d]: silu(dense(x)), what the tied vocabulary projection reads


def rematerialised(module: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """`module` with its activations recomputed in the backward pass (`ModelConfig.remat`): "full" keeps
    only the sub-layer's inputs, "dots" also keeps matmul outputs (recomputes the element-wise work)."""
    if policy == "none":
        return module
    saveable = jax.checkpoint_policies.checkpoint_dots if policy == "dots" else None
    return nn.remat(module, policy=saveable, static_argnums=static_argnums)


class Transformer(nn.Module):
    """GPTSAN's `model/*` scope. `inference`: weights in the inference layout (gptsan/model/inference.py)."""

    config: ModelConfig
    inference: bool = False

    @nn.compact
    def __call__(self, ids, positions, mask, spout_kv=None, cache: KVCache | None = None, write_index=None,
                 train: bool = False, return_hidden: bool = False, return_logits: bool = True,
                 causal: bool = False):
        """`causal`: `mask` is exactly causal after the spout slot (see `Attention.causal`)."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        if self.inference:  # the tied table transposed, [d, V]: the head's fast matrix-vector form
            wte = param(self, "wte_t", (c.num_hidden, c.num_vocabulary), ("embed", "vocab"), normal(0.02))
            tokens = jnp.moveaxis(jnp.take(wte, ids, axis=1), 0, -1)
        else:
            wte = param(self, "wte", (c.num_vocabulary, c.num_hidden), ("vocab", "embed"), normal(0.02))
            tokens = jnp.take(wte, ids, axis=0)
        wpe = param(self, "wpe", (c.num_contexts, c.num_hidden), ("ctx", "embed"), normal(0.01))
        x = (tokens + jnp.take(wpe, positions, axis=0)).astype(dtype)  # [B, T, d]

        AttentionLayer = rematerialised(Attention, c.remat)  # noqa: N806 (module classes)
        SwitchLayer = rematerialised(SwitchFF, c.remat, static_argnums=(2,))  # noqa: N806
        DenseLayer = rematerialised(DenseFF, c.remat)  # noqa: N806
        aux, dropped, loads, hidden = [], [], [], []
        new_k, new_v = [], []  # each layer's cache, written in place
        for layer in range(c.num_layers):
            if layer == c.num_switch_layers:
                ete = param(self, "ete", (c.num_contexts, c.num_hidden), ("ctx", "embed"), zeros)
                x = x + jnp.take(ete, positions, axis=0).astype(dtype)
            past_k = past_v = None
            if spout_kv is not None:
                past_k, past_v = spout_kv[0][layer], spout_kv[1][layer]
            attention = AttentionLayer(c, causal, self.inference, name=f"att{layer}")
            layer_cache = None if cache is None else (cache.k[layer], cache.v[layer])
            a, layer_cache = attention(x, mask, past_k, past_v, layer_cache, write_index)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
            x = LayerNorm(c.num_hidden, c.layer_norm_eps, name=f"an{layer}")(a) + x
            if layer < c.num_switch_layers:
                f, stats = SwitchLayer(c, self.inference, name=f"moe{layer}")(x, train)
                aux.append(stats["aux_loss"])
                dropped.append(stats["dropped_fraction"])
                loads.append(stats["expert_load"])
            else:
                f = DenseLayer(c, self.inference, name=f"mlp{layer}")(x)
            x = LayerNorm(c.num_hidden, c.layer_norm_eps, name=f"ln{layer}")(f) + x
            if return_hidden:
                hidden.append(x)

        if self.inference:
            h = InferenceProjection((c.num_hidden, c.num_hidden), use_bias=False, name="dense")(x)
        else:
            head, _ = Kernel((c.num_hidden, c.num_hidden), ("embed", "embed_out"), normal(0.02), name="dense")()
            h = x @ head.astype(dtype)
        head_bias = Bias(c.num_hidden, "embed", name="dense_1")()
        wob = param(self, "wob", (c.num_vocabulary,), ("vocab",), zeros)
        h = nn.silu(h + head_bias.astype(dtype))
        logits = None
        if return_logits:
            head_form = "btd,dv->btv" if self.inference else "btd,vd->btv"
            logits = jnp.einsum(head_form, h, wte.astype(dtype), preferred_element_type=jnp.float32) + wob

        if cache is not None:
            cache = cache.replace(k=tuple(new_k), v=tuple(new_v))
        num_switch = max(1, len(aux))
        return Output(
            logits=logits,
            aux_loss=sum(aux) if aux else jnp.zeros((), jnp.float32),
            dropped_fraction=sum(dropped) / num_switch if dropped else jnp.zeros((), jnp.float32),
            expert_load=jnp.stack(loads) if loads else jnp.zeros((0, c.num_experts), jnp.float32),
            cache=cache,
            hidden_states=tuple(hidden),
            head_input=h,
        )


class GPTSAN(nn.Module):
    """The whole model. Inputs:
      ids [B, T] int; num_precontext [B] (prefix length of a prefix-LM, 0 = causal);
      spout [B, P] float (one extra key/value slot per layer) or None;
      pad [B] left-padding count (batched prompts of different lengths) or None;
      cache: a KVCache to write into and attend over (prefill: index 0; then one or more tokens a call).
    return_logits=False skips the vocabulary projection (training computes it inside its fused loss from
    `Output.head_input` and the tied `model/wte`, `model/wob`).
    `inference`: the parameters are in the inference layout (gptsan/model/inference.py), as generation keeps them.
    """

    config: ModelConfig
    inference: bool = False

    @nn.compact
    def __call__(self, ids, num_precontext=None, spout=None, pad=None, cache: KVCache | None = None,
                 train: bool = False, return_hidden: bool = False, return_logits: bool = True) -> Output:
        c = self.config
        batch, length = ids.shape
        causal = cache is None and num_precontext is None and pad is None  # a plain causal mask: Attention.causal
        spout_kv = Spout(c, name="pasts")(spout) if spout is not None else None
        new_slots = length + (1 if spout is not None else 0)
        if num_precontext is None:
            num_precontext = jnp.zeros((batch,), jnp.int32)

        if cache is None:
            past = jnp.asarray(1 if spout is not None else 0, jnp.int32)
            pad = jnp.zeros((batch,), jnp.int32) if pad is None else jnp.asarray(pad, jnp.int32)
            write_index = None
            first_new_slot = jnp.zeros((), jnp.int32)
            key_slots = jnp.arange(new_slots)
        else:
            if spout is not None:
                cache = cache.replace(past=jnp.ones((), jnp.int32))
            if pad is not None:
                cache = cache.replace(pad=jnp.asarray(pad, jnp.int32))
            past, pad = cache.past, cache.pad
            write_index = cache.index
            first_new_slot = cache.index
            key_slots = jnp.arange(cache.length)

        end = first_new_slot + new_slots  # slots written after this call
        query_slots = end - length + jnp.arange(length)
        in_padding = (key_slots[None] >= past) & (key_slots[None] < past + pad[:, None])
        key_valid = (key_slots[None] < end) & ~in_padding  # [B, S]
        prefix_end = past + pad + jnp.asarray(num_precontext, jnp.int32)
        mask = attention_mask(query_slots, key_slots, key_valid, prefix_end)
        positions = jnp.clip(query_slots[None, :] - pad[:, None], 0, c.num_contexts - 1)

        out = Transformer(c, self.inference, name="model")(ids, positions, mask, spout_kv, cache, write_index, train,
                                           return_hidden, return_logits, causal)
        if cache is not None:
            out = out.replace(cache=out.cache.replace(index=end))
        return out
