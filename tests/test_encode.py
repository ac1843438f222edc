"""The corpus encoder: record layout per mode, class ids, splitting, determinism, bad inputs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptsan.data.encode import EncodeConfig, TokenizerSpec, WorkerJob, main, run
from gptsan.data.layout import LayoutSettings
from gptsan.data.schema import frame, parse_example, read_frames, record_from_example
from gptsan.errors import UserError
from gptsan.tokenizer.base import SENTENCE_PUNCTUATION
from gptsan.tokenizer.swe import SWETokenizer
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
SOT, MASK, SEP, PAD, BAG, SEG, EOT, BR = 35993, 35994, 35995, 35996, 35997, 35998, 35999, 35715


@pytest.fixture(scope="module")
def vocab() -> str:
    return str(shared_path("vocab", "ja-swe36k.txt"))


@pytest.fixture(scope="module")
def swe(vocab) -> SWETokenizer:
    return SWETokenizer(vocab)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def encode(vocab, inputs, out_dir, *, seed=0, num_process=1, **layout):
    config = EncodeConfig(
        input_files=str(inputs), tokenizer=TokenizerSpec("swe", vocab), layout=LayoutSettings(**layout),
        output_dir=str(out_dir), num_process=num_process, seed=seed, progress=False,
    )
    return run(config)


def read_records(out_dir, pattern="*.tfrecord"):
    records = []
    for path in sorted(Path(out_dir).glob(pattern)):
        with open(path, "rb") as f:
            records += [record_from_example(parse_example(data)) for data in read_frames(f, str(path))]
    return records


def body_tokens(swe, line):
    """What a body line becomes: clean-text ids, runs compressed, then <BR>."""
    return swe.encode_body(line.strip()) + [BR]


# ---- lm layout ----------------------------------------------------------------------------------------


def test_lm_record_layout_targets_and_padding(vocab, swe, tmp_path):
    lines = ["今日は良い天気です。", "ああああああ、すごい！"]
    write(tmp_path / "in" / "a.txt", "\n".join(lines) + "\n")
    encode(vocab, tmp_path / "in" / "*.txt", tmp_path / "out", num_context=48)
    (record,) = read_records(tmp_path / "out")
    body = body_tokens(swe, lines[0]) + body_tokens(swe, lines[1])
    dots = swe.ids_of_chars(SENTENCE_PUNCTUATION)
    body_x = [SEP if t in dots else t for t in body]
    n = 2 + len(body) + 1
    assert record.x[:n].tolist() == [SOT, SEG, *body_x, EOT]
    assert (record.x[n:] == PAD).all()
    assert record.y[:n].tolist() == [-1, *body, EOT, -1]
    assert (record.y[n:] == -1).all()
    assert record.num_input == 1 and record.i == 0


def test_every_line_ends_with_br_and_runs_become_bag(vocab, swe, tmp_path):
    write(tmp_path / "in" / "a.txt", "ああああああ\n\nいい\n")
    encode(vocab, tmp_path / "in" / "*.txt", tmp_path / "out", num_context=16)
    (record,) = read_records(tmp_path / "out")
    a, i = swe.encode("あ")[0], swe.encode("い")[0]
    assert record.x[:8].tolist() == [SOT, SEG, a, BAG, BR, BR, i, i]
    assert record.x[8:10].tolist() == [BR, EOT]


@pytest.mark.parametrize("text", [b"a\r\n\r\nb c\r\n", b"a\r\rb c", b"\xef\xbb\xbfa\n\nb c"])
def test_every_line_end_style_gives_the_same_record(vocab, swe, tmp_path, text):
    """CR LF, CR and a final line without its end (and a BOM) give what LF does: <BR> after every line."""
    (tmp_path / "a.txt").write_bytes(text.replace(b"a", "あい".encode()).replace(b"b c", "う\u3000え".encode()))
    encode(vocab, tmp_path / "a.txt", tmp_path / "out", num_context=16)
    (record,) = read_records(tmp_path / "out")
    ai, u, e = swe.encode("あい") + swe.encode("う") + swe.encode("え")
    assert record.x[:10].tolist() == [SOT, SEG, ai, BR, BR, u, swe.encode(" ")[0], e, BR, EOT]


def test_separator_replaces_sentence_punctuation_in_x_only(vocab, swe, tmp_path):
    write(tmp_path / "in" / "a.txt", "はい。いいえ！本当？\n")
    encode(vocab, tmp_path / "in" / "*.txt", tmp_path / "out", num_context=24)
    (record,) = read_records(tmp_path / "out")
    punctuation = [swe.encode(c)[0] for c in "。！？"]
    assert (record.x == SEP).sum() == 3
    assert not np.isin(record.x, punctuation).any()
    assert np.isin(record.y, punctuation).sum() == 3
    shifted = record.x[1:].copy()
    shifted[shifted == SEP] = record.y[:-1][shifted == SEP]
    counted = record.y[:-1] != -1
    assert (record.y[:-1][counted] == shifted[counted]).all()


def test_long_document_splits_into_records_without_losing_tokens(vocab, swe, tmp_path):
    lines = [f"{k}番目の行です。" for k in range(30)]
    write(tmp_path / "in" / "a.txt", "\n".join(lines))
    encode(vocab, tmp_path / "in" / "*.txt", tmp_path / "out", num_context=16)
    records = read_records(tmp_path / "out")
    stream = [t for line in lines for t in body_tokens(swe, line)]
    assert len(records) > 5
    collected = []
    for k, record in enumerate(records):
        last = k == len(records) - 1
        assert record.x[:2].tolist() == [SOT, SEG]
        assert (EOT in record.x.tolist()) == last
        collected += record.y[1:][record.y[1:] != -1].tolist()[: None if last else 14]
        if not last:
            assert record.y[-1] == records[k + 1].y[1]  # the continuation's first token
    assert collected == stream + [EOT]


# ---- class ids ----------------------------------------------------------------------------------------


def test_csv_fileid_becomes_i(vocab, tmp_path):
    write(tmp_path / "data" / "A.txt", "あいうえお\n")
    write(tmp_path / "data" / "B.txt", "かきくけこ\n")
    csv_path = write(tmp_path / "list.csv", "filename,fileid\ndata/A.txt,7\ndata/B.txt,3\n")
    encode(vocab, csv_path, tmp_path / "out", num_context=16)
    ids = sorted((r.i, r.x[2]) for r in read_records(tmp_path / "out"))
    assert [i for i, _ in ids] == [3, 7]


def test_list_file_recognised_by_its_header_whatever_its_name(vocab, tmp_path):
    write(tmp_path / "data" / "A.txt", "あいうえお\n")
    listing = write(tmp_path / "files.txt", "filename,fileid\ndata/A.txt,42\n")
    encode(vocab, listing, tmp_path / "out", num_context=16)
    assert [r.i for r in read_records(tmp_path / "out")] == [42]


def test_a_plain_list_file_names_one_file_a_line_with_or_without_a_class_id(vocab, tmp_path):
    """The original's list file (no header; its branch was broken): it was encoded as a document, the file
    names becoming the corpus."""
    for name in ("A.txt", "B.txt", "C.txt"):
        write(tmp_path / "data" / name, f"{name}の中身\n")
    listing = write(tmp_path / "files.txt", "data/A.txt 7\n\ndata/B.txt\ndata/C.txt\t-3\n")
    encode(vocab, listing, tmp_path / "out", num_context=16)
    assert sorted(r.i for r in read_records(tmp_path / "out")) == [-3, 1, 7]  # B.txt: its position in the list

    write(tmp_path / "bad.txt", "data/A.txt\ndata/missing.txt 2\n")
    with pytest.raises(UserError, match=r"bad.txt:2: data/missing.txt 2 not found \(a list file names one"):
        encode(vocab, tmp_path / "bad.txt", tmp_path / "out2", num_context=16)


@pytest.mark.parametrize("listing, message", [
    ("data/typo.txt 1\ndata/A.txt 2\n", "files.txt:1: data/typo.txt 1 not found (a list file names one"),
    ("data/A.txt x\n", "files.txt:1: the class id must be an integer (int64), got 'x'"),
    ("\n\ndata/A.txt 1.5\ndata/B.txt 2\n", "files.txt:3: the class id must be an integer (int64), got '1.5'"),
])
def test_a_plain_list_whose_first_line_is_wrong_stops_there(vocab, tmp_path, listing, message):
    """Only the first line told a list from a document: a list with a misspelt first name (or a first class id
    that was no integer) was encoded as a document, exit 0, the list's own text the corpus."""
    for name in ("A.txt", "B.txt"):
        write(tmp_path / "data" / name, f"{name}の中身\n")
    with pytest.raises(UserError, match=re.escape(message)):
        encode(vocab, write(tmp_path / "files.txt", listing), tmp_path / "out", num_context=16)
    assert not (tmp_path / "out").exists()


