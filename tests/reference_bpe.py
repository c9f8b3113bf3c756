"""A plain-Python byte-level BPE, the reference the ``tokenizers``-based SmolLM2 tokenizer is tested against.

Independent of the ``tokenizers`` library: pre-tokenize (every digit on its own, then GPT-2's regex), map each
word's UTF-8 bytes to symbols, and repeatedly merge the best-ranked adjacent pair. Slow, short, obviously right.
"""
from __future__ import annotations

import regex

from helpers.models.smollm2 import bytes_to_unicode

GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
DIGIT_SPLIT = regex.compile(r"(\p{N})")  # the capturing group keeps each digit as its own piece


class ReferenceBPE:
    def __init__(self, tokens: list[str], merges: list[str]) -> None:
        self.token_to_id = {token: i for i, token in enumerate(tokens)}
        self.rank = {tuple(line.split(" ")): r for r, line in enumerate(merges)}
        self.byte_to_symbol = bytes_to_unicode()
        self.cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        words = [w for piece in DIGIT_SPLIT.split(text) if piece for w in GPT2_PATTERN.findall(piece)]
        return [i for word in words for i in self._word(word)]

    def _word(self, word: str) -> list[int]:
        if word not in self.cache:
            symbols = [self.byte_to_symbol[b] for b in word.encode("utf-8")]
            while len(symbols) > 1:
                pair = min(zip(symbols, symbols[1:]), key=lambda p: self.rank.get(p, float("inf")))
                if pair not in self.rank:
                    break
                i = next(i for i in range(len(symbols) - 1) if (symbols[i], symbols[i + 1]) == pair)
                symbols[i: i + 2] = [pair[0] + pair[1]]
            self.cache[word] = [self.token_to_id[s] for s in symbols]
        return self.cache[word]
