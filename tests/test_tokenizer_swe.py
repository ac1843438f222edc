"""SWE tokenizer: the fixture cases from the Hugging Face port, agreement with the straightforward
algorithm, and the special-token roles."""

import json
import random

import pytest

from gptsan.errors import UserError
from gptsan.tokenizer import load_tokenizer
from gptsan.tokenizer.cleaning import clean_text, clean_text_unguarded
from gptsan.tokenizer.swe import SWETokenizer
from gptsan.tokenizer.swe_reference import naive_encode
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def swe() -> SWETokenizer:
    return SWETokenizer(str(shared_path("vocab", "ja-swe36k.txt")))


def fixture_cases():
    path = shared_path("fixtures", "tokenizer", "swe_cases.json")
    return json.loads(path.read_text(encoding="utf-8"))["cases"]


def test_fixture_has_both_clean_settings():
    cases = fixture_cases()
    assert {c["clean_text"] for c in cases} == {False, True}
    assert len(cases) >= 40


def test_every_fixture_case_encodes_and_decodes_like_the_port(swe):
    failures = []
    for case in fixture_cases():
        ids = swe.encode(case["text"], clean=case["clean_text"])
        decoded = swe.decode(ids)
        if ids != case["ids"] or decoded != case["decoded"]:
            failures.append((case["text"], case["clean_text"], ids, decoded))
    assert not failures, failures


def test_fast_scan_agrees_with_the_straightforward_algorithm(swe):
    alphabet = "こんにちは世界。、！？ｱｲｳ日本語東京 　\t\n<>|SPBR😀🍣👍🏻※★─│1234,円年月日@.abcxyzé한中𠮷ー—"
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for clean in (False, True):
            assert swe.encode(text, clean=clean) == naive_encode(swe, text, clean), (text, clean)


CLEAN_FRAGMENTS = [
    "https://example.com/a?b=1", "ftp://x", "taro@example.jp", "03-1234-5678", "(03)1234-5678",
    "2023年1月5日", "12/25", "平成3年4月5日(金)", "1,280円", "5万ドル", "3千ユーロ(税込)", "円",
    "─│┌", "▀▀", "は", "、", " ", "1", "年", "@", ":", "-",
]


def test_guarded_clean_text_equals_the_original_rules():
    rng = random.Random(2)
    for _ in range(500):
        text = "".join(rng.choice(CLEAN_FRAGMENTS) for _ in range(rng.randint(1, 8)))
        assert clean_text(text) == clean_text_unguarded(text), text


def test_fast_scan_agrees_on_runs_of_vocabulary_pieces(swe):
    rng = random.Random(1)
    pieces = [spellings[0] for spellings in swe.spellings[:35700] if spellings[0]]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        assert swe.encode(text) == naive_encode(swe, text), text


def test_tags_written_in_the_text_are_single_tokens(swe):
    assert swe.encode("<SP><BR><|inputmask|>") == [35716, 35715, 35994]


def test_role_ids_are_the_released_ones(swe):
    assert (swe.start_id, swe.mask_id, swe.separator_id, swe.pad_id) == (35993, 35994, 35995, 35996)
    assert (swe.bag_id, swe.segmenter_id, swe.end_id, swe.newline_id) == (35997, 35998, 35999, 35715)
    assert swe.vocab_size == 36000


def test_bag_token_repeats_the_previous_piece_three_times(swe):
    a = swe.encode("あ")
    assert swe.decode(a + [swe.bag_id]) == "ああああ"


def test_plain_token_mask_excludes_roles_and_bytes(swe):
    mask = swe.plain_token_mask()
    assert mask[30622] and mask[35715]  # あ, <BR>
    assert not mask[35738] and not mask[35992]  # <|byte0|>, <|byte254|>
    assert not mask[35993:].any()


def test_clean_text_default_comes_from_the_constructor():
    path = str(shared_path("vocab", "ja-swe36k.txt"))
    assert SWETokenizer(path, clean_text=True).encode("03-1234-5678") == [35720]
    assert load_tokenizer("swe", path, clean_text=False).encode("03-1234-5678") != [35720]


def test_missing_vocabulary_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="vocabulary file not found"):
        SWETokenizer(str(tmp_path / "nope.txt"))


def test_a_vocabulary_with_windows_line_ends_reads_the_same(tmp_path):
    from gptsan.tokenizer.swe import read_vocabulary

    original = shared_path("vocab", "ja-swe36k.txt")
    crlf = tmp_path / "ja-swe36k.txt"
    crlf.write_bytes(original.read_bytes().replace(b"\n", b"\r\n"))
    assert read_vocabulary(str(crlf)) == read_vocabulary(str(original))


def test_an_empty_vocabulary_is_a_user_error_naming_it(tmp_path):
    """It was a ValueError traceback from `max()` over no spellings."""
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(UserError) as caught:
        SWETokenizer(str(empty), emoji_file=str(shared_path("vocab", "emoji.json")))
    assert str(caught.value) == f"{empty}: vocabulary file is empty (expected one token's spellings per line)"


