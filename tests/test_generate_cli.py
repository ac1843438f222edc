"""gptsan-generate and gptsan-languagemodel end to end on a small native model with the SWE vocabulary:
the CLI's tokens equal the library's, JSONL output, --spout handling, one-line errors, no TensorFlow."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gptsan.errors import UserError
from gptsan.generate.decode import Decoder
from gptsan.generate.prompt import causal_prompt, left_pad, never_sampled
from gptsan.generate.sampling import Sampler
from gptsan.generate.spout import parse_spout
from gptsan.model.inference import to_inference_layout

ROOT = Path(__file__).resolve().parents[1]
RUN_MAIN = ("import sys; from {module} import main; rc = main(sys.argv[1:]); "
            "print('tensorflow imported' if 'tensorflow' in sys.modules else 'no tensorflow'); sys.exit(rc)")


@pytest.fixture(scope="module")
def swe_model(tmp_path_factory):
    """A random native model with the SWE vocabulary's 36,000 ids (d 64, 2 + 2 layers, spout 16)."""
    from gptsan.checkpoint import native
    from gptsan.model import ModelConfig, flatten, init_params

    config = ModelConfig(num_contexts=64, num_switch_layers=2, num_ext_layers=2, num_hidden=64, num_header=4,
                         num_experts=4, num_vocabulary=36000, num_spout=16)
    params = init_params(config, seed=1)
    path = tmp_path_factory.mktemp("swe-model") / "model"
    native.save(str(path), config, flatten(params))
    return path, config, params


@pytest.fixture(scope="module")
def vocabulary():
    from conftest import shared_path

    return shared_path("vocab", "ja-swe36k.txt")


