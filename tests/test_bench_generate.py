"""bench/generate.py: the bytes a decode step reads (the bound's numerator), by hand, and its record."""

import sys
from pathlib import Path

import pytest

from gptsan.model import init_params, load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import generate as bench_generate  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    config = load_config(ROOT / "configs" / "tiny.json")
    return config, init_params(config)


@pytest.mark.parametrize("batch, experts_used", [(1, 1.0), (2, 1.75)])  # 4 experts: 4 * (1 - (3/4)^2)
def test_bytes_per_step_by_hand(tiny, batch, experts_used):
    config, params = tiny
    d, vocab, experts, f = 64, 512, 4, 512  # configs/tiny.json; Switch FFN width 8d, extended 4d
    attention = 3 * d * d + d * d + 4 * d  # qkv, o, and the two LayerNorms' g and b
    switch = d * d + d * experts + experts_used * 2 * d * f  # softmlp, router, the chosen experts' wi and wo
    extended = d * 4 * d + 4 * d + 4 * d * d + d  # p1 kernel and bias, p2 kernel and bias
    head = d * d + d + vocab * d + vocab  # dense kernel and bias, the tied table, its bias
    positions = 2 * batch * d  # one row of wpe and of ete per token
    weights = 4 * (4 * attention + 2 * switch + 2 * extended + head + positions)
    cache_length = 80
    cache = 4 * 2 * 4 * batch * cache_length * d  # keys and values, 4 layers, float32
    assert bench_generate.bytes_per_step(config, params, batch, cache_length) == pytest.approx((weights, cache))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_record_of_a_short_run(tiny, dtype):
    record = bench_generate.run("tiny", 1, dtype, new_tokens=8, repeats=1, top_k=0, top_p=0.9)
    assert (record["dtype"], record["top_k"], record["top_p"]) == (dtype, 0, 0.9)
    assert record["bytes_per_token"] == record["weight_bytes_per_step"] + record["cache_bytes_per_step"]
    assert record["step_ms"] == pytest.approx(1000 / record["tokens_per_s"], rel=1e-3, abs=5e-4)  # 3 decimals
    low, high = record["bandwidth_readings_gbs"]  # rounded to 0.1 GB/s, bandwidth_gbs to 0.01
    both_roundings = 0.05 + 0.005 + 1e-9  # each is off by up to half its last digit, plus float error
    assert 0 < low - both_roundings <= record["bandwidth_gbs"] <= high + both_roundings
    assert record["bandwidth_fraction"] == pytest.approx(
        record["bytes_per_token"] * record["tokens_per_s"] / 1e9 / record["bandwidth_gbs"], rel=0.02, abs=1e-3)
    assert record["matvec_chain_ms"] > 0 and record["fraction_of_matvec_chain"] > 0


def test_bad_sampler_flags_are_one_error_line(capsys):
    assert bench_generate.main(["--config", "tiny", "--top_p", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == ["error: --top_p: expected a number in (0, 1], got 0.0"]
