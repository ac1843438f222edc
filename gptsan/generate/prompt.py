"""Prompts as GPTSAN builds them, and left-padding a batch of prompts of different lengths.

  causal:    [SOT, SEG] + context                  num_precontext 0
  prefix-LM: [SOT] + prefix + [SEG] + continuation  num_precontext 1 + len(prefix) (bidirectional part)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gptsan.errors import UserError
from gptsan.tokenizer.base import SpecialIds


def swe_layout(vocab_size: int) -> SpecialIds:
    """GPTSAN's SWE vocabulary puts its roles last (35993..35999 for 36,000 ids): the ids a model of that
    vocabulary size uses when no tokenizer is at hand."""
    return SpecialIds(start=vocab_size - 7, mask=vocab_size - 6, separator=vocab_size - 5,
                      nottoken=vocab_size - 4, bag=vocab_size - 3, segmenter=vocab_size - 2, end=vocab_size - 1,
                      newline=vocab_size - 285)


def never_sampled(special: SpecialIds) -> tuple[int, ...]:
    """Tokens generation never emits (as the original): not-token and separator."""
    return (special.nottoken, special.separator)


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    num_precontext: int = 0


def causal_prompt(context: Sequence[int], special: SpecialIds) -> Prompt:
    return Prompt((special.start, special.segmenter, *context), 0)


def prefix_prompt(prefix: Sequence[int], continuation: Sequence[int], special: SpecialIds) -> Prompt:
    return Prompt((special.start, *prefix, special.segmenter, *continuation), 1 + len(prefix))


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts: ids [B, T] int32, pad [B] (left-padding count), num_precontext [B]."""

    ids: np.ndarray
    pad: np.ndarray
    num_precontext: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.ids.shape[1] - self.pad


def left_pad(prompts: Sequence[Prompt], pad_id: int) -> PromptBatch:
    """Right-align prompts in one [B, T] array; the model masks the `pad` slots and starts positions after
    them, so a padded row computes what it computes alone."""
    if not prompts:
        raise UserError("prompt: no prompt to generate from")
    if any(len(p.ids) == 0 for p in prompts):
        raise UserError("prompt: a prompt is empty")
    width = max(len(p.ids) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    pad = np.zeros(len(prompts), np.int32)
    for row, prompt in enumerate(prompts):
        pad[row] = width - len(prompt.ids)
        ids[row, pad[row]:] = prompt.ids
    num_precontext = np.asarray([p.num_precontext for p in prompts], np.int32)
    return PromptBatch(ids, pad, num_precontext)
