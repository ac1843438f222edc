"""The demo: its corpus and classifier, and a short end-to-end run of the whole pipeline."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gptsan.demo.corpus import CLASS_NAMES, classify, write_corpus
from tests.train_support import one_device_xla_flags

ROOT = Path(__file__).resolve().parents[1]


def test_corpus_is_seeded_and_the_classifier_knows_every_class(tmp_path):
    csv_a = write_corpus(tmp_path / "a", docs_per_class=50, seed=7)
    csv_b = write_corpus(tmp_path / "b", docs_per_class=50, seed=7)
    rows = [line.split(",") for line in csv_a.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == ["filename", "fileid"] and len(rows) == 1 + 3 * 50
    texts_a = sorted((tmp_path / "a" / "texts").glob("*.txt"))
    texts_b = sorted((tmp_path / "b" / "texts").glob("*.txt"))
    assert [p.read_text(encoding="utf-8") for p in texts_a] == [p.read_text(encoding="utf-8") for p in texts_b]
    assert csv_b.exists()
    for path, class_id in rows[1:]:
        assert classify(Path(path).read_text(encoding="utf-8")) == int(class_id), path
    assert len({p.read_text(encoding="utf-8") for p in texts_a}) >= 140  # templates vary
    assert classify("") == -1


def test_quick_demo_runs_the_whole_pipeline(tmp_path):
    workdir = tmp_path / "demo"
    # one CPU device, as the demo runs for a user (with the suite's 8, this test took 166 s alone against 139 s on a
    # 2-vCPU Zen 1)
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=one_device_xla_flags())
    done = subprocess.run([sys.executable, "-m", "gptsan.demo", "--quick", "--workdir", str(workdir)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    *_, note, last = done.stdout.strip().splitlines()
    assert note.startswith("--quick: 20 fine-tuning steps are too few to learn the classes"), note
    assert re.fullmatch(r"demo: spout-conditioned class accuracy \d\.\d\d \(without spout training \d\.\d\d\)",
                        last), last
    assert (workdir / "corpus" / "corpus.csv").exists()
    assert (workdir / "tokenizer" / "sp.model").exists()
    assert sorted(p.name for p in (workdir / "data").iterdir()) == ["lm_0000.tfrecord"]
    finetune = workdir / "finetune"
    params = json.loads((finetune / "parameters.json").read_text())
    assert params["model_params"]["num_ext_layers"] == 2
    ignored = json.loads((finetune / "ignore-params.json").read_text())
    assert ignored and not any(name.startswith("pasts/") for name in ignored)
    assert any(p.name.isdigit() for p in finetune.iterdir())  # the fine-tuning run's checkpoint
    for stage in ("without", "with"):
        for name in CLASS_NAMES:
            records = [json.loads(line) for line in
                       (workdir / f"samples_{stage}_{name}.jsonl").read_text(encoding="utf-8").splitlines()]
            assert len(records) == 4 and all(isinstance(r["text"], str) and r["tokens"] for r in records)


def test_a_workdir_the_demo_cannot_finish_in_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """`--workdir ""` (an unset shell variable) is not the default folder, and a path with `[` would end in
    training checkpoints that Orbax saved unreadable (it globs the folder it saves in): one error line each,
    before the pipeline starts and with nothing written."""
    from gptsan.demo import run

    def started(self):
        raise AssertionError("the pipeline started")

    monkeypatch.setattr(run.Pipeline, "run", started)
    monkeypatch.chdir(tmp_path)
    assert run.main(["--quick", "--workdir", ""]) == 2
    assert capsys.readouterr().err == ("error: --workdir: empty; give a folder, or leave the flag out for "
                                       "demo_output/<date-time>\n")
    assert run.main(["--quick", "--workdir", "gs://bucket/demo"]) == 2  # was a local folder ./gs:/bucket/demo
    assert capsys.readouterr().err == "error: --workdir gs://bucket/demo: the demo works in a local folder; give a " \
        "local path\n"
    workdir = tmp_path / "run[1]"
    assert run.main(["--quick", "--workdir", str(workdir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"error: --workdir {workdir}: a path with '[' is not supported (Orbax saves unreadable "
                            "checkpoints under it); give one without '['\n")
    assert list(tmp_path.iterdir()) == []


def test_the_training_glob_takes_the_workdir_literally(tmp_path):
    """`*` and `?` in --workdir match only themselves in the records glob the demo trains on: a sibling folder
    they would also match as a pattern is left out."""
    from gptsan import storage
    from gptsan.demo.run import tfrecord_glob

    for name in ("demo*?", "demo-x"):
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "data" / "lm_0000.tfrecord").write_bytes(b"")
    own = tmp_path / "demo*?" / "data"
    assert storage.glob(tfrecord_glob(own)) == [str(own / "lm_0000.tfrecord")]


@pytest.mark.parametrize("stop, left", [(KeyboardInterrupt, False), ("step", True)])
def test_a_demo_stopped_midway(tmp_path, monkeypatch, capsys, stop, left):
    """Ctrl-C left a half-made --workdir that a rerun with it refused ("already exists"); a failed step now says
    where its outputs are, and a Ctrl-C takes them away."""
    from gptsan.demo import run
    from gptsan.errors import UserError

    def midway(self):
        (self.workdir / "corpus").mkdir()
        if stop is KeyboardInterrupt:
            raise KeyboardInterrupt
        raise UserError("demo step failed: gptsan.train.cli exited with 2")

    monkeypatch.setattr(run.Pipeline, "run", midway)
    from gptsan import errors

    def exit_now(status):  # cli_main's way out after a Ctrl-C (os._exit), which would end pytest too
        raise SystemExit(status)

    monkeypatch.setattr(errors, "exit_now", exit_now)
    workdir = tmp_path / "demo"
    if stop is KeyboardInterrupt:
        with pytest.raises(SystemExit) as caught:
            run.main(["--quick", "--workdir", str(workdir)])
        assert caught.value.code == 130
    else:
        assert run.main(["--quick", "--workdir", str(workdir)]) == 2
        assert capsys.readouterr().err == ("error: demo step failed: gptsan.train.cli exited with 2 (what the demo "
                                           f"wrote so far is in {workdir})\n")
    assert workdir.exists() == left
