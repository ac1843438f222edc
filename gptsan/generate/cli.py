"""gptsan-generate / run_generate.py: text from a GPTSAN model, any checkpoint format, any tokenizer.

    gptsan-generate --model DIR --vocabulary ja-swe36k.txt --context "TEXT" [--prefix TEXT]
                    [--top_k 120] [--top_p 1.0] [--temperature 1.0] [--beam_width 1] [--max_generate 300]
                    [--num_generate 1] [--spout none|uniform|zeros|N|v1,v2,...] [--seed 0]
                    [--input_file PROMPTS.txt] [--output OUT.jsonl] [--stream] [--dtype float32]

Prompt `[SOT, SEG] + context`; with --prefix (prefix-LM models) `[SOT] + prefix + [SEG] + context` with the
prefix bidirectional. --input_file holds one context per line, decoded as one left-padded batch.
--beam_width > 1 runs a beam search (the original drew independent samples) and returns the
--num_generate best hypotheses; otherwise each text is sampled (temperature 0 = greedy). `<|nottoken|>`
and `<|separator|>` are never generated; the output drops role tokens and expands `<|bagoftoken|>`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from gptsan import storage
from gptsan.errors import UserError, cli_main, warn
from gptsan.generate.prompt import Prompt, causal_prompt, left_pad, never_sampled, prefix_prompt
from gptsan.generate.spout import parse_spout
from gptsan.memory import keep_freed_memory
from gptsan.seed import seed_flag
from gptsan.tokenizer.base import check_utf8_text

# JAX, Flax, the model and the sampling and decoding modules are imported inside the functions that use them
# (seconds of imports): under cli_main, so a Ctrl-C while they load ends in `interrupted`, not a traceback.


def build_parser() -> argparse.ArgumentParser:
    from gptsan.model.config import COMPUTE_DTYPES  # the gptsan.model package brings JAX and Flax

    parser = argparse.ArgumentParser(prog="gptsan-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory: native, original TF or HF folder")
    parser.add_argument("--vocabulary", required=True, help="ja-swe36k.txt (swe) or a .model (sentencepiece)")
    parser.add_argument("--tokenizer", default="swe", choices=["swe", "sentencepiece"])
    parser.add_argument("--context", default="", help="the text to continue")
    parser.add_argument("--prefix", help="prefix-LM models: a bidirectional prefix before the context")
    parser.add_argument("--input_file", help="one context per line (UTF-8), generated as one batch")
    parser.add_argument("--top_k", type=int, default=120, help="sample among the k likeliest (0 = all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--beam_width", type=int, default=1, help="> 1: beam search")
    parser.add_argument("--length_penalty", type=float, default=1.0, help="beam score = logprob / len**this")
    parser.add_argument("--max_generate", type=int, default=300, help="most tokens per text")
    parser.add_argument("--num_generate", type=int, default=1, help="texts per context")
    parser.add_argument("--spout", default="none", help="none, uniform, zeros, a class N, or num_spout numbers")
    parser.add_argument("--seed", type=seed_flag, default=0)
    parser.add_argument("--stream", action="store_true", help="print the tokens as they come (one text)")
    parser.add_argument("--output", help="write the texts as JSON lines here")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="compute dtype")
    parser.add_argument("--tpu_nodes", help="accepted for compatibility; JAX finds its devices itself")
    return parser


def read_contexts(args: argparse.Namespace) -> list[str]:
    if not args.input_file:
        return [args.context]
    from gptsan.data.encode import read_document  # the encoder's rule for lines: gptsan-tokenize's too

    try:
        lines = read_document(args.input_file)
    except UserError as err:  # "PATH: file not found", "PATH: not UTF-8 (...)"
        raise UserError(f"--input_file {err}") from None
    if not lines:
        raise UserError(f"--input_file {args.input_file}: no lines")
    return lines


def build_prompts(tokenizer, contexts: list[str], prefix: str | None) -> list[Prompt]:
    """Prompts as the model saw text in training: the text to continue as a record's body holds it (clean-text
    tags, runs as `<|bagoftoken|>`, sentence punctuation as `<|separator|>`), a prefix as written (as a record's
    prefix is)."""
    special = tokenizer.special

    def encode(text: str) -> list[int]:
        return tokenizer.as_model_input(tokenizer.encode_body(text))

    if prefix is None:
        return [causal_prompt(encode(text), special) for text in contexts]
    prefix_ids = tokenizer.encode(prefix)
    return [prefix_prompt(prefix_ids, encode(text), special) for text in contexts]


def never_generated(tokenizer, num_vocabulary: int) -> tuple[int, ...]:
    """GPTSAN's never-sampled roles, the vocabulary's unknown piece (SentencePiece's `<unk>` printed as ` ⁇ ` in
    generated text), and the model's ids past the tokenizer's (a model may have more ids than its tokenizer, as
    training allows: a SentencePiece model trained for 512 pieces can come out with fewer)."""
    return never_sampled(tokenizer.special) + tokenizer.unknown_ids + tuple(range(tokenizer.vocab_size,
                                                                                   num_vocabulary))


def output_text(tokenizer, ids) -> str:
    """Text of generated ids: role tokens dropped, `<|bagoftoken|>` left for decode to expand."""
    special = tokenizer.special
    drop = special.control_ids - {special.bag}
    return tokenizer.decode([int(t) for t in ids if int(t) not in drop])


def check_args(args: argparse.Namespace) -> None:
    if args.num_generate < 1:
        raise UserError(f"--num_generate: expected at least 1, got {args.num_generate}")
    if args.beam_width < 1:
        raise UserError(f"--beam_width: expected at least 1, got {args.beam_width}")
    if not math.isfinite(args.length_penalty):
        raise UserError(f"--length_penalty: expected a finite number, got {args.length_penalty}")
    if args.beam_width > 1 and args.num_generate > args.beam_width:
        raise UserError(f"--num_generate: at most --beam_width ({args.beam_width}) hypotheses per context")
    if args.stream and (args.beam_width > 1 or args.input_file or args.num_generate > 1):
        raise UserError("--stream: streams one sampled text (one --context, --num_generate 1, --beam_width 1)")
    for flag, text in (("--context", args.context), ("--prefix", args.prefix)):
        if text is not None:
            check_utf8_text(flag, text)
    from gptsan.generate.sampling import Sampler

    Sampler(args.temperature, args.top_k, args.top_p)  # checks the sampling flags before the model loads
    if args.output:
        storage.check_output_file(args.output, "--output")


def load(args: argparse.Namespace):
    """(config, device params, tokenizer), checked against each other."""
    import jax

    from gptsan.checkpoint import load_model
    from gptsan.generate.weights import cast_for_compute
    from gptsan.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, args.vocabulary)
    config, params = load_model(args.model, dtype=args.dtype)
    if tokenizer.vocab_size > config.num_vocabulary:  # fewer is fine: the ids past it are never generated
        raise UserError(f"--vocabulary {args.vocabulary}: {tokenizer.vocab_size} tokens, but the model has "
                        f"{config.num_vocabulary}")
    return config, jax.device_put(cast_for_compute(params, args.dtype)), tokenizer


def generate_texts(args, config, params, tokenizer, contexts) -> list[dict]:
    """`params` in the inference layout (gptsan/model/inference.py), as the decoders read them."""
    from gptsan.generate.beam import BeamDecoder
    from gptsan.generate.decode import Decoder
    from gptsan.generate.sampling import Sampler

    special = tokenizer.special
    prompts = build_prompts(tokenizer, contexts, args.prefix)
    records = []
    if args.beam_width > 1:
        spout = parse_spout(args.spout, config.num_spout, len(prompts), args.seed)
        check_room(config, prompts, args, spout is not None)
        decoder = BeamDecoder(config, args.beam_width, special.end, args.length_penalty,
                              never_generated(tokenizer, config.num_vocabulary),
                              tokenizer.model_input_map())
        result = decoder.generate(params, left_pad(prompts, special.nottoken), args.max_generate, spout)
        for row, context in enumerate(contexts):
            for rank in range(args.num_generate):
                ids = result.tokens[row, rank, :result.lengths[row, rank]]
                records.append({"context": context, "index": rank, "text": output_text(tokenizer, ids),
                                "tokens": ids.tolist(), "score": float(result.scores[row, rank])})
        return records
    rows = [(context, i) for context in contexts for i in range(args.num_generate)]
    batch = left_pad([p for p in prompts for _ in range(args.num_generate)], special.nottoken)
    spout = parse_spout(args.spout, config.num_spout, len(rows), args.seed)
    check_room(config, prompts, args, spout is not None)
    sampler = Sampler(args.temperature, args.top_k, args.top_p, never_generated(tokenizer, config.num_vocabulary))
    decoder = Decoder(config, sampler, special.end, tokenizer.model_input_map())
    if args.stream:
        ids = stream_one(decoder, params, batch, args, spout, tokenizer)
        return [{"context": contexts[0], "index": 0, "text": output_text(tokenizer, ids), "tokens": ids}]
    result = decoder.generate(params, batch, args.max_generate, spout, args.seed)
    for row, (context, i) in enumerate(rows):
        ids = result.tokens[row, :result.lengths[row]]
        records.append({"context": context, "index": i, "text": output_text(tokenizer, ids),
                        "tokens": ids.tolist()})
    return records


def check_room(config, prompts: list[Prompt], args: argparse.Namespace, has_spout: bool) -> None:
    """A prompt that fills the model's context is an error naming where it came from (the flag, and the line of
    --input_file); one that leaves less room than --max_generate is one warning line (its texts stop there,
    shorter than asked)."""
    from gptsan.generate.decode import room_after

    slot = " and the spout slot" if has_spout else ""
    room = room_after(config, [len(p.ids) for p in prompts], has_spout)
    if (room <= 0).any():
        row = int(np.argmin(room))
        source = f"--input_file {args.input_file}: line {row + 1}" if args.input_file else \
            "--prefix and --context" if args.prefix is not None else "--context"
        spout_slot = " (and the spout takes one slot)" if has_spout else ""
        raise UserError(f"{source}: the prompt is {len(prompts[row].ids)} tokens{spout_slot}: the model's "
                        f"{config.num_contexts}-token context leaves no room to generate")
    if args.max_generate > room.min():
        warn(f"--max_generate {args.max_generate}: the model's {config.num_contexts}-token context leaves room "
             f"for {int(room.min())} new tokens after the longest prompt{slot}; texts stop there")


def stream_one(decoder, params, batch, args, spout, tokenizer) -> list[int]:
    """Print one text as its tokens come; returns its ids (the end token excluded)."""
    ids: list[int] = []
    shown = ""
    for chunk in decoder.stream(params, batch, args.max_generate, spout, args.seed):
        for token in chunk[0].tolist():
            if token == tokenizer.special.end:
                break
            ids.append(token)
        # A character's UTF-8 bytes may come as byte tokens split over two chunks: the first part decodes to
        # U+FFFD, which becomes the character once the rest comes. The text's trailing U+FFFD wait for it (shown,
        # they were never replaced, and once the tail no longer matched, nothing more was streamed).
        settled = output_text(tokenizer, ids).rstrip("\ufffd")
        if settled.startswith(shown):
            sys.stdout.write(settled[len(shown):])
            sys.stdout.flush()
            shown = settled
        if tokenizer.special.end in chunk[0]:
            break
    text = output_text(tokenizer, ids)
    sys.stdout.write(text[len(shown):] + "\n")
    return ids


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    keep_freed_memory()
    if args.tpu_nodes:
        print("note: --tpu_nodes is not needed; JAX uses the devices it finds", file=sys.stderr)
    contexts = read_contexts(args)
    from gptsan.model.inference import to_inference_layout

    config, params, tokenizer = load(args)
    rows = len(contexts) * (args.beam_width if args.beam_width > 1 else args.num_generate)  # per decode step
    params = to_inference_layout(params, rows, release_input=True)
    records = generate_texts(args, config, params, tokenizer, contexts)
    if args.output:
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        storage.write_text_atomic(args.output, lines)
    if not args.stream:
        for record in records:
            print(record["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
