"""Every shipped preset in configs/ parses with load_config and has the advertised sizes."""

from pathlib import Path

import pytest

from gptsan.model.config import load_config
from gptsan.model.params import abstract_params, count_params

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# name -> (ctx, switch layers, extended layers, d, heads, experts, vocab, spout)
HEADLINE = {
    "tiny": (64, 2, 2, 64, 4, 4, 512, 16),
    "bench-small": (512, 4, 2, 512, 8, 8, 36000, 128),
    "gptsan-2.8b": (1280, 10, 0, 1024, 16, 16, 36000, 128),
    "gptsan-3b-finetune": (1280, 10, 14, 1024, 16, 16, 36000, 128),
}


def hand_count(ctx, switch, ext, d, heads, experts, vocab, spout):
    """Parameter count from spec section 2, written out term by term."""
    embeddings = vocab * d + ctx * d + (ctx * d if ext else 0) + vocab  # wte, wpe, ete, wob
    head = d * d + d  # dense/kernel, dense_1/bias
    attention = 3 * d * d + d * d + 4 * d  # qkv, o, an{l} and ln{l} g/b
    switch_ff = d * experts + 2 * experts * d * 8 * d + d * d  # router, wi, wo, softmlp
    ext_ff = d * 4 * d + 4 * d + 4 * d * d + d  # p1 (+bias), p2 (+bias)
    spout_net = 8 * spout * spout + spout * (switch + ext) * 2 * d
    return embeddings + head + (switch + ext) * attention + switch * switch_ff + ext * ext_ff + spout_net


def test_every_shipped_config_is_listed():
    assert sorted(p.stem for p in CONFIGS.glob("*.json")) == sorted(HEADLINE)


@pytest.mark.parametrize("name", sorted(HEADLINE))
def test_config_parses_with_headline_numbers(name):
    config = load_config(CONFIGS / f"{name}.json")
    got = (config.num_contexts, config.num_switch_layers, config.num_ext_layers, config.num_hidden,
           config.num_header, config.num_experts, config.num_vocabulary, config.num_spout)
    assert got == HEADLINE[name]
    assert count_params(abstract_params(config)) == hand_count(*HEADLINE[name])


def test_gptsan_2_8b_is_the_released_size():
    config = load_config(CONFIGS / "gptsan-2.8b.json")
    assert config.num_pallarelizm == 8
    # 2,779,000,992 parameters: the released "2.8B" model.
    assert count_params(abstract_params(config)) == 2_779_000_992
