"""The name tables: GPTSAN parameter names <-> each foreign format's keys, with the transform per key.

gptsan's parameter paths ARE GPTSAN's original TF variable names, so the TF table is the identity (minus the
optimizer slots a TF checkpoint may also hold). The Hugging Face table is below: one row per GPTSAN name
template, the HF key template(s) it becomes and the transform between the two layouts. Placeholders: `{l}`
layer, `{i}` spout MLP index, `{e}` expert. Every loader and writer goes through these tables; nothing else
in the package spells a foreign key.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gptsan.model.config import ModelConfig
from gptsan.model.spout import NUM_SPOUT_MLP

# ---- TF: identity table; these checkpoint entries are not parameters and are skipped. ----
TF_SKIPPED_SUFFIXES = ("/adam_m", "/adam_v")
TF_SKIPPED_NAMES = ("global_step",)


def is_tf_parameter(name: str) -> bool:
    return name not in TF_SKIPPED_NAMES and not name.endswith(TF_SKIPPED_SUFFIXES)


# ---- Hugging Face GPTSanJapanese. ----
# Which layers a row applies to: every model once, every layer, Switch layers (l < S), extended layers
# (l >= S), the extended-position table (only when X > 0), the spout MLPs (i = 0..7).
ONCE, EVERY_LAYER, SWITCH, EXTENDED, IF_EXTENDED, SPOUT_MLP = (
    "once", "every_layer", "switch", "extended", "if_extended", "spout_mlp")

_BLOCK = "model.blocks.{l}"
HF_TABLE: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    # (applies to, GPTSAN name, HF key(s), transform)
    (ONCE, "model/wte", ("model.embed_tokens.weight",), "copy"),
    (ONCE, "model/wpe", ("model.position_embeddings.weight",), "copy"),
    (IF_EXTENDED, "model/ete", ("model.extra_position_embeddings.weight",), "copy"),
    (ONCE, "model/wob", ("final_logits_bias",), "row"),
    (ONCE, "model/dense/kernel", ("model.last_project.weight",), "transpose"),
    (ONCE, "model/dense_1/bias", ("model.last_project.bias",), "copy"),
    (EVERY_LAYER, "model/att{l}/qkv/kernel",
     tuple(f"{_BLOCK}.self_attn.self_attn.{p}_proj.weight" for p in "qkv"), "split_qkv"),
    (EVERY_LAYER, "model/att{l}/o/kernel", (f"{_BLOCK}.self_attn.self_attn.out_proj.weight",), "merge_heads"),
    (EVERY_LAYER, "model/an{l}/g", (f"{_BLOCK}.self_attn.norm.weight",), "copy"),
    (EVERY_LAYER, "model/an{l}/b", (f"{_BLOCK}.self_attn.norm.bias",), "copy"),
    (EVERY_LAYER, "model/ln{l}/g", (f"{_BLOCK}.feed_forward.norm.weight",), "copy"),
    (EVERY_LAYER, "model/ln{l}/b", (f"{_BLOCK}.feed_forward.norm.bias",), "copy"),
    (SWITCH, "model/moe{l}/switch_gating/kernel", (f"{_BLOCK}.feed_forward.mlp.router.classifier.weight",),
     "transpose"),
    (SWITCH, "model/moe{l}/softmlp/kernel", (f"{_BLOCK}.feed_forward.soft_bypass_mlp.weight",), "transpose"),
    (SWITCH, "model/moe{l}/wi/kernel", (f"{_BLOCK}.feed_forward.mlp.experts.expert_{{e}}.wi.weight",),
     "split_experts"),
    (SWITCH, "model/moe{l}/wo/kernel", (f"{_BLOCK}.feed_forward.mlp.experts.expert_{{e}}.wo.weight",),
     "split_experts"),
    (EXTENDED, "model/mlp{l}/p1/kernel", (f"{_BLOCK}.feed_forward.mlp.wi.weight",), "transpose"),
    (EXTENDED, "model/mlp{l}/p1/bias", (f"{_BLOCK}.feed_forward.mlp.wi.bias",), "copy"),
    (EXTENDED, "model/mlp{l}/p2/kernel", (f"{_BLOCK}.feed_forward.mlp.wo.weight",), "transpose"),
    (EXTENDED, "model/mlp{l}/p2/bias", (f"{_BLOCK}.feed_forward.mlp.wo.bias",), "copy"),
    # The HF spout is an nn.Sequential of (Linear, Tanh) x 8 then Linear: Linear i sits at index 2i.
    (SPOUT_MLP, "pasts/mlp{i}/kernel", ("model.spout.{i2}.weight",), "transpose"),
    (ONCE, "pasts/out/kernel", (f"model.spout.{2 * NUM_SPOUT_MLP}.weight",), "transpose"),
)

# Present in some HF folders, tied to model.embed_tokens.weight (the loader checks it and drops it).
HF_TIED_HEAD = "lm_head.weight"
HF_EMBEDDING = "model.embed_tokens.weight"


# Transforms: GPTSAN array -> the HF arrays (in the row's key order), and back. `to_hf` uses only array
# methods so that it also runs on jax.eval_shape's abstract values (to derive the expected HF shapes).
def _split_qkv(kernel):  # [d, 3, H, dh] -> 3 x [H*dh, d]
    d = kernel.shape[0]
    return [kernel[:, j].reshape(d, -1).T for j in range(3)]


def _merge_qkv(parts, num_header):  # 3 x [H*dh, d] -> [d, 3, H, dh]
    d = parts[0].shape[1]
    return np.stack([p.T.reshape(d, num_header, -1) for p in parts], axis=1)


def _merge_heads_to_hf(kernel):  # [H, dh, d] -> [d, H*dh]
    return [kernel.reshape(-1, kernel.shape[-1]).T]


def _merge_heads_from_hf(parts, num_header):  # [d, H*dh] -> [H, dh, d]
    weight = parts[0]
    return weight.T.reshape(num_header, -1, weight.shape[0])


TRANSFORMS = {
    # name: (to_hf(array) -> list of arrays, from_hf(list of arrays, num_header) -> array)
    "copy": (lambda a: [a], lambda parts, h: parts[0]),
    "transpose": (lambda a: [a.T], lambda parts, h: parts[0].T),
    "row": (lambda a: [a.reshape(1, -1)], lambda parts, h: parts[0].reshape(-1)),  # wob [V] <-> [1, V]
    "split_qkv": (_split_qkv, _merge_qkv),
    "merge_heads": (_merge_heads_to_hf, _merge_heads_from_hf),
    "split_experts": (lambda a: [a[e].T for e in range(a.shape[0])],  # [E, m, n] <-> E x [n, m]
                      lambda parts, h: np.stack([p.T for p in parts])),
}


@dataclasses.dataclass(frozen=True)
class HFEntry:
    """One GPTSAN parameter and the HF keys that hold it (for a concrete config)."""

    name: str
    hf_keys: tuple[str, ...]
    transform: str

    def to_hf(self, array) -> dict[str, object]:
        return dict(zip(self.hf_keys, TRANSFORMS[self.transform][0](array), strict=True))

    def from_hf(self, tensors: dict[str, np.ndarray], num_header: int) -> np.ndarray:
        return TRANSFORMS[self.transform][1]([tensors[key] for key in self.hf_keys], num_header)


def hf_entries(config: ModelConfig) -> list[HFEntry]:
    """The HF table expanded for `config`: one entry per GPTSAN parameter."""
    layers = {
        ONCE: [None],
        EVERY_LAYER: range(config.num_layers),
        SWITCH: range(config.num_switch_layers),
        EXTENDED: range(config.num_switch_layers, config.num_layers),
        IF_EXTENDED: [None] if config.num_ext_layers else [],
        SPOUT_MLP: range(NUM_SPOUT_MLP),
    }
    entries = []
    for applies_to, name, keys, transform in HF_TABLE:
        for n in layers[applies_to]:
            fill = {"l": n, "i": n, "i2": None if n is None else 2 * n}
            expanded = [key.format(e="{e}", **fill) for key in keys]
            if transform == "split_experts":
                expanded = [key.format(e=e) for key in expanded for e in range(config.num_experts)]
            entries.append(HFEntry(name.format(**fill), tuple(expanded), transform))
    return entries
