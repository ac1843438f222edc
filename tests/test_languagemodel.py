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