def test_a_document_that_names_no_file_is_a_document(vocab, swe, tmp_path):
    write(tmp_path / "data" / "A.txt", "中身\n")
    document = write(tmp_path / "doc.txt", "".join(f"{k}行目の文です。\n" for k in range(30)) + "data/A.txt\n")
    encode(vocab, document, tmp_path / "out", num_context=512)
    (record,) = read_records(tmp_path / "out")  # line 31 names a file, past the lines a list is told by
    assert swe.decode(record.y[1:record.y.tolist().index(EOT)].tolist()).startswith("0行目の文です。\n1行目")


def test_glob_inputs_get_their_position_in_the_sorted_list(vocab, tmp_path):
    for name in ("c.txt", "a.txt", "b.txt"):
        write(tmp_path / "in" / name, f"{name}の中身\n")
    encode(vocab, tmp_path / "in" / "*.txt", tmp_path / "out", num_context=32)
    assert sorted(r.i for r in read_records(tmp_path / "out")) == [0, 1, 2]


def test_an_existing_file_with_brackets_in_its_name_is_that_file(vocab, swe, tmp_path):
    """`doc[1].txt` was taken as a glob: "no file matches" (or here, `doc1.txt` instead)."""
    write(tmp_path / "doc[1].txt", "括弧の文書\n")
    write(tmp_path / "doc1.txt", "別の文書\n")
    encode(vocab, tmp_path / "doc[1].txt", tmp_path / "out", num_context=16)
    (record,) = read_records(tmp_path / "out")
    assert swe.decode(record.y[1 : record.y.tolist().index(EOT)].tolist()) == "括弧の文書\n"


