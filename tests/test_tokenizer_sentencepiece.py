"""SentencePiece tokenizer: training with the reserved role pieces, encode/decode, use in the encoder."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gptsan.data.encode import EncodeConfig, TokenizerSpec, run
from gptsan.data.layout import LayoutSettings
from gptsan.data.schema import parse_example, read_frames, record_from_example
from gptsan.errors import UserError
from gptsan.tokenizer import load_tokenizer
from gptsan.tokenizer.sentencepiece import RESERVED_PIECES, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ["猫", "犬", "鳥", "先生", "学生", "友達", "母", "父"]
PLACES = ["東京", "大阪", "京都", "公園", "学校", "駅", "図書館", "海"]
ACTIONS = ["行きました", "歩きました", "本を読みました", "写真を撮りました", "遊びました"]


def japanese_lines(count: int) -> list[str]:
    return [
        f"{SUBJECTS[k % 8]}は{PLACES[(k * 3) % 8]}へ{ACTIONS[(k * 7) % 5]}。今日は{k % 31 + 1}日です。"
        for k in range(count)
    ]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("spm")
    (root / "a.txt").write_text("\n".join(japanese_lines(300)), encoding="utf-8")
    lines = japanese_lines(50)
    records = [json.dumps({"text": line, "id": k}, ensure_ascii=False) for k, line in enumerate(lines)]
    (root / "b.jsonl").write_text("\n".join(records), encoding="utf-8")
    inputs = [str(root / "a.txt"), str(root / "b.jsonl")]
    return train_sentencepiece(inputs, str(root / "tiny"), vocab_size=400)


@pytest.fixture(scope="module")
def sp(model_path):
    return load_tokenizer("sentencepiece", model_path)


def test_roles_have_fixed_ids_after_unk(sp):
    roles = sp.special
    assert (roles.start, roles.segmenter, roles.separator, roles.mask) == (1, 2, 3, 4)
    assert (roles.nottoken, roles.bag, roles.end, roles.newline) == (5, 6, 7, 8)
    assert [sp.sp.IdToPiece(k) for k in range(1, len(RESERVED_PIECES) + 1)] == list(RESERVED_PIECES)
    assert sp.pad_id == 5 and sp.end_id == 7


def test_round_trip_with_newline_tab_and_unseen_characters(sp):
    text = "猫は東京へ行きました。\n犬は\t海へ🍣"
    ids = sp.encode(text)
    assert sp.newline_id in ids
    assert sp.decode(ids) == text


def test_spaces_round_trip_where_the_corpus_had_none(sp):
    """The corpus has no spaces, so the model has no `▁` piece: a space is encoded as the bytes of `▁`, which
    SentencePiece decodes to `▁` itself."""
    assert sp.sp.PieceToId("\u2581") == sp.sp.unk_id()
    text = "猫は 東京へ  行きました。 "
    assert sp.decode(sp.encode(text)) == text


def test_generation_never_emits_the_unknown_piece(sp):
    """A model of a SentencePiece vocabulary generated `<unk>` (id 0), printed as ` ⁇ `."""
    from gptsan.generate.cli import never_generated
    from gptsan.generate.prompt import never_sampled
    from gptsan.tokenizer.swe import SWETokenizer
    from tests.conftest import shared_path

    swe = SWETokenizer(str(shared_path("vocab", "ja-swe36k.txt")))

    size = sp.vocab_size
    assert never_generated(sp, size) == (*never_sampled(sp.special), sp.sp.unk_id()) == (sp.pad_id, sp.separator_id, 0)
    assert never_generated(swe, 36000) == never_sampled(swe.special)  # SWE has no unknown piece
    # a model with more ids than its tokenizer (training allows it): those are never generated either
    assert never_generated(sp, size + 3) == (sp.pad_id, sp.separator_id, 0, size, size + 1, size + 2)


def test_mask_filling_warns_of_an_lm_model_only_where_its_train_mode_is_known(model_path, sp, tiny_tf_dir,
                                                                             tiny_hf_dir, tmp_path):
    """An HF config.json keeps no train_mode, and the port's models are prefix-LMs: the warning that an lm
    model's fills mean little was given for every HF folder. (The 400-piece vocabulary fills the 512-id tiny
    model's first ids, as training takes it.)"""
    def fill(model):
        command = [sys.executable, "-m", "gptsan.generate.languagemodel", "--model", str(model), "--tokenizer",
                   "sentencepiece", "--vocabulary", model_path, "--context", "猫は[MASK]へ", "--output",
                   str(tmp_path / "out.json")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert done.returncode == 0, done.stderr
        filled = json.loads((tmp_path / "out.json").read_text())["output_tokens"]
        assert all(token < sp.vocab_size for token in filled)  # never an id past the tokenizer's
        return done.stderr

    assert fill(tiny_hf_dir) == ""
    assert fill(tiny_tf_dir) == (f"warning: {tiny_tf_dir}: train_mode is lm, so the model never saw a bidirectional "
                                 "prefix or masks; its fills mean little\n")


def test_a_sentencepiece_model_read_as_a_swe_vocabulary_gets_a_hint(model_path):
    """It said only `vocabulary is not UTF-8 (invalid start byte at byte 4681)`."""
    with pytest.raises(UserError, match=r"vocabulary is not UTF-8 \(.*\) \(a SentencePiece model\? give "
                                        r"--tokenizer sentencepiece\)$"):
        load_tokenizer("swe", model_path)


def test_role_pieces_in_text_are_single_tokens(sp):
    assert sp.encode("<|endoftext|>")[-1] == sp.end_id
    assert sp.decode([sp.start_id, *sp.encode("猫"), sp.end_id]) == "猫"


def test_bag_token_repeats_the_previous_piece(sp):
    cat = sp.encode("猫")
    assert sp.decode(cat + [sp.bag_id]) == sp.decode(cat) * 4


def test_clean_text_uses_the_reserved_tags(sp):
    ids = sp.encode("電話は03-1234-5678です", clean=True)
    assert sp.sp.PieceToId("<TEL>") in ids


def test_plain_mask_excludes_roles_and_bytes(sp):
    mask = sp.plain_token_mask()
    assert not mask[[0, 1, 2, 3, 4, 5, 6, 7]].any() and mask[sp.newline_id]
    assert not any(mask[i] for i in range(sp.vocab_size) if sp.sp.IsByte(i))


def test_model_without_reserved_pieces_is_refused(tmp_path):
    import sentencepiece as spm

    (tmp_path / "t.txt").write_text("\n".join(japanese_lines(200)), encoding="utf-8")
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.Train(input=str(tmp_path / "t.txt"), model_prefix=str(tmp_path / "plain"),
                                       vocab_size=100, hard_vocab_limit=False, logstream=quiet)
    with pytest.raises(UserError, match=re.escape("no reserved piece <|startoftext|>")):
        load_tokenizer("sentencepiece", str(tmp_path / "plain.model"))


def test_encoder_writes_records_with_the_sentencepiece_roles(model_path, sp, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("猫は東京へ行きました。\n犬は海へ。\n", encoding="utf-8")
    config = EncodeConfig(
        input_files=str(tmp_path / "in" / "*.txt"), tokenizer=TokenizerSpec("sentencepiece", model_path),
        layout=LayoutSettings(num_context=40), output_dir=str(tmp_path / "out"), progress=False,
    )
    run(config)
    with open(tmp_path / "out" / "lm_0000.tfrecord", "rb") as f:
        (record,) = [record_from_example(parse_example(d)) for d in read_frames(f, "x")]
    assert record.x[:2].tolist() == [sp.start_id, sp.segmenter_id]
    assert (record.x == sp.newline_id).sum() == 2 and sp.end_id in record.x
    assert sp.separator_id in record.x  # 。 became the separator
    assert sp.decode(record.y[record.y != -1].tolist()) == "猫は東京へ行きました。\n犬は海へ。\n"


def test_train_tool_from_another_directory(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(japanese_lines(200)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tool finds its own package
    cmd = [sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input_files", "corpus.txt",
           "--model_prefix", "out/ja", "--vocab_size", "5000"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "ja.model").exists() and "start 1" in done.stderr
    pieces = len((tmp_path / "out" / "ja.vocab").read_text(encoding="utf-8").splitlines())
    assert f"{pieces} pieces (not the 5000 asked for: the corpus has no more)" in done.stderr  # a small corpus


def test_train_tool_refuses_a_tiny_vocabulary(tmp_path):
    (tmp_path / "corpus.txt").write_text("猫\n", encoding="utf-8")
    with pytest.raises(UserError, match="--vocab_size: must exceed"):
        train_sentencepiece([str(tmp_path / "corpus.txt")], str(tmp_path / "m"), vocab_size=100)


@pytest.mark.parametrize("coverage", [0.97, 1.5, float("nan")])
def test_train_tool_refuses_a_coverage_sentencepiece_refuses(tmp_path, coverage):
    """SentencePiece's own check was the message: `INTERNAL: ... character_coverage() >= 0.98`."""
    (tmp_path / "corpus.txt").write_text("猫\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^--character_coverage: expected 0.98 to 1 \(SentencePiece's range\), "
                                        rf"got {coverage}$"):
        train_sentencepiece([str(tmp_path / "corpus.txt")], str(tmp_path / "m"), vocab_size=500,
                            character_coverage=coverage)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_train_tool_refuses_a_gs_model_prefix_before_training(tmp_path):
    """SentencePiece writes local files: a gs:// prefix made a local `gs:` folder, then a misleading error."""
    (tmp_path / "corpus.txt").write_text("\n".join(japanese_lines(50)), encoding="utf-8")
    cmd = [sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input_files", "corpus.txt",
           "--model_prefix", "gs://bucket/sp", "--vocab_size", "500"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --model_prefix: gs://bucket/sp is not a local path")
    assert len(done.stderr.splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_a_jsonl_corpus_with_a_byte_order_mark_trains(tmp_path):
    """Its first record was refused ('expected a JSON object with a 'text' field'): the BOM was read as text."""
    records = [json.dumps({"text": line}, ensure_ascii=False) for line in japanese_lines(60)]
    (tmp_path / "bom.jsonl").write_text("\ufeff" + "\n".join(records), encoding="utf-8")
    model = train_sentencepiece([str(tmp_path / "bom.jsonl")], str(tmp_path / "m"), vocab_size=400)
    tokenizer = load_tokenizer("sentencepiece", model)
    assert tokenizer.decode(tokenizer.encode("猫は東京へ")) == "猫は東京へ"


def test_a_failed_training_leaves_no_folder_and_no_file(tmp_path):
    """The folders of --model_prefix were made before SentencePiece refused the vocabulary size."""
    (tmp_path / "corpus.txt").write_text("\n".join(japanese_lines(300)), encoding="utf-8")
    with pytest.raises(UserError, match="sentencepiece training failed: .*Vocabulary size is smaller"):
        train_sentencepiece([str(tmp_path / "corpus.txt")], str(tmp_path / "new" / "sub" / "m"), vocab_size=280,
                            character_coverage=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]