def test_a_vocabulary_with_a_byte_order_mark_reads_the_same(tmp_path):
    """The BOM used to stay in id 0's spelling, so `して` (id 0) became two other ids with no warning."""
    from gptsan.tokenizer.swe import read_vocabulary

    original = shared_path("vocab", "ja-swe36k.txt")
    with_bom = tmp_path / "ja-swe36k.txt"
    with_bom.write_bytes(b"\xef\xbb\xbf" + original.read_bytes())
    assert read_vocabulary(str(with_bom)) == read_vocabulary(str(original))
    tokenizer = SWETokenizer(str(with_bom), emoji_file=str(shared_path("vocab", "emoji.json")))
    assert tokenizer.encode("して") == [0]


def test_missing_emoji_file_is_a_user_error(tmp_path):
    vocab = tmp_path / "ja-swe36k.txt"
    vocab.write_text(shared_path("vocab", "ja-swe36k.txt").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(UserError, match="emoji.json not found"):
        SWETokenizer(str(vocab))


def test_decoding_an_id_outside_the_vocabulary_is_a_user_error(swe):
    with pytest.raises(UserError, match="outside the vocabulary"):
        swe.decode([36000])


# ---- gptsan-tokenize ------------------------------------------------------------------------------------


def tokenize_cli(capsys, *args):
    from gptsan.tokenize_cli import main

    code = main(["--vocabulary", str(shared_path("vocab", "ja-swe36k.txt")), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_encodes_and_decodes(capsys):
    code, out, _ = tokenize_cli(capsys, "--text", "こんにちは、世界。")
    assert code == 0 and json.loads(out) == [469, 1957, 30647, 35675, 271, 35676]
    code, out, _ = tokenize_cli(capsys, "--decode", "--text", "[469, 1957, 30647, 35675, 271, 35676]")
    assert code == 0 and out == "こんにちは、世界。\n"


def test_cli_clean_text_flag(capsys):
    _, out, _ = tokenize_cli(capsys, "--clean_text", "--text", "電話番号は03-1234-5678です")
    assert json.loads(out) == [1026, 1883, 30647, 35720, 4]


def test_cli_files_one_line_per_text_and_count(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("猫\n犬と猫\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("鳥\n", encoding="utf-8")
    code, out, _ = tokenize_cli(capsys, "--files", str(tmp_path / "*.txt"))
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 3 and lines[0] == [31448]
    code, out, _ = tokenize_cli(capsys, "--count", "--files", str(tmp_path / "*.txt"))
    expected_tokens = sum(len(ids) + 1 for ids in lines)
    assert json.loads(out) == {"files": 2, "lines": 3, "characters": 5, "tokens": expected_tokens}
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")  # a file matched counts, lines or none
    code, out, _ = tokenize_cli(capsys, "--count", "--files", str(tmp_path / "*.txt"))
    assert json.loads(out) == {"files": 3, "lines": 3, "characters": 5, "tokens": expected_tokens}


def test_cli_count_is_what_the_encoder_writes(capsys, tmp_path):
    """Lines are stripped and cleaned (a phone number is one tag) as the encoder's body text is."""
    (tmp_path / "a.txt").write_text("  電話番号は03-1234-5678です \n", encoding="utf-8")
    _, out, _ = tokenize_cli(capsys, "--count", "--files", str(tmp_path / "a.txt"))
    _, cleaned, _ = tokenize_cli(capsys, "--clean_text", "--text", "電話番号は03-1234-5678です")
    assert json.loads(out)["tokens"] == len(json.loads(cleaned)) + 1 == 6


def test_cli_bad_ids_are_one_line_errors(capsys):
    code, _, err = tokenize_cli(capsys, "--decode", "--text", "hello")
    assert code == 2 and err == "error: --text: expected a JSON list of integer ids, got 'hello'\n"
    code, _, err = tokenize_cli(capsys, "--decode", "--text", "[true, 454]")  # a bool is an int to Python
    assert code == 2 and err == "error: --text: expected a JSON list of integer ids, got '[true, 454]'\n"
    code, _, err = tokenize_cli(capsys, "--decode", "--text", "[469, 99999999]")
    assert code == 2 and err == "error: --text: token id 99999999: outside the vocabulary (0..35999)\n"


def test_cli_an_id_outside_the_vocabulary_in_a_file_names_the_line(capsys, tmp_path):
    (tmp_path / "ids.txt").write_text("[469]\n[36000]\n", encoding="utf-8")
    code, out, err = tokenize_cli(capsys, "--decode", "--files", str(tmp_path / "ids.txt"))
    assert code == 2 and out == "こん\n"  # the lines before it, decoded
    assert err == f"error: {tmp_path / 'ids.txt'}:2: token id 36000: outside the vocabulary (0..35999)\n"


def test_cli_a_blank_line_of_ids_decodes_to_a_blank_line(capsys, tmp_path):
    """A blank line was an error ("expected a JSON list"); the output now keeps the input's lines."""
    (tmp_path / "ids.txt").write_text("[469]\n\n  \n[469]\n", encoding="utf-8")
    code, out, err = tokenize_cli(capsys, "--decode", "--files", str(tmp_path / "ids.txt"))
    assert (code, out, err) == (0, "こん\n\n\nこん\n", "")