def test_a_csv_list_with_brackets_in_its_name_is_a_list(vocab, swe, tmp_path):
    """`list [v2].csv` was "no file matches"; escaped as a glob it was encoded as a text document, which it
    still is: a CSV list is named exactly, and the files a glob matches are documents."""
    write(tmp_path / "data" / "A.txt", "あいうえお\n")
    listing = write(tmp_path / "list [v2].csv", "filename,fileid\ndata/A.txt,9\n")
    encode(vocab, listing, tmp_path / "listed", num_context=16)
    assert [r.i for r in read_records(tmp_path / "listed")] == [9]
    encode(vocab, tmp_path / "list [[]v2].csv", tmp_path / "globbed", num_context=32)
    (record,) = read_records(tmp_path / "globbed")
    assert record.i == 0
    assert swe.decode(record.y[1 : record.y.tolist().index(EOT)].tolist()) == listing.read_text()


# ---- hybrid and mlm -----------------------------------------------------------------------------------


def corpus(tmp_path, files=4, lines=40):
    for f in range(files):
        text = "\n".join(f"文書{f}の{k}行目は東京と大阪の話です。" for k in range(lines))
        write(tmp_path / "in" / f"{f}.txt", text + "\n")
    return tmp_path / "in" / "*.txt"


def test_hybrid_prefix_has_no_loss_and_segmenter_at_num_input(vocab, tmp_path):
    encode(vocab, corpus(tmp_path), tmp_path / "out", mode="hybrid", num_context=64, num_mask=0.0)
    records = read_records(tmp_path / "out")
    lengths = {r.num_input for r in records}
    assert len(lengths) > 5  # random prefix lengths
    for r in records:
        assert r.x[r.num_input] == SEG and r.x[0] == SOT
        assert (r.y[: r.num_input] == -1).all()