def run_cli(module, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", RUN_MAIN.format(module=module), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_generate_cli_writes_the_library_tokens(swe_model, vocabulary, tmp_path):
    path, config, params = swe_model
    contexts = ["今日は晴れです。", "吾輩は猫である"]
    (tmp_path / "prompts.txt").write_text("\n".join(contexts) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    proc = run_cli("gptsan.generate.cli", "--model", path, "--vocabulary", vocabulary, "--input_file",
                   tmp_path / "prompts.txt", "--temperature", "0", "--max_generate", "10", "--spout", "3",
                   "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("no tensorflow")
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    from gptsan.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("swe", str(vocabulary))
    special = tokenizer.special
    prompts = [causal_prompt(tokenizer.as_model_input(tokenizer.encode(text)), special) for text in contexts]
    assert prompts[0].ids[:2] == (35993, 35998)
    assert prompts[0].ids[-1] == special.separator  # "。" is fed as the separator, as in training inputs
    decoder = Decoder(config, Sampler(temperature=0.0, top_k=120, banned_ids=never_sampled(special)), special.end,
                      tokenizer.model_input_map())
    expected = decoder.generate(to_inference_layout(jax.device_put(params)), left_pad(prompts, special.nottoken), 10,
                                spout=parse_spout("3", 16, 2))
    assert [r["context"] for r in records] == contexts
    for row, record in enumerate(records):
        assert record["tokens"] == expected.tokens[row, :expected.lengths[row]].tolist()
        assert record["text"] == tokenizer.decode(record["tokens"])
    assert proc.stdout.splitlines()[:2] == [r["text"] for r in records]


def test_a_prefix_is_fed_as_written_and_the_continuation_as_training_bodies(vocabulary):
    """In training records only the body's sentence punctuation is `<|separator|>`; a prefix keeps it."""
    from gptsan.generate.cli import build_prompts
    from gptsan.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("swe", str(vocabulary))
    special = tokenizer.special
    [prompt] = build_prompts(tokenizer, ["続きです。"], prefix="前置きです。")
    assert prompt.ids == (special.start, *tokenizer.encode("前置きです。"), special.segmenter,
                          *tokenizer.as_model_input(tokenizer.encode("続きです。")))
    assert prompt.ids[-1] == special.separator and tokenizer.encode("。")[0] in prompt.ids


def test_the_text_to_continue_is_encoded_as_the_encoder_writes_a_body(vocabulary):
    """The prompt took raw URL characters where records hold `<URL>`, and four `ー` where records hold one and
    `<|bagoftoken|>`: text in a form the model never saw in training."""
    import numpy as np

    from gptsan.data.layout import DocumentEncoder, LayoutSettings
    from gptsan.generate.cli import build_prompts
    from gptsan.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("swe", str(vocabulary))
    text = "詳細はhttps://example.com/a を見てね。わーーーーい！！！！"
    [prompt] = build_prompts(tokenizer, [text], None)
    [(x, _, _)] = DocumentEncoder(tokenizer, LayoutSettings(mode="lm", num_context=64),
                                  np.random.default_rng(0)).records([text])
    x = x.tolist()
    assert prompt.ids == tuple(x[:x.index(tokenizer.newline_id)])  # [SOT, SEG] + the body, up to the line's end
    assert tokenizer.bag_id in prompt.ids and tokenizer.encode("<URL>")[0] in prompt.ids


def test_a_vocabulary_with_more_ids_than_the_model_is_refused(tiny_tf_dir, vocabulary):
    """Fewer ids than the model's are fine (training takes such a corpus; the rest are never generated)."""
    proc = run_cli("gptsan.generate.cli", "--model", tiny_tf_dir, "--vocabulary", vocabulary, "--context", "x")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: --vocabulary {vocabulary}: 36000 tokens, but the model has 512"]


def test_generate_cli_errors_are_one_line_and_write_nothing(swe_model, vocabulary, tmp_path):
    path, _, _ = swe_model
    out = tmp_path / "out.jsonl"
    proc = run_cli("gptsan.generate.cli", "--model", path, "--vocabulary", vocabulary, "--context", "x",
                   "--spout", "16", "--output", out)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --spout: class 16 is outside 0..15 (the model's num_spout)"
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, line", [
    ("--top_k", "-5", "error: --top_k: expected an integer >= 0 (0 = no cut), got -5"),
    ("--top_p", "0", "error: --top_p: expected a number in (0, 1], got 0.0"),
    ("--temperature", "nan", "error: --temperature: expected a finite number >= 0, got nan"),
    ("--temperature", "1e308", "error: --temperature: expected a finite number >= 0, got 1e+308"),  # float32 inf
    ("--length_penalty", "nan", "error: --length_penalty: expected a finite number, got nan"),
])
def test_a_bad_sampling_flag_is_the_only_line_before_anything_loads(vocabulary, tmp_path, flag, value, line):
    """Checked before the model: no warning about the model's context first, and a missing model is not reached."""
    proc = run_cli("gptsan.generate.cli", "--model", tmp_path / "no-model", "--vocabulary", vocabulary,
                   "--context", "x", flag, value)
    assert proc.returncode == 2 and proc.stderr.strip() == line


def test_a_folder_given_as_a_file_is_one_error_line(swe_model, vocabulary, tmp_path):
    path, _, _ = swe_model
    proc = run_cli("gptsan.generate.cli", "--model", path, "--vocabulary", vocabulary, "--input_file", tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path}: is a folder; expected a file"


def test_an_output_that_cannot_be_written_is_one_error_line_before_generating(swe_model, vocabulary, tmp_path):
    path, _, _ = swe_model
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "out.jsonl"
    for module in ("gptsan.generate.cli", "gptsan.generate.languagemodel"):
        proc = run_cli(module, "--model", path, "--vocabulary", vocabulary, "--context", "x", "--output", out)
        assert proc.returncode == 2
        assert proc.stderr.strip() == f"error: --output {out}: {tmp_path / 'a_file'} is a file, not a folder"
        proc = run_cli(module, "--model", path, "--vocabulary", vocabulary, "--context", "x", "--output", tmp_path)
        assert proc.returncode == 2
        assert proc.stderr.strip() == f"error: --output {tmp_path}: is a folder; give a file name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_an_output_in_new_folders_is_written_there(swe_model, vocabulary, tmp_path):
    path, _, _ = swe_model
    out = tmp_path / "new" / "folder" / "out.jsonl"
    proc = run_cli("gptsan.generate.cli", "--model", path, "--vocabulary", vocabulary, "--context", "x",
                   "--max_generate", "4", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[0])["context"] == "x"


def test_a_max_generate_past_the_context_is_one_warning_and_texts_stop_at_the_context(swe_model, vocabulary,
                                                                                        tmp_path):
    from gptsan.generate.cli import build_prompts
    from gptsan.tokenizer import load_tokenizer

    path, config, _ = swe_model  # num_contexts 64
    (prompt,) = build_prompts(load_tokenizer("swe", vocabulary), ["今日は"], None)
    room = config.num_contexts - 1 - len(prompt.ids)  # the spout takes one slot
    assert len(prompt.ids) == 4  # start, segmenter, 今日, は
    out = tmp_path / "out.jsonl"
    proc = run_cli("gptsan.generate.cli", "--model", path, "--vocabulary", vocabulary, "--context", "今日は",
                   "--spout", "1", "--max_generate", "200", "--num_generate", "4", "--output", out)
    assert proc.returncode == 0, proc.stderr
    lengths = [len(json.loads(line)["tokens"]) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lengths) == 4 and max(lengths) == room  # a random model rarely ends a text
    assert proc.stderr == (f"warning: --max_generate 200: the model's 64-token context leaves room for {room} new "
                           "tokens after the longest prompt and the spout slot; texts stop there\n")
    proc = run_cli("gptsan.generate.cli", "--model", path, "--vocabulary", vocabulary, "--context", "今日は",
                   "--spout", "1", "--max_generate", str(room), "--top_k", "1")
    assert proc.returncode == 0 and proc.stderr == ""


def test_spout_flag_values():
    np.testing.assert_array_equal(parse_spout("2", 4, 2), [[0, 0, 1, 0]] * 2)
    np.testing.assert_array_equal(parse_spout("zeros", 3, 1), [[0, 0, 0]])
    np.testing.assert_allclose(parse_spout("0.5,1,-2", 3, 2), [[0.5, 1, -2]] * 2)
    uniform = parse_spout("uniform", 8, 3, seed=4)
    assert uniform.shape == (3, 8) and (uniform >= 0).all() and (uniform < 1).all()
    np.testing.assert_array_equal(uniform, parse_spout("uniform", 8, 3, seed=4))
    assert parse_spout("none", 8, 3) is None
    for bad, message in [("-1", "outside 0..3"), ("1,2", "got 2 numbers"), ("one", "expected none"),
                         ("1,x,3,4", "not a list of numbers"), ("1,2,3,nan", "expected finite float32 numbers"),
                         ("1,inf,3,4", "expected finite"), ("1,2,1e39,4", "expected finite")]:
        with pytest.raises(UserError, match=message):
            parse_spout(bad, 4, 1)


def test_languagemodel_cli_fills_masks(swe_model, vocabulary, tmp_path):
    path, config, _ = swe_model
    out = tmp_path / "lm.json"
    proc = run_cli("gptsan.generate.languagemodel", "--model", path, "--vocabulary", vocabulary, "--context",
                   "今日は[MASK]です。[MASK]", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "no tensorflow" in proc.stdout
    assert proc.stderr == (f"warning: {path}: train_mode is lm, so the model never saw a bidirectional prefix or "
                           "masks; its fills mean little\n")  # the fixture model is an lm one
    record = json.loads(out.read_text(encoding="utf-8"))
    tokens, filled = record["input_tokens"], record["output_tokens"]
    masks = [j for j, t in enumerate(tokens) if t == 35994]
    assert len(masks) == 2 and tokens[0] == 35993 and tokens[-1] == 35998
    assert all(filled[j] < 35993 for j in masks) and len(record["output_scores"]) == 2
    assert [t for j, t in enumerate(filled) if j not in masks] == [t for j, t in enumerate(tokens) if j not in masks]
    assert len(record["output_vector"]) == config.num_layers * config.num_hidden
    assert record["input_text"] == "今日は[MASK]です。[MASK]"


def test_languagemodel_fills_with_whole_pieces_and_says_when_there_is_no_mask(swe_model, vocabulary, monkeypatch,
                                                                             capsys):
    """A mask was filled with a byte piece alone (part of a character, printed `�`); a context without the mask
    string printed the input back without a word."""
    from gptsan.generate import languagemodel
    from gptsan.tokenizer import load_tokenizer

    path, _, _ = swe_model
    seen = {}

    def recording(config, params, ids, special, pos_vector, never=()):
        seen["never"] = set(never)
        return {"output_tokens": ids, "output_scores": [], "output_vector": []}

    monkeypatch.setattr(languagemodel, "fill_masks", recording)
    assert languagemodel.main(["--model", str(path), "--vocabulary", str(vocabulary), "--context", "猫"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == "warning: --context has no --mask [MASK]: nothing to fill"
    tokenizer = load_tokenizer("swe", str(vocabulary))
    bytes_ = {i for i in range(tokenizer.vocab_size) if tokenizer.spellings[i][0].startswith("<|byte")}
    assert len(bytes_) > 200 and bytes_ <= seen["never"] and tokenizer.encode("猫")[0] not in seen["never"]


def test_input_file_lines_end_at_newlines_only_and_a_byte_order_mark_is_not_text(tmp_path):
    """str.splitlines made two contexts of a line holding U+2028 or a form feed, and a BOM (Notepad's UTF-8) was
    the first context's first character, which changed what the model generated."""
    from gptsan.generate.cli import build_parser, read_contexts

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeff天気\r\n料理\u2028です\x0cね\n\n野球".encode())
    args = build_parser().parse_args(["--model", "m", "--vocabulary", "v", "--input_file", str(prompts)])
    assert read_contexts(args) == ["天気", "料理\u2028です\x0cね", "", "野球"]


def test_a_prompt_that_fills_the_context_is_an_error_naming_the_flag_and_the_line(swe_model, vocabulary, tmp_path):
    """It said `prompt: 212 tokens leave no room ...`, naming neither the flag nor the line."""
    path, _, _ = swe_model  # num_contexts 64
    prompts = tmp_path / "prompts.txt"
    numbers = "一二三四五六七八九十" * 9  # no runs: a run is encoded as its token and <|bagoftoken|>
    prompts.write_text("天気\n" + numbers[:88] + "\n", encoding="utf-8")
    proc = run_cli("gptsan.generate.cli", "--model", path, "--vocabulary", vocabulary, "--input_file", prompts,
                   "--spout", "1")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: --input_file {prompts}: line 2: the prompt is 82 tokens (and the "
                                        "spout takes one slot): the model's 64-token context leaves no room to "
                                        "generate"]
    proc = run_cli("gptsan.generate.cli", "--model", path, "--vocabulary", vocabulary, "--context", numbers[:68])
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: --context: the prompt is 64 tokens: the model's 64-token context "
                                        "leaves no room to generate"]


def test_an_empty_mask_is_the_only_line_before_the_model_loads(vocabulary, tmp_path):
    """It was checked after the model had loaded, after the warning that an lm model's fills mean little."""
    proc = run_cli("gptsan.generate.languagemodel", "--model", tmp_path / "no-model", "--vocabulary", vocabulary,
                   "--context", "x", "--mask", "")
    assert proc.returncode == 2 and proc.stderr == "error: --mask: must not be empty\n"


@pytest.mark.parametrize("tool, args, line", [
    ("gptsan.generate.cli", ["--context", "天気は\udcff"],
     "error: --context: not UTF-8 text (byte 0xff at character 3)"),
    ("gptsan.generate.cli", ["--prefix", "\udce3\udc81", "--context", "x"],
     "error: --prefix: not UTF-8 text (byte 0xe3 at character 0)"),
    ("gptsan.tokenize_cli", ["--text", "a\udcffb"], "error: --text: not UTF-8 text (byte 0xff at character 1)"),
])
def test_command_line_text_that_is_not_utf8_is_one_error_line(vocabulary, tmp_path, capsys, tool, args, line):
    """Bytes that are not UTF-8 on the command line reach Python as lone surrogates: gptsan-generate ended in a
    traceback after loading the model, and gptsan-tokenize gave SWE's byte tokens of the surrogates
    ([35645, 35975, 35917, 35929, 35646] for a\\xffb, which decode to 'a���b')."""
    main = importlib.import_module(tool).main
    model = ["--model", str(tmp_path / "no-model")] if tool == "gptsan.generate.cli" else []
    assert main([*model, "--vocabulary", str(vocabulary), *args]) == 2
    assert capsys.readouterr() == ("", line + "\n")


def test_stream_waits_for_a_characters_bytes_split_over_two_chunks(vocabulary, capsys):
    """The first chunk ended in part of め's UTF-8 bytes (byte tokens): its U+FFFD was printed, never replaced,
    and as the text no longer began with what was shown, nothing more was streamed until the end, whose tail was
    cut at the wrong place (the streamed text lost characters)."""
    from types import SimpleNamespace

    from gptsan.generate.cli import stream_one
    from gptsan.tokenizer.swe import SWETokenizer

    tokenizer = SWETokenizer(vocabulary)
    byte = {value: tokenizer.encode(f"<|byte{value}|>")[0] for value in "め".encode()}
    a, i, end = tokenizer.encode("あ"), tokenizer.encode("い"), tokenizer.special.end
    chunks = [[*a, byte[0xE3]], [byte[0x82], byte[0x81], *i, end]]

    class Decoder:
        def stream(self, params, batch, max_generate, spout, seed):
            for chunk in chunks:
                yield np.array([chunk])

    args = SimpleNamespace(max_generate=8, seed=0)
    ids = stream_one(Decoder(), None, None, args, None, tokenizer)
    assert ids == chunks[0] + chunks[1][:-1]
    assert capsys.readouterr().out == "あめい\n"
