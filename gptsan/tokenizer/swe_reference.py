"""The SWE algorithm written the straightforward way (every emoji key tried on every text, a sorted
candidate list per position), as the original encoder does it. Used by the tests as the oracle for
`SWETokenizer.scan` and by `bench/encode.py` as the baseline; not used for real encoding."""

from __future__ import annotations

from gptsan.tokenizer.cleaning import clean_text_unguarded
from gptsan.tokenizer.swe import WHITESPACE_RULES, SWETokenizer, split_specials


def naive_encode(tokenizer: SWETokenizer, text: str, clean: bool = False) -> list[int]:
    ids: list[int] = []
    for chunk in split_specials(text):
        if chunk in tokenizer.lookup and chunk.startswith("<|"):
            ids.append(tokenizer.lookup[chunk])
        else:
            ids.extend(_naive_scan(tokenizer, _naive_normalise(tokenizer, chunk, clean)))
    return ids


def _naive_normalise(tokenizer: SWETokenizer, text: str, clean: bool) -> str:
    for old, new in WHITESPACE_RULES:
        text = text.replace(old, new)
    for key, tag in tokenizer.emoji["emoji"].items():
        if key in text:
            text = text.replace(key, tag)
    return clean_text_unguarded(text) if clean else text


def _naive_scan(tokenizer: SWETokenizer, text: str) -> list[int]:
    vocab, result, pos = tokenizer.lookup, [], 0
    while pos < len(text):
        end = min(len(text), pos + tokenizer.max_spelling + 1) if text[pos] == "<" else pos + 3
        candidates = []
        for stop in range(end, pos, -1):
            word = text[pos:stop]
            if word in vocab:
                if word[0] == "<" and len(word) > 2:
                    candidates = [(vocab[word], stop)]
                    break
                candidates.append((vocab[word], stop))
        if candidates:
            token_id, pos = sorted(candidates, key=lambda c: c[0])[0]
            result.append(token_id)
        else:
            result.extend(tokenizer.unknown_char_ids(text[pos]))
            pos += 1
    return result
