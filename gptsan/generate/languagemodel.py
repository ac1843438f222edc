"""gptsan-languagemodel / run_languagemodel.py: fill masks in one forward pass and export hidden states.

    gptsan-languagemodel --model DIR --vocabulary ja-swe36k.txt --context "...[MASK]..." [--mask [MASK]]
                         [--pos_vector -1] [--output out.json]

The input `[SOT] + context + [SEG]` is one bidirectional prefix (prefix-LM / hybrid models); every mask
string becomes `<|inputmask|>`. As in GPTSAN's MLM training, the token at position j is predicted at
position j - 1, so each mask is filled with the likeliest token there (`<|nottoken|>`, `<|separator|>` and
the role tokens excluded). Output JSON: input_text, input_tokens (the model input), output_tokens (the
input with masks filled), output_text, output_scores (the probability of each filled token, in mask order),
output_vector (every layer's hidden state at --pos_vector of the input, concatenated).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from gptsan import storage
from gptsan.errors import UserError, cli_main, warn
from gptsan.tokenizer.base import check_utf8_text


def build_parser() -> argparse.ArgumentParser:
    # JAX and Flax come with it: imported here, under cli_main, a Ctrl-C while they load ends in `interrupted`
    from gptsan.model.config import COMPUTE_DTYPES

    parser = argparse.ArgumentParser(prog="gptsan-languagemodel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory: native, original TF or HF folder")
    parser.add_argument("--vocabulary", required=True, help="ja-swe36k.txt (swe) or a .model (sentencepiece)")
    parser.add_argument("--tokenizer", default="swe", choices=["swe", "sentencepiece"])
    parser.add_argument("--context", required=True, help="text with mask strings to fill")
    parser.add_argument("--mask", default="[MASK]", help="the mask string in --context")
    parser.add_argument("--pos_vector", type=int, default=-1, help="input position of output_vector")
    parser.add_argument("--output", help="JSON file to write (default: print)")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="compute dtype")
    return parser


def masked_input(tokenizer, context: str, mask: str) -> list[int]:
    """[SOT] + context + [SEG] with each mask string as `<|inputmask|>`; the context is a prefix, whose
    sentence punctuation training records keep as written (as the original tool and the HF port feed it)."""
    special = tokenizer.special
    ids = [special.start]
    for i, piece in enumerate(context.split(mask)):
        if i:
            ids.append(special.mask)
        ids.extend(tokenizer.encode(piece) if piece else [])
    return ids + [special.segmenter]


def fill_masks(config, params, ids: list[int], special, pos_vector: int, never: tuple[int, ...] = ()) -> dict:
    """One forward pass with the whole input as prefix: the filled tokens, their probabilities and the
    concatenated hidden states at `pos_vector`."""
    import jax
    import jax.numpy as jnp

    from gptsan.model import GPTSAN

    if len(ids) > config.num_contexts:
        raise UserError(f"--context: {len(ids)} tokens exceed the model's context of {config.num_contexts}")
    if not -len(ids) <= pos_vector < len(ids):
        raise UserError(f"--pos_vector: {pos_vector} is outside the {len(ids)}-token input")
    out = GPTSAN(config).apply({"params": params}, jnp.asarray([ids]),
                               num_precontext=jnp.asarray([len(ids)]), return_hidden=True)
    logits = np.array(out.logits[0], np.float64)
    # roles (not-token, separator, mask, ...) never fill, nor what generation never emits (`never_generated`)
    logits[:, sorted(special.control_ids | set(never))] = -np.inf
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    filled, scores = list(ids), []
    for j, token in enumerate(ids):
        if token == special.mask:
            filled[j] = int(probs[j - 1].argmax())
            scores.append(float(probs[j - 1, filled[j]]))
    vector = np.concatenate([np.asarray(h[0, pos_vector], np.float32) for h in out.hidden_states])
    return {"output_tokens": filled, "output_scores": scores, "output_vector": vector.tolist()}


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.mask:  # before the model loads: no warning about the model first
        raise UserError("--mask: must not be empty")
    for flag, text in (("--context", args.context), ("--mask", args.mask)):
        check_utf8_text(flag, text)
    if args.output:
        storage.check_output_file(args.output, "--output")
    from gptsan.generate.cli import load, never_generated, output_text

    config, params, tokenizer = load(args)
    from gptsan.checkpoint import detect_format

    # the original ran such a model causally and filled nothing; an HF config.json keeps no train_mode (the
    # port's models are prefix-LMs), so there it is not known to be lm
    if config.train_mode == "lm" and detect_format(args.model) != "hf":
        warn(f"{args.model}: train_mode is lm, so the model never saw a bidirectional prefix or masks; its fills "
             "mean little")
    ids = masked_input(tokenizer, args.context, args.mask)
    if args.mask not in args.context:  # the output is the input, unchanged
        warn(f"--context has no --mask {args.mask}: nothing to fill")
    # a mask is one token: a byte piece alone is part of a character (printed as U+FFFD) and never fills one
    not_plain = tuple(int(i) for i in np.flatnonzero(~tokenizer.plain_token_mask()))
    result = fill_masks(config, params, ids, tokenizer.special, args.pos_vector,
                        never_generated(tokenizer, config.num_vocabulary) + not_plain)
    record = {"input_text": args.context, "input_tokens": ids,
              "output_text": output_text(tokenizer, result["output_tokens"]), **result}
    text = json.dumps(record, ensure_ascii=False)
    if args.output:
        storage.write_text_atomic(args.output, text + "\n")
        filled = len(result["output_scores"])
        print(f"filled {filled} mask{'s' * (filled != 1)}; wrote {args.output}",
              file=storage.status_stream(args.output))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
