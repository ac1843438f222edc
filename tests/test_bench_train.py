"""bench/train.py: its output format (not its timings), its FLOP formula and its frozen-backbone split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptsan.checkpoint.names import hf_entries
from gptsan.model.config import load_config
from gptsan.model.params import expected_shapes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import peer_hf  # noqa: E402
import run_all  # noqa: E402
import train as bench_train  # noqa: E402

REQUIRED = {"bench", "config", "batch", "dtype", "tokens_per_s", "trainable", "flops_per_token", "flop_per_s",
            "matmul_peak_flop_per_s", "peak_fraction"}


@pytest.fixture(scope="module")
def tiny():
    return load_config(ROOT / "configs" / "tiny.json")


def test_flops_per_token_by_hand(tiny):
    # tiny: d 64, T 64, V 512, E 4, 2 Switch + 2 extended layers.
    d, t, v, e = 64, 64, 512, 4
    attention = 8 * d * d + 4 * t * d  # 49,152 per layer
    forward = 4 * attention + 2 * (34 * d * d + 2 * d * e) + 2 * 16 * d * d + 2 * d * d + 2 * d * v
    assert forward == 680_960
    assert bench_train.flops_per_token(tiny, t, "all") == 3 * forward
    backward_extended = 2 * d * d + 2 * d * v + 2 * 2 * (attention + 16 * d * d)
    assert bench_train.flops_per_token(tiny, t, "extended") == forward + backward_extended == 1_213_440


def test_extended_mode_trains_extended_layers_ete_and_spout(tiny):
    frozen = bench_train.frozen_names(tiny, "extended")
    trainable = set(expected_shapes(tiny)) - frozen
    assert trainable == {
        "model/ete", *{f"pasts/mlp{i}/kernel" for i in range(8)}, "pasts/out/kernel",
        *{f"model/att{l}/{p}/kernel" for l in (2, 3) for p in ("qkv", "o")},
        *{f"model/{n}{l}/{p}" for l in (2, 3) for n in ("an", "ln") for p in ("g", "b")},
        *{f"model/mlp{l}/{p}/{w}" for l in (2, 3) for p in ("p1", "p2") for w in ("kernel", "bias")},
    }
    assert bench_train.frozen_names(tiny, "all") == frozenset()


def test_hf_freezing_matches_ours(tiny):
    """The HF port trains exactly the HF keys of our trainable parameters."""
    for entry in hf_entries(tiny):
        want = bench_train.extended_trainable(entry.name, tiny)
        assert [peer_hf.hf_trainable(key, tiny) for key in entry.hf_keys] == [want] * len(entry.hf_keys), entry


def test_bench_train_prints_one_json_line_per_mode():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train.py"), "--config", "tiny", "--batch", "1", "--steps", "2"],
        capture_output=True, text=True, env=env, timeout=300, check=True)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["trainable"] for r in records] == ["all", "extended"]
    for record in records:
        assert REQUIRED <= set(record)
        assert (record["bench"], record["config"], record["batch"], record["dtype"]) == ("train", "tiny", 1,
                                                                                         "float32")
        assert record["flops_per_token"] == bench_train.flops_per_token(load_config(ROOT / "configs/tiny.json"),
                                                                        64, record["trainable"])
        assert record["flop_per_s"] == pytest.approx(record["flops_per_token"] * record["tokens_per_s"],
                                                     abs=record["flops_per_token"] * 0.05 + 1)  # tokens/s to 0.1
        assert record["peak_fraction"] == pytest.approx(record["flop_per_s"] / record["matmul_peak_flop_per_s"],
                                                        abs=1e-4)
        assert record["tokens_per_s"] > 0 and record["loss"] == pytest.approx(6.24, abs=0.3)  # ~ln(512) at init


def test_bad_mode_is_one_line_error():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--modes", "some"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --modes: expected a comma-separated subset of all, extended"]


@pytest.mark.parametrize(("faults_per_step", "max_steps", "want"), [
    ([700_000, 505_000, 35, 518_000], bench_train.MAX_WARMUP_STEPS, 3),  # bench-small: two steps grow the heap
    ([20], bench_train.MAX_WARMUP_STEPS, 1),
    ([600_000] * 9, bench_train.MAX_WARMUP_STEPS, bench_train.MAX_WARMUP_STEPS),
    ([600_000] * 9, 2, 2),  # the HF port with glibc's default malloc: faults every step, capped at 2
])
def test_warm_up_stops_at_the_first_step_that_does_not_grow_the_heap(monkeypatch, faults_per_step, max_steps, want):
    counter = {"faults": 0, "steps": 0}

    def one_step():
        counter["faults"] += faults_per_step[counter["steps"]]
        counter["steps"] += 1

    monkeypatch.setattr(bench_train, "minor_page_faults", lambda: counter["faults"])
    assert bench_train.warm_up(one_step, max_steps=max_steps) == want == counter["steps"]


def test_run_all_runs_the_bfloat16_row_only_when_asked_to():
    with_row = [script for script, _ in run_all.benches(Path("v.txt"), bfloat16=True)]
    without = [script for script, _ in run_all.benches(Path("v.txt"), bfloat16=False)]
    assert with_row == ["peer_hf.py", "train.py", "encode.py"] and without == ["peer_hf.py", "encode.py"]
    assert "bfloat16" in run_all.benches(Path("v.txt"), bfloat16=True)[1][1]


def test_run_all_times_the_kept_memory_port_only_when_asked_to():
    def peer_arguments(**kwargs):
        return dict(run_all.benches(Path("v.txt"), bfloat16=False, **kwargs))["peer_hf.py"]

    assert "--hf_kept_memory" not in peer_arguments()
    assert "--hf_kept_memory" in peer_arguments(hf_kept_memory=True)
    assert peer_hf.parse_args(["--hf_kept_memory"]).hf_kept_memory and not peer_hf.parse_args([]).hf_kept_memory


def test_run_all_reports_each_target_of_the_run():
    records = [
        {"bench": "peer_hf_train", "trainable": "all", "peak_fraction": 0.6104, "ratio": 2.44},
        {"bench": "peer_hf_train", "trainable": "extended", "peak_fraction": 0.74, "ratio": 1.19},
        {"bench": "train", "trainable": "all", "dtype": "bfloat16", "peak_fraction": 0.2},
    ]
    assert run_all.target_lines(records) == [
        "target: all-trainable training, fraction of the matmul peak >= 0.6: 0.610 (met)",
        "target: all-trainable training, times the HF port >= 1.2: 2.440 (met)",
        "target: extended-only training, times the HF port >= 1.2: 1.190 (not met)",
        "target: batch-1 decode, fraction of the memory bandwidth >= 0.8: not measured",
    ]


def test_run_all_notes_how_idle_vcpus_wait(monkeypatch, tmp_path):
    setting = tmp_path / "guest_halt_poll_ns"
    setting.write_text("200000\n")
    monkeypatch.setattr(run_all, "HALTPOLL_NS", setting)
    assert run_all.idle_polling() == ", haltpoll guest_halt_poll_ns 200000"
    monkeypatch.setattr(run_all, "HALTPOLL_NS", tmp_path / "absent")
    assert run_all.idle_polling() == ""


def test_run_all_ends_with_an_error_when_a_bench_fails(monkeypatch, tmp_path, capsys):
    """A failed bench showed only in its stderr tail, and the run exited 0 with the row missing from the table.
    The records of the others are still printed and written."""
    monkeypatch.setattr(run_all, "benches", lambda *args, **kwargs: [("good", []), ("bad", [])])
    outcomes = {"good": ([{"bench": "train", "tokens_per_s": 5.0}], 0), "bad": ([], 1)}
    monkeypatch.setattr(run_all, "run_bench", lambda script, arguments: outcomes[script])
    out = tmp_path / "all.jsonl"
    assert run_all.main(["--json", str(out), "--vocabulary", str(tmp_path / "absent.txt")]) == 2
    printed = capsys.readouterr()
    assert printed.err.splitlines()[-1] == "error: 1 bench failed: bad (exit 1) (their output above)"
    assert "| train |" in printed.out and json.loads(out.read_text()) == {"bench": "train", "tokens_per_s": 5.0}


def test_run_all_refuses_a_json_path_it_cannot_write_before_any_bench(monkeypatch, tmp_path, capsys):
    """A folder as --json was an IsADirectoryError traceback after minutes of benches (and a stray `.tmp`)."""
    monkeypatch.setattr(run_all, "run_bench", lambda *args: pytest.fail("a bench ran"))
    assert run_all.main(["--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --json {tmp_path}: is a folder; give a file name\n"
    assert list(tmp_path.parent.glob(f"{tmp_path.name}.tmp*")) == []


@pytest.mark.parametrize("script, flags, line", [
    ("train.py", ["--batch", "0"], "train.py: error: argument --batch: expected a positive integer, got '0'"),
    ("train.py", ["--steps", "x"], "train.py: error: argument --steps: expected a positive integer, got 'x'"),
    ("generate.py", ["--repeats", "0"], "generate.py: error: argument --repeats: expected a positive integer, got '0'"),
    ("generate.py", ["--config", "tiny", "--new_tokens", "128"],
     "error: --new_tokens: expected 2 to 48 (the 16-token prompt's room in tiny's 64-token context), got 128"),
    ("generate.py", ["--config", "tiny", "--new_tokens", "1"],
     "error: --new_tokens: expected 2 to 48 (the 16-token prompt's room in tiny's 64-token context), got 1"),
    ("generate.py", ["--config", "nosuch"],
     "error: --config: expected a preset (bench-small, gptsan-2.8b, gptsan-3b-finetune, tiny) or a parameters.json "
     "path, got 'nosuch'"),
    ("peer_hf.py", ["--steps", "0"], "peer_hf.py: error: argument --steps: expected a positive integer, got '0'"),
    ("encode.py", ["--size_mb", "0"], "encode.py: error: argument --size_mb: expected a positive number, got '0'"),
    ("encode.py", ["--vocabulary", "nosuch.txt"], "error: nosuch.txt: vocabulary file not found"),
])
def test_bench_flags_a_script_cannot_use_are_one_line(script, flags, line):
    """Each was a traceback, a figure from steps never run (--new_tokens past the context: a bandwidth fraction
    above 1), or a line naming another flag."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *flags], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1] == line
