"""Byte-level BPE (the GPT-2 family's tokenizer), built from a vocabulary and a merge list.

How a text becomes token ids:

1. **Pre-tokenize** into "words": optionally every digit on its own first (SmolLM2's ``smollm``
   pre-tokenizer), then GPT-2's regex (letters, numbers, punctuation runs, whitespace) on each piece.
2. **Bytes to symbols**: each word's UTF-8 bytes are mapped one-to-one onto printable characters
   (``bytes_to_unicode``; a space becomes ``Ġ``), so every text is a string of vocabulary symbols.
3. **Merge**: repeatedly join the adjacent pair of symbols that appears earliest in the merge list,
   until no listed pair is left; each final symbol is a token.

User text is always plain text: a string such as ``<|endoftext|>`` inside it is tokenized like any
other characters, never turned into a special token.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import regex

# GPT-2's pre-tokenizer pattern (the same one Hugging Face's ByteLevel(use_regex=True) applies).
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
DIGIT_SPLIT = regex.compile(r"(\p{N})")  # the capturing group keeps each digit as its own piece
WORD_CACHE_SIZE = 1 << 16


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) are shifted to 256+n,
    which is why a space shows up as ``Ġ`` (chr(256 + 32)) in byte-level vocabularies.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in mapping)
    for n, byte in enumerate(shifted):
        mapping[byte] = chr(256 + n)
    return dict(sorted(mapping.items()))


def pre_tokenize(text: str, split_digits: bool) -> list[str]:
    """Split text into the words BPE works on (each word is merged on its own)."""
    pieces = DIGIT_SPLIT.split(text) if split_digits else [text]
    return [word for piece in pieces if piece for word in GPT2_PATTERN.findall(piece)]


def _merge_pair(line: str) -> tuple[str, str]:
    """"Ġ t" -> ("Ġ", "t"): byte-level symbols never contain a plain space, so there is exactly one."""
    left, sep, right = line.partition(" ")
    if not sep or not left or not right or " " in right:
        raise ValueError(f"malformed BPE merge {line!r}: expected two symbols separated by one space")
    return left, right


class ByteLevelBPE:
    """A byte-level BPE tokenizer with the course's tokenizer interface (encode, decode, pad_id, ...)."""

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Iterable[str],
        *,
        name: str,
        special_tokens: Iterable[str] = (),
        pad_token: str,
        split_digits: bool = False,
    ) -> None:
        """``tokens[i]`` is the symbol string of id ``i``; ``merges`` are "left right" lines, earliest first."""
        self.name = name
        self.tokens = list(tokens)
        self.token_to_id = {token: i for i, token in enumerate(self.tokens)}
        self.merge_rank = {_merge_pair(line): rank for rank, line in enumerate(merges)}
        self.special = {token: self.token_to_id[token] for token in special_tokens}
        self.pad_id = self.token_to_id[pad_token]
        self.split_digits = split_digits
        self.byte_to_symbol = bytes_to_unicode()
        self.symbol_to_byte = {symbol: byte for byte, symbol in self.byte_to_symbol.items()}
        self.missing_bytes = frozenset(b for b, s in self.byte_to_symbol.items() if s not in self.token_to_id)
        self._cache: dict[str, tuple[int, ...]] = {}  # word -> ids: texts repeat words, BPE is the slow part

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"ByteLevelBPE(name={self.name!r}, vocab_size={self.vocab_size}, merges={len(self.merge_rank)})"

    def encode(self, text: str) -> list[int]:
        """Token ids of plain ``text`` (special-token strings inside it stay ordinary text)."""
        return [i for word in pre_tokenize(text, self.split_digits) for i in self._word_ids(word)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 (a cut character) become U+FFFD."""
        symbols = "".join(self.tokens[int(i)] for i in ids)
        data = bytes(self.symbol_to_byte[s] for s in symbols)
        return data.decode("utf-8", errors="replace")

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Token ids of one pre-tokenized word, from the cache when seen before."""
        ids = self._cache.get(word)
        if ids is None:
            if len(self._cache) >= WORD_CACHE_SIZE:
                self._cache.clear()  # a simple bound on memory for endless streams of new words
            ids = self._cache[word] = self._encode_word(word)
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """BPE-merge one pre-tokenized word into token ids."""
        raw = word.encode("utf-8")
        if self.missing_bytes.intersection(raw):
            bad = next(ch for ch in word if self.missing_bytes.intersection(ch.encode("utf-8")))
            raise ValueError(
                f"{self.name}: character {bad!r} (U+{ord(bad):04X}) cannot be tokenized: its UTF-8 bytes include "
                f"one of the {len(self.missing_bytes)} byte values this vocabulary has no token for. "
                "Remove or replace it in the text first."
            )
        return tuple(self.token_to_id[s] for s in self._merge("".join(self.byte_to_symbol[b] for b in raw)))

    def _merge(self, word: str) -> list[str]:
        """Apply the merges to one word's symbols: always the best-ranked adjacent pair, left to right."""
        symbols = list(word)
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.merge_rank.get(p, float("inf")))
            if pair not in self.merge_rank:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols
