"""Mask filling: one prefix-LM pass whose predictions and hidden-state vector agree with the fixture."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from gptsan.errors import UserError
from gptsan.generate.languagemodel import fill_masks
from gptsan.generate.prompt import swe_layout


def test_masks_are_filled_from_the_preceding_position(tiny, tiny_cases):
    """Row 0's first 7 tokens are its whole prefix in the fixture (num_precontext 7), so a 7-token input that
    is all prefix sees what the fixture saw: pretend the token at 3 is the mask and its fill is the
    argmax of the fixture's prefix-LM logits one position earlier, role tokens excluded."""
    config, params = tiny
    ids = [int(t) for t in tiny_cases["input_ids"][0, :7]]
    special = dataclasses.replace(swe_layout(config.num_vocabulary), mask=ids[3])
    assert ids.count(ids[3]) == 1
    reference = tiny_cases["logits_prefix"][0, :7].astype(np.float64)
    reference[:, sorted(special.control_ids)] = -np.inf
    result = fill_masks(config, params, ids, special, pos_vector=-1)
    filled = list(ids)
    filled[3] = int(reference[2].argmax())
    assert result["output_tokens"] == filled
    probs = np.exp(reference[2] - reference[2].max())
    np.testing.assert_allclose(result["output_scores"], [probs.max() / probs.sum()], rtol=1e-3)

    # output_vector: every layer's state at the last position; the last layer's gives the fixture logits.
    vector = np.asarray(result["output_vector"]).reshape(config.num_layers, config.num_hidden)
    model = params["model"]
    head = jnp.asarray(vector[-1]) @ model["dense"]["kernel"] + model["dense_1"]["bias"]
    logits = (head * (1 / (1 + jnp.exp(-head)))) @ model["wte"].T + model["wob"]
    np.testing.assert_allclose(np.asarray(logits), tiny_cases["logits_prefix"][0, 6], atol=1e-3)


def test_the_unknown_piece_never_fills_a_mask(tiny, tiny_cases):
    """SentencePiece's `<unk>` filled masks (printed ` ⁇ `) though no encoded text holds it."""
    config, params = tiny
    ids = [int(t) for t in tiny_cases["input_ids"][0, :7]]
    special = dataclasses.replace(swe_layout(config.num_vocabulary), mask=ids[3])
    reference = tiny_cases["logits_prefix"][0, :7].astype(np.float64)
    reference[:, sorted(special.control_ids)] = -np.inf
    best = int(reference[2].argmax())
    reference[:, best] = -np.inf  # pretend the best fill is the unknown piece
    result = fill_masks(config, params, ids, special, pos_vector=-1, never=(best,))
    assert result["output_tokens"][3] == int(reference[2].argmax()) != best


def test_bad_inputs_are_user_errors(tiny):
    config, params = tiny
    special = swe_layout(config.num_vocabulary)
    with pytest.raises(UserError, match="--pos_vector"):
        fill_masks(config, params, [1, 2, 3], special, pos_vector=3)
    with pytest.raises(UserError, match="exceed the model's context"):
        fill_masks(config, params, [1] * 65, special, pos_vector=-1)


def test_the_context_is_fed_as_written_like_a_training_prefix():
    """Training records keep a prefix's sentence punctuation as written (only the body's becomes
    `<|separator|>`), and so did the original tool: the mask-fill input is the plain encoding."""
    from gptsan.generate.languagemodel import masked_input
    from gptsan.tokenizer import load_tokenizer
    from tests.conftest import shared_path

    tokenizer = load_tokenizer("swe", str(shared_path("vocab", "ja-swe36k.txt")))
    special = tokenizer.special
    ids = masked_input(tokenizer, "明日の[MASK]は晴れです。", "[MASK]")
    assert ids == [special.start, *tokenizer.encode("明日の"), special.mask, *tokenizer.encode("は晴れです。"),
                   special.segmenter]
    assert special.separator not in ids and tokenizer.encode("。")[0] in ids


def test_text_flags_that_are_not_utf8_are_one_error_line_before_the_model_loads(capsys):
    """Bytes that are not UTF-8 on the command line reach Python as lone surrogates; the tokenizer (a pybind11
    traceback for SentencePiece) or the JSON output could not take them."""
    from gptsan.generate.languagemodel import main

    base = ["--model", "no-such-model", "--vocabulary", "no-such-vocabulary.txt"]
    assert main([*base, "--context", "天気は\udcff\udcfe[MASK]"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "error: --context: not UTF-8 text (byte 0xff at character 3)\n")
    assert main([*base, "--context", "天気は＿", "--mask", "\udce3\udc81"]) == 2
    assert capsys.readouterr().err == "error: --mask: not UTF-8 text (byte 0xe3 at character 0)\n"


def test_jax_loads_inside_the_tool_where_a_ctrl_c_is_interrupted():
    """The console script imports the module before cli_main's Ctrl-C handling starts: JAX and Flax (over a
    second to import) load inside main, so a Ctrl-C then ends in `interrupted` and exit status 130, not a
    KeyboardInterrupt traceback (or, dropped in JAX's garbage-collection callback, in nothing)."""
    import subprocess
    import sys

    code = ("import sys, gptsan.generate.languagemodel; "
            "print(sorted(n for n in ('jax', 'flax') if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"