def test_hybrid_rate_and_prefix_length_distribution(vocab, tmp_path):
    """With probability `hybrid_rate` a record has a prefix, of a length uniform over 0..num_context - 3."""
    inputs = corpus(tmp_path, files=4, lines=500)
    encode(vocab, inputs, tmp_path / "out", mode="hybrid", num_context=32, num_mask=0.0, hybrid_rate=0.25, seed=3)
    records = read_records(tmp_path / "out")
    full = np.array([r.num_input - 1 for r in records if EOT not in r.y])  # the last record's prefix may be cut
    room = 32 - 3
    assert len(full) > 900 and full.max() == room
    with_prefix = full[full > 0]
    expected_share = 0.25 * room / (room + 1)  # a drawn length of 0 looks like an lm record
    assert abs(len(with_prefix) / len(full) - expected_share) < 4 * np.sqrt(0.25 / len(full))
    assert abs(with_prefix.mean() - (room + 1) / 2) < 4 * np.sqrt((room**2 / 12) / len(with_prefix))
    first_half = np.count_nonzero(with_prefix <= room // 2) / len(with_prefix)
    assert abs(first_half - (room // 2) / room) < 0.1


def test_hybrid_rate_zero_gives_lm_records(vocab, tmp_path):
    encode(vocab, corpus(tmp_path, files=1), tmp_path / "out", mode="hybrid", hybrid_rate=0.0, num_context=64)
    assert {r.num_input for r in read_records(tmp_path / "out")} == {1}


def unmasked_prefixes(vocab, tmp_path, **layout):
    """Records encoded with and without masks (same seed, so the same prefixes)."""
    encode(vocab, corpus(tmp_path), tmp_path / "plain", mode="mlm", num_context=128, num_mask=0.0, **layout)
    return read_records(tmp_path / "plain")


def test_mlm_masking_rate_replacements_and_targets(vocab, tmp_path):
    plain = unmasked_prefixes(vocab, tmp_path)
    encode(vocab, corpus(tmp_path), tmp_path / "out", mode="mlm", num_context=128, num_mask=0.2, max_mask=100)
    masked = read_records(tmp_path / "out")
    replaced = total_masks = 0
    for r, p in zip(masked, plain, strict=True):
        prefix_len = r.num_input - 1
        assert r.num_input == 126 or EOT in r.x  # all prefix but one slot, unless the document ended
        targets = np.flatnonzero(r.y[: r.num_input - 1] != -1)  # target positions inside the prefix
        assert len(targets) == int(0.2 * prefix_len)
        for t in targets:
            assert r.y[t] == p.x[t + 1]  # the original token, at the preceding position
        total_masks += len(targets)
        replaced += int((r.x[targets + 1] == MASK).sum())
        assert (r.x != p.x).sum() <= len(targets)
    assert 0.7 < replaced / total_masks < 0.9


def test_mlm_max_mask_caps_and_no_offset_puts_targets_on_the_mask(vocab, tmp_path):
    plain = unmasked_prefixes(vocab, tmp_path)
    encode(vocab, corpus(tmp_path), tmp_path / "out", mode="mlm", num_context=128, num_mask=0.5, max_mask=5,
           no_offset_mlm=True)
    for r, p in zip(read_records(tmp_path / "out"), plain, strict=True):
        targets = np.flatnonzero(r.y[1 : r.num_input] != -1) + 1
        assert len(targets) == 5
        assert (r.y[targets] == p.x[targets]).all()


def test_no_offset_mlm_is_for_mlm_only_as_in_the_original(vocab, tmp_path, capsys):
    """The original read --no_offset_mlm in mlm mode only; hybrid records moved their targets with it here."""
    inputs = corpus(tmp_path)
    common = ["--vocabulary", vocab, "--quiet", "--input_files", str(inputs), "--mode", "hybrid",
              "--num_context", "128", "--num_process", "1", "--num_mask", "0.2"]
    assert main([*common, "--output_dir", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*common, "--output_dir", str(tmp_path / "flag"), "--no_offset_mlm"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --no_offset_mlm applies to --mode mlm only (as in GPTSAN): the hybrid records "
                        "keep each target at the position before its mask"]
    plain, flagged = read_records(tmp_path / "plain"), read_records(tmp_path / "flag")
    assert any((r.y[: r.num_input] != -1).any() for r in plain)  # there are masks to move
    for a, b in zip(plain, flagged, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)


def test_nextsent_lead_sentence_and_targets(vocab, swe, tmp_path):
    """A "continues" lead is the document's next text (the next line, or in a record that continues a document,
    the rest of the line the previous record cut) and the text after it follows it; an "unrelated" one is a
    line of another document. Records that continued a document never got a "continues" lead (the text read
    ahead was in the way): 2 of 66 leads here were "continues", not about half."""
    encode(vocab, corpus(tmp_path, files=6, lines=40), tmp_path / "out", mode="mlm", num_context=64,
           num_mask=0.0, use_nextsent=True, seed=1)
    lines = {(f, k): f"文書{f}の{k}行目は東京と大阪の話です。" for f in range(6) for k in range(40)}
    outcomes, records = [], read_records(tmp_path / "out")
    for r in records:
        if SEP not in r.x[: r.num_input]:  # no lead possible: no text after it and no earlier document yet
            continue
        sep_at = int(np.flatnonzero(r.x == SEP)[0])
        assert 1 < sep_at < r.num_input
        outcomes.append(int(r.y[sep_at - 1]))
        lead, text = swe.decode(r.x[1:sep_at].tolist()), swe.decode(r.x[sep_at + 1 : r.num_input].tolist())
        if outcomes[-1] == SEP:  # "continues": the text starts with the line after the lead's
            f, k = map(int, re.match(r"文書(\d+)の(\d+)行目", text).groups())
            assert k > 0 and lines[f, k - 1].endswith(lead)
        else:
            assert outcomes[-1] == EOT and lead in lines.values()
            other = re.search(r"文書(\d+)", text)  # the text may be the end of a line, and the document's
            assert other is None or other[1] != re.match(r"文書(\d+)", lead)[1]
    assert len(outcomes) > 0.9 * len(records)
    assert 0.35 < outcomes.count(SEP) / len(outcomes) < 0.65


# ---- determinism and processes --------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(vocab, tmp_path):
    inputs = corpus(tmp_path)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        encode(vocab, inputs, tmp_path / name, mode="hybrid", num_context=64, seed=seed, num_process=2)
    names = ("hybrid_0000.tfrecord", "hybrid_0001.tfrecord")
    a, b, c = ([(tmp_path / d / name).read_bytes() for name in names] for d in "abc")
    assert a == b and a != c


def test_process_count_splits_the_records_but_does_not_change_them(vocab, tmp_path):
    """Workers drew from `seed + p`, so a hybrid or mlm corpus depended on --num_process (by default the
    machine's core count); each document now draws from its own generator."""
    inputs = corpus(tmp_path, files=4, lines=20)
    for processes in (1, 2):
        encode(vocab, inputs, tmp_path / f"p{processes}", mode="hybrid", num_context=48, num_mask=0.2, seed=7,
               num_process=processes)
    one, two = (read_records(tmp_path / f"p{processes}") for processes in (1, 2))
    assert len(list((tmp_path / "p2").glob("*.tfrecord"))) == 2

    def key(r):
        return r.i, r.num_input, r.x.tolist(), r.y.tolist()

    assert sorted(map(key, one)) == sorted(map(key, two))
    assert len({r.num_input for r in one}) > 5 and any((r.x == MASK).any() for r in one)


def test_cli_runs_from_any_directory_with_two_processes(vocab, tmp_path):
    inputs = corpus(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tool finds its own package
    cmd = [sys.executable, str(REPO / "tools" / "make_tfrecord_simple.py"), "--input_files", str(inputs),
           "--vocabulary", vocab, "--num_process", "2", "--num_context", "64", "--output_dir", "out"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["lm_0000.tfrecord", "lm_0001.tfrecord"]
    assert sorted({r.i for r in read_records(tmp_path / "out")}) == [0, 1, 2, 3]
    assert "wrote" in done.stderr


def test_remote_output_dir_is_written_through_fsspec(vocab, tmp_path):
    import fsspec

    encode(vocab, corpus(tmp_path, files=2), "memory://encoded/run1", num_context=64, num_process=2)
    encode(vocab, corpus(tmp_path, files=2), tmp_path / "local", num_context=64, num_process=2)
    fs = fsspec.filesystem("memory")
    names = ["/encoded/run1/lm_0000.tfrecord", "/encoded/run1/lm_0001.tfrecord"]
    assert sorted(fs.ls("/encoded/run1", detail=False)) == names
    assert fs.cat("/encoded/run1/lm_0001.tfrecord") == (tmp_path / "local" / "lm_0001.tfrecord").read_bytes()


def test_inspect_tool_prints_decoded_records(vocab, tmp_path):
    write(tmp_path / "in" / "a.txt", "猫が好きです。\n")
    encode(vocab, tmp_path / "in" / "*.txt", tmp_path / "out", num_context=16)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tool = str(REPO / "tools" / "inspect_tfrecord.py")
    cmd = [sys.executable, tool, "out/lm_0000.tfrecord", "--vocabulary", vocab]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first = "[0] i=0 num_input=1 tokens=10/16 loss_targets=8 (in prefix: 0, masks in x: 0)"
    assert done.stdout.splitlines()[0] == first
    assert "body:   '猫が好きです<|separator|>\\n'" in done.stdout  # the input shows the separator for 。


def test_inspect_tool_names_a_record_without_its_class_id_and_refuses_no_records(vocab, tmp_path):
    """An empty `i` list was an IndexError traceback; `--num -2` printed nothing and exited 0."""
    from gptsan.data.schema import serialize_example

    path = tmp_path / "bad.tfrecord"
    path.write_bytes(frame(serialize_example({"x": [SOT, SEG, EOT], "y": [-1, EOT, -1], "i": [], "num_input": [1]})))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tool = [sys.executable, str(REPO / "tools" / "inspect_tfrecord.py"), str(path), "--vocabulary", vocab]
    done = subprocess.run(tool, env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (
        2, f"error: {path}: record 0 is corrupt (features ['i'] hold [0] values, expected 1)\n")
    done = subprocess.run([*tool, "--num", "-2"], env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, "error: --num: expected at least 1 record to show, got -2\n")


def test_inspect_tool_names_the_separator_and_mask_roles(vocab):
    import importlib.util

    spec = importlib.util.spec_from_file_location("inspect_tfrecord", REPO / "tools" / "inspect_tfrecord.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tokenizer = SWETokenizer(vocab)
    ids = tokenizer.encode("猫") + [tokenizer.mask_id] + tokenizer.encode("です") + [tokenizer.separator_id]
    assert tool.readable(tokenizer, ids) == "猫<|mask|>です<|separator|>"
    assert tokenizer.decode(ids) == "猫です"  # what the tool showed before: both roles decode to nothing


# ---- bad inputs -----------------------------------------------------------------------------------------


def run_cli(vocab, tmp_path, capsys, *args):
    code = main(["--vocabulary", vocab, "--output_dir", str(tmp_path / "out"), "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    out = tmp_path / "out"
    leftovers = [out, *out.glob("*")] if out.exists() else []  # a failed run used to leave the folder it made
    return code, err[-1] if err else "", leftovers


def test_csv_without_fileid_column(vocab, tmp_path, capsys):
    write(tmp_path / "a.txt", "あ\n")
    csv_path = write(tmp_path / "list.csv", "filename\na.txt\n")
    code, err, left = run_cli(vocab, tmp_path, capsys, "--input_files", str(csv_path))
    assert code == 2 and err.startswith(f"error: {csv_path}: expected a header with columns filename,fileid")
    assert left == []


def test_csv_naming_a_missing_file(vocab, tmp_path, capsys):
    csv_path = write(tmp_path / "list.csv", "filename,fileid\nmissing.txt,1\n")
    code, err, left = run_cli(vocab, tmp_path, capsys, "--input_files", str(csv_path))
    assert code == 2 and left == []
    assert err == f"error: {csv_path}:2: missing.txt not found (looked for {tmp_path / 'missing.txt'} and missing.txt)"


def test_csv_naming_a_folder(vocab, tmp_path, capsys):
    """It said the folder was `not found`."""
    (tmp_path / "docs").mkdir()
    csv_path = write(tmp_path / "list.csv", "filename,fileid\ndocs,1\n")
    code, err, left = run_cli(vocab, tmp_path, capsys, "--input_files", str(csv_path))
    assert code == 2 and err == f"error: {csv_path}:2: docs is a folder; a list names files" and left == []


def test_a_folder_as_input_files_gets_a_hint(vocab, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    code, err, left = run_cli(vocab, tmp_path, capsys, "--input_files", str(tmp_path / "docs"))
    assert code == 2 and left == []
    assert err == (f"error: --input_files: no file matches {str(tmp_path / 'docs')!r} ({tmp_path / 'docs'} is a "
                   f"folder: give a pattern such as {tmp_path / 'docs' / '*.txt'})")


def test_an_output_dir_that_cannot_be_made_names_the_flag(vocab, tmp_path, capsys):
    """`error: out/a.txt/sub: Not a directory` did not say which flag."""
    write(tmp_path / "a.txt", "あ\n")
    code, err, _ = run_cli(vocab, tmp_path, capsys, "--input_files", str(tmp_path / "a.txt"), "--output_dir",
                           str(tmp_path / "a.txt" / "sub"))
    assert code == 2 and err == (f"error: --output_dir {tmp_path / 'a.txt' / 'sub'}: {tmp_path / 'a.txt'} is a file, "
                                 "not a folder")


@pytest.mark.parametrize("fileid", ["x5", "--5", "²", "99999999999999999999999"])
def test_csv_fileid_that_is_no_int64(vocab, tmp_path, capsys, fileid):
    """`--5` and `²` passed the old digit check and `int()` then raised; a huge id overflowed in the worker."""
    write(tmp_path / "a.txt", "あ\n")
    csv_path = write(tmp_path / "list.csv", f"filename,fileid\na.txt,{fileid}\n")
    code, err, left = run_cli(vocab, tmp_path, capsys, "--input_files", str(csv_path))
    assert code == 2 and err == f"error: {csv_path}:2: fileid must be an integer (int64), got {fileid!r}"
    assert left == []


def test_a_csv_list_that_is_not_utf8_is_one_error(vocab, tmp_path, capsys):
    """A Shift-JIS list (what a spreadsheet on Windows saves) was a UnicodeDecodeError traceback."""
    write(tmp_path / "あ.txt", "あ\n")
    csv_path = tmp_path / "list.csv"
    csv_path.write_bytes("filename,fileid\nあ.txt,1\n".encode("shift_jis"))
    code, err, left = run_cli(vocab, tmp_path, capsys, "--input_files", str(csv_path))
    assert code == 2 and err == f"error: {csv_path}: not UTF-8 (byte 0x82 at offset 16)" and left == []


def test_a_path_refused_inside_a_worker_is_the_one_line_one_process_gives(vocab):
    """With --num_process > 1 a worker's OSError (no permission, disk full) was a RuntimeError traceback."""
    from gptsan.data.encode import _worker_entry

    class Pipe:
        def send(self, message):
            self.message = message

    job = WorkerJob(3, (), TokenizerSpec("swe", vocab), LayoutSettings(), 0, "/nonexistent/out.partial", False)
    pipe = Pipe()
    _worker_entry(job, pipe)
    assert pipe.message == ("user_error", 3, "/nonexistent/out.partial: No such file or directory")


def test_the_vocabulary_defaults_to_ja_swe36k_in_the_working_directory(vocab, tmp_path, monkeypatch, capsys):
    """As the original's: its README's encoder command has no --vocabulary."""
    write(tmp_path / "data" / "a.txt", "猫が好きです。\n")
    monkeypatch.chdir(tmp_path)
    args = ["--input_files", "data/*.txt", "--quiet", "--num_context", "16"]
    assert main([*args, "--output_dir", "none"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --vocabulary: not given, and its default ja-swe36k.txt is not "
                                               f"in the working directory {tmp_path}; give --vocabulary PATH")
    (tmp_path / "ja-swe36k.txt").symlink_to(vocab)
    (tmp_path / "emoji.json").symlink_to(shared_path("vocab", "emoji.json"))
    assert main([*args, "--output_dir", "default"]) == 0
    assert main([*args, "--output_dir", "given", "--vocabulary", vocab]) == 0
    assert (tmp_path / "default" / "lm_0000.tfrecord").read_bytes() == \
        (tmp_path / "given" / "lm_0000.tfrecord").read_bytes()
    assert main([*args, "--output_dir", "sp", "--tokenizer", "sentencepiece"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: --vocabulary: required with --tokenizer sentencepiece (its .model file)"


def test_glob_matching_nothing(vocab, tmp_path, capsys):
    code, err, left = run_cli(vocab, tmp_path, capsys, "--input_files", str(tmp_path / "none" / "*.txt"))
    assert code == 2 and "no file matches" in err and left == []


def test_an_empty_vocabulary_is_one_error_naming_it(tmp_path, capsys):
    """It was a ValueError traceback from the tokenizer's `max()` over no spellings."""
    write(tmp_path / "a.txt", "あ\n")
    empty = write(tmp_path / "empty.txt", "")
    code, err, left = run_cli(str(empty), tmp_path, capsys, "--input_files", str(tmp_path / "a.txt"),
                              "--emoji", str(shared_path("vocab", "emoji.json")))
    assert code == 2 and left == []
    assert err == f"error: {empty}: vocabulary file is empty (expected one token's spellings per line)"


def test_non_utf8_file_is_named_and_nothing_is_left(vocab, tmp_path, capsys):
    write(tmp_path / "in" / "good.txt", "よい文章です。\n" * 50)
    bad = tmp_path / "in" / "bad.txt"
    bad.write_bytes("シフトJISの文章".encode("shift_jis"))
    args = ("--input_files", str(tmp_path / "in" / "*.txt"), "--num_context", "32")
    code, err, left = run_cli(vocab, tmp_path, capsys, *args, "--num_process", "2")
    assert code == 2 and err.startswith(f"error: {bad}: not UTF-8") and left == []
    code = main(["--vocabulary", vocab, "--output_dir", str(tmp_path / "out"), "--quiet", *args,
                 "--num_process", "2", "--skip_bad_files"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"skipped 1 file(s) that are not UTF-8: {bad}" in err and " in 1 file(s) " in err
    # the worker whose one file was skipped wrote no record: no empty file, no gap in the numbering
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["lm_0000.tfrecord"]
    assert len(read_records(tmp_path / "out")) > 0


def test_empty_corpus(vocab, tmp_path, capsys):
    write(tmp_path / "in" / "a.txt", "")
    write(tmp_path / "in" / "b.txt", "\n  \n")
    code, err, left = run_cli(vocab, tmp_path, capsys, "--input_files", str(tmp_path / "in" / "*.txt"))
    assert code == 2 and "no text" in err and left == []
    (tmp_path / "in" / "c.txt").write_bytes("シフトJIS".encode("shift_jis"))
    code, err, left = run_cli(vocab, tmp_path, capsys, "--input_files", str(tmp_path / "in" / "*.txt"),
                              "--skip_bad_files")
    assert code == 2 and err.endswith("(1 skipped as not UTF-8)") and left == []


def test_num_context_below_the_fixed_overhead(vocab, tmp_path, capsys):
    write(tmp_path / "in" / "a.txt", "あ\n")
    args = ("--input_files", str(tmp_path / "in" / "*.txt"), "--num_context", "4")
    code, err, left = run_cli(vocab, tmp_path, capsys, *args)
    assert code == 2 and err.startswith("error: --num_context: must be at least 8") and left == []
    code, err, left = run_cli(vocab, tmp_path, capsys, *args[:-1], "99999999999")  # was a MemoryError traceback
    assert code == 2 and err == "error: --num_context: at most 1048576 tokens per record, got 99999999999"
    assert left == []


def test_cli_error_is_one_line_and_exit_2(vocab, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "gptsan.data.encode", "--input_files", str(tmp_path / "x.csv"),
           "--vocabulary", vocab, "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    expected = f"error: --input_files: no file matches '{tmp_path / 'x.csv'}'"
    assert done.stderr.strip().splitlines() == [expected]


def test_ctrl_c_with_two_workers_is_one_line_and_leaves_nothing(vocab, tmp_path):
    """The parent's multiprocessing.Queue left named semaphores behind, and the resource tracker printed two
    lines about them after `interrupted`."""
    import signal
    import time

    for k in range(2):
        write(tmp_path / "in" / f"{k}.txt", "長い文書の一行です。東京と大阪の話をします。\n" * 40000)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "gptsan.data.encode", "--input_files", str(tmp_path / "in" / "*.txt"),
           "--vocabulary", vocab, "--output_dir", str(out), "--num_process", "2", "--num_context", "64", "--quiet"]
    tool = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's Ctrl-C reaches
    deadline = time.monotonic() + 120
    while len(list(out.glob(".lm_*.partial-*"))) < 2:  # both workers are encoding
        assert tool.poll() is None and time.monotonic() < deadline, tool.communicate()
        time.sleep(0.1)
    os.killpg(tool.pid, signal.SIGINT)
    _, err = tool.communicate(timeout=60)
    assert (tool.returncode, err) == (130, "interrupted\n")
    assert list(out.iterdir()) == []


def test_an_output_dir_that_is_a_file(vocab, tmp_path, capsys):
    write(tmp_path / "a.txt", "あ\n")
    out = write(tmp_path / "out", "notes")
    assert main(["--vocabulary", vocab, "--output_dir", str(out), "--quiet", "--input_files",
                 str(tmp_path / "a.txt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --output_dir {out}: is a file; give a folder"
    assert out.read_text() == "notes"


def test_an_output_name_a_folder_holds_is_named(vocab, tmp_path, capsys):
    """The line named the encoder's temporary file (`out/.lm_0000.tfrecord.partial-3db1e6ad: is a folder`)."""
    write(tmp_path / "a.txt", "あ\n")
    (tmp_path / "out" / "lm_0000.tfrecord").mkdir(parents=True)
    assert main(["--vocabulary", vocab, "--output_dir", str(tmp_path / "out"), "--quiet", "--input_files",
                 str(tmp_path / "a.txt")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'out' / 'lm_0000.tfrecord'}: is a folder; expected a file\n"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["lm_0000.tfrecord"]


def test_encoding_again_with_fewer_files_removes_the_earlier_surplus(vocab, tmp_path, capsys):
    """Encoding into a folder that holds an earlier encoding of the same mode with more files used to leave the
    surplus files there, and a training glob then read the earlier corpus with the new one."""
    out = tmp_path / "out"
    encode(vocab, corpus(tmp_path / "old", files=3), out, num_context=64, num_process=3)
    write(out / "lm_notes.tfrecord", "not ours")
    write(out / "hybrid_0004.tfrecord", "another mode")
    capsys.readouterr()
    encode(vocab, corpus(tmp_path / "new", files=1), out, num_context=64, num_process=3)
    assert sorted(p.name for p in out.iterdir()) == ["hybrid_0004.tfrecord", "lm_0000.tfrecord", "lm_notes.tfrecord"]
    assert {r.i for r in read_records(out, "lm_0*.tfrecord")} == {0}
    assert capsys.readouterr().err.strip() == (
        f"warning: --output_dir {out}: removed 2 file(s) of an earlier lm encoding (lm_0001.tfrecord, "
        "lm_0002.tfrecord) so that lm_*.tfrecord there is this corpus only")


def test_encoding_again_into_a_folder_with_brackets_removes_the_earlier_surplus(vocab, tmp_path):
    """The earlier files were found with a glob of the folder, which matched nothing in `out[1]`."""
    out = tmp_path / "out[1]"
    encode(vocab, corpus(tmp_path / "old", files=2), out, num_context=64, num_process=2)
    encode(vocab, corpus(tmp_path / "new", files=1), out, num_context=64, num_process=2)
    assert sorted(p.name for p in out.iterdir()) == ["lm_0000.tfrecord"]


def test_encoding_again_into_a_remote_folder_removes_the_earlier_surplus(vocab, tmp_path):
    import fsspec

    encode(vocab, corpus(tmp_path / "old", files=2), "memory://encoded/again", num_context=64, num_process=2)
    encode(vocab, corpus(tmp_path / "new", files=1), "memory://encoded/again", num_context=64, num_process=2)
    assert fsspec.filesystem("memory").ls("/encoded/again", detail=False) == ["/encoded/again/lm_0000.tfrecord"]
