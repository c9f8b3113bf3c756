"""What every course model shares: the ``CausalLM`` interface and the tools that only need that interface.

A course model is ``embed -> blocks -> final_norm -> out_head`` with a ``tokenizer`` attached:

    ids [B, T] -> embed -> x [B, T, D] -> block x n_layers -> final_norm -> out_head -> logits [B, T, V or C]

GPT-2 (``helpers.models.gpt2``, notebook 04) and SmolLM2 (``helpers.models.smollm2``, notebook 08) implement
it. Here: reading the logits at the last real token (notebook 04), the classification head (notebook 04),
sequence packing (``Packing``: several texts in one row, no padding; notebook 07), generation with a KV cache
(``generate``; greedy in notebook 04, sampling and stop tokens in notebook 10), parameter counts, seed, the
checks every loader runs (``CheckpointError``, finite weights, expected shapes, text a tokenizer can take), and
the course's device policy: which device (``pick_device``), where a model is (``model_device``), which precision
(``precision_for``) and a clock that waits for the device (``clock``).
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers import config


class CheckpointError(ValueError):
    """A checkpoint, weight file or adapter file is missing, unreadable or does not fit; the message says what to do."""


class CausalLM(nn.Module):
    """The shared interface: ``embed`` (defined by each model) -> ``blocks`` -> ``final_norm`` -> ``out_head``.

    Subclasses set ``cfg`` (with ``emb_dim``, ``n_layers``, ``context_length``, ``vocab_size``), ``tok_emb``,
    ``blocks``, ``final_norm``, ``out_head`` and ``tokenizer`` (``encode``, ``decode``, ``pad_id``,
    ``vocab_size``, ``name``). Every block has

    * ``block(x, positions=None, attn_mask=None, cache=None)``: x [R, T, D] -> [R, T, D];
    * ``block.forward_last(x, index, positions=None, attn_mask=None)``: the output [B, D] at one position per text.

    ``positions`` [R, T] is each token's position within its own text (default 0..T-1 in every row; GPT-2 reads
    it in ``embed``, SmolLM2 in its rotary attention), ``attn_mask`` says which keys each query sees (None:
    causal; a boolean tensor [R, 1, T, T_keys], True = visible; a ``Packing``: causal within each packed text;
    see ``attend``), ``cache`` is a ``KVCache`` for generation.
    """

    cfg: Any
    tokenizer: Any = None

    def embed(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Everything before block 0: token ids [R, T] -> hidden states [R, T, D]."""
        raise NotImplementedError

    def forward_hidden(self, ids: torch.Tensor, positions: torch.Tensor | None = None, attn_mask: Mask = None,
                       cache: list[KVCache] | None = None) -> torch.Tensor:
        """Hidden states after the final norm [R, T, D] (``cache``: one ``KVCache`` per block)."""
        if cache is not None and attn_mask is None and cache[0].keys is not None:
            raise ValueError("With a filled KV cache, pass attn_mask: the new queries see the cached keys too.")
        x = self.embed(ids, positions)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, attn_mask, None if cache is None else cache[i])
        return self.final_norm(x)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None, attn_mask: Mask = None,
                cache: list[KVCache] | None = None) -> torch.Tensor:
        """Logits [R, T, vocab_size] (or [R, T, classes] once a classifier head replaced ``out_head``)."""
        return self.out_head(self.forward_hidden(ids, positions, attn_mask, cache))


@dataclass
class KVCache:
    """The keys and values one attention layer has computed so far, each [B, kv_heads, T_so_far, head_dim].

    Generation computes each position's keys and values once: every step appends the new token's (``extend``)
    and attends over all of them, instead of running the whole sequence through the model again.
    """

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values; return all of them."""
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values


def check_context(ids: torch.Tensor, positions: torch.Tensor | None, context_length: int) -> None:
    """A clear ``ValueError`` when a text (ids [R, T], or its ``positions``) is longer than the model's context."""
    longest = ids.shape[1] if positions is None or not positions.numel() else int(positions.max()) + 1
    if longest > context_length:
        raise ValueError(f"{longest} tokens do not fit the context of {context_length}: truncate the input.")


def default_positions(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """``positions`` [R, T], or 0..T-1 for every row of ``x`` [R, T, ...] when None."""
    return torch.arange(x.shape[1], device=x.device)[None] if positions is None else positions


@dataclass(frozen=True)
class Packing:
    """B texts one after another in one row of N = sum(lengths) tokens, with no padding anywhere (notebook 07).

    ``positions`` [1, N] restart at 0 at every text (GPT-2's position embedding, SmolLM2's rotary angles).
    Passed as ``attn_mask``, a ``Packing`` is the block-diagonal causal mask ``mask``: a token sees the earlier
    tokens of its own text only, so every text gets exactly the outputs it would get alone. ``ends`` [B]: each
    text's last column; ``text`` [N]: each token's text.
    """

    lengths: torch.Tensor  # [B]
    positions: torch.Tensor  # [1, N]
    ends: torch.Tensor  # [B]
    text: torch.Tensor  # [N]

    @classmethod
    def of(cls, lengths: torch.Tensor | Sequence[int], device: torch.device | str | None = None) -> "Packing":
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
        if lengths.ndim != 1 or not len(lengths) or int(lengths.min()) < 1:
            raise ValueError(f"A packed row needs one length >= 1 per text; got {lengths.tolist()}.")
        text = torch.arange(len(lengths), device=lengths.device).repeat_interleave(lengths)  # [N]
        ends = lengths.cumsum(0) - 1
        positions = torch.arange(len(text), device=lengths.device) - (ends - lengths + 1)[text]
        return cls(lengths, positions[None], ends, text)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The rows ``index`` of the mask, [1, 1, len(index), N] (True = may attend)."""
        column = torch.arange(len(self.text), device=self.text.device)
        return ((self.text[None, :] == self.text[index][:, None]) & (column[None, :] <= index[:, None]))[None, None]

    @property
    def mask(self) -> torch.Tensor:
        """The whole block-diagonal causal mask [1, 1, N, N], to look at: attention never builds it."""
        return self.rows(torch.arange(len(self.text), device=self.text.device))

    def check(self, x: torch.Tensor) -> None:
        if x.shape[0] != 1 or x.shape[1] != len(self.text):
            raise ValueError(f"A packed batch is one row of sum(lengths) = {len(self.text)} tokens; "
                             f"got shape {tuple(x.shape)}. Build it with helpers.data.collate_packed.")


Mask = torch.Tensor | Packing | None  # None: causal


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Mask = None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention of q [R, H, Tq, hd] over k, v [R, H, Tk, hd] -> [R, H, Tq, hd].

    ``attn_mask``: None = causal; a boolean tensor [R or 1, 1, Tq, Tk] (True = may attend); or a ``Packing``:
    causal within each text of a packed row, computed as one causal call per text, which never computes the
    scores between different texts (measured faster than the dense mask: ``benchmarks/model_speed.py attention``).
    """
    if isinstance(attn_mask, Packing):
        lengths = attn_mask.lengths.tolist()
        texts = zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))
        return torch.cat([F.scaled_dot_product_attention(*qkv, is_causal=True, dropout_p=dropout_p) for qkv in texts],
                         dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                          dropout_p=dropout_p)


def select_last(t: torch.Tensor, index: torch.Tensor, attn_mask: Mask) -> torch.Tensor:
    """``t`` [R, T, ...] at one position per text, shaped as attention queries.

    One text per row (``attn_mask`` None): row b at ``index[b]`` -> [B, 1, ...].
    Packed (one row, ``attn_mask`` a ``Packing``): the columns ``index`` of the row -> [1, B, ...].
    """
    if attn_mask is None:
        return t[torch.arange(len(index), device=t.device), index][:, None]
    return t[:, index]


def visible_from_last(index: torch.Tensor, width: int, attn_mask: Mask) -> torch.Tensor:
    """What the queries of ``select_last`` may see: [B, 1, 1, T] (row b: positions 0..index[b]), or the rows
    ``index`` of the packed mask, [1, 1, B, N]."""
    if attn_mask is None:
        return (torch.arange(width, device=index.device) <= index[:, None])[:, None, None, :]
    return attn_mask.rows(index)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) inside the ``with``; afterwards the model's previous mode, even after an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def run_blocks(model: nn.Module, x: torch.Tensor, first_block: int = 0, last_block: int | None = None,
               packing: Packing | None = None) -> torch.Tensor:
    """Blocks ``first_block`` up to ``last_block`` (exclusive; None: to the end) on ``x`` -> [R, T, D].

    ``x`` is token ids [R, T] (embedded first; only with ``first_block=0``) or the hidden states [R, T, D] that
    enter block ``first_block`` (e.g. a frozen-prefix cache). With ``packing``, ``x`` is one packed row: positions
    restart at every text and each text attends to itself only (notebook 07). No final norm.
    """
    positions = None
    if packing is not None:
        packing.check(x)
        positions = packing.positions
    if x.ndim == 2:
        if first_block:
            raise ValueError(f"Token ids enter at block 0, not {first_block}: pass the hidden states that enter it.")
        x = model.embed(x, positions)
    for block in model.blocks[first_block:last_block]:
        x = block(x, positions, packing)
    return x


# ----------------------------------------------------------------------------- checks every loader runs
def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``CheckpointError`` if any floating-point tensor holds NaN or inf (a model would answer NaN)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensor(s) hold NaN or inf values, e.g. {bad[:3]}. The file is damaged, or it "
            "was saved after training diverged (try a lower learning rate). Download or save it again."
        )


def check_shapes(expected: Mapping[str, Sequence[int]], found: Mapping[str, torch.Tensor], source: str,
                 fix: str) -> None:
    """Raise ``CheckpointError`` unless ``found`` has exactly the tensor names and shapes of ``expected``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{name}: file {tuple(found[name].shape)} vs model {tuple(expected[name])}"
             for name in expected if name in found and tuple(found[name].shape) != tuple(expected[name])]
    if missing or unexpected or wrong:
        problems = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                    f"wrong shapes {wrong[:5]}" if wrong else ""]
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(p for p in problems if p)}. {fix}")


def check_text(text: str, tokenizer_name: str, missing_bytes: frozenset[int] = frozenset()) -> bytes:
    """The UTF-8 bytes of ``text``, or a clear ``ValueError`` when a tokenizer cannot take it.

    Lone surrogates (e.g. ``"\\ud800"``, half of an emoji cut by a buggy program) have no UTF-8 form;
    ``missing_bytes`` are byte values the vocabulary has no token for (SmolLM2 lacks 21 control bytes).
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{tokenizer_name}: the text holds a lone surrogate {text[exc.start]!r} at position {exc.start}, "
            "which is not a character (half of an emoji, cut by some program). Remove it, or repair the text "
            "with text.encode('utf-8', 'replace').decode('utf-8')."
        ) from None
    if missing_bytes and not missing_bytes.isdisjoint(raw):
        bad = next(ch for ch in text if not missing_bytes.isdisjoint(ch.encode("utf-8")))
        raise ValueError(
            f"{tokenizer_name}: character {bad!r} (U+{ord(bad):04X}) cannot be tokenized: its UTF-8 bytes include "
            f"one of the {len(missing_bytes)} byte values this vocabulary has no token for (control characters). "
            "Remove or replace it in the text first."
        )
    return raw


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every entry of ``model.state_dict()`` (works on a ``meta``-device model too)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ----------------------------------------------------------------------------- device, precision, clock
# The course's one device rule: functions that make a model from a file put it on ``pick_device(device)``
# (``load_model``, ``load_classifier``); every other helper follows the model it is given (``model_device``):
# batches, cached activations, new layers (head, LoRA, NF4) and generated ids go where the model is, and no
# helper moves a model you pass it.

def _available(device: torch.device) -> str | None:
    """Why ``device`` cannot be used here, or None when it can."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available (no NVIDIA GPU, or a CPU-only build of PyTorch)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS (Apple GPU) is not available"
    return None


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else env COURSE_DEVICE, else the best available: cuda -> mps -> cpu.

    A name that is not a device raises ``ValueError``, a device this machine lacks ``RuntimeError``; both say
    what to set instead.
    """
    choice = device or config.device_name()
    if not choice:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    source = "device" if device else "COURSE_DEVICE"
    fix = ("unset COURSE_DEVICE to use the best available device" if source == "COURSE_DEVICE"
           else "leave it out to use COURSE_DEVICE or the best available device")
    try:
        chosen = torch.device(choice)
    except (RuntimeError, TypeError):
        raise ValueError(f"{source}={choice!r} is not a device: use cpu, cuda, cuda:1 (a GPU's number) or mps, "
                         f"or {fix}.") from None
    problem = _available(chosen)
    if problem:
        raise RuntimeError(f"{source}={choice!r} was asked for, but {problem}; use 'cpu', or {fix}.")
    return chosen


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters: where every helper puts the inputs it gives the model."""
    return next(model.parameters()).device


def synchronize(device: str | torch.device) -> None:
    """Wait until ``device`` has finished the work queued on it. A GPU runs asynchronously: a call returns
    as soon as its work is queued, so a clock read without waiting measures the queueing, not the work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def clock(device: str | torch.device | None = None) -> float:
    """``time.perf_counter()`` read once ``device`` has finished its work: ``start = clock(d)`` ...
    ``seconds = clock(d) - start``."""
    if device is not None:
        synchronize(device)
    return time.perf_counter()


@dataclass(frozen=True)
class Precision:
    """How a device computes: plain float32, or autocast to ``dtype`` (bfloat16 / float16).

    Under autocast the weights, gradients and optimizer state stay float32; matrix products run in ``dtype``
    and precision-sensitive operations (softmax, norms, losses) in float32. float16 has a narrow range, so
    small gradients would round to zero: training under it scales the loss first (``grad_scaler``).
    """

    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context to run forward passes (and the loss) in; nothing for float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for float16; for the others a disabled one, whose calls do nothing extra."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def _native_bf16() -> bool:
    """Native bfloat16 on the current CUDA GPU (Ampere or later); emulated bfloat16 is slower than float32."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older PyTorch without including_emulation: Ampere (8.0) and later have it natively
        return torch.cuda.get_device_capability() >= (8, 0)


def precision_for(device: str | torch.device) -> Precision:
    """The course's mixed-precision policy, one rule for training, evaluation and generation:

    * CUDA with native bfloat16 (compute capability >= 8.0: A100, H100, RTX 30xx/40xx, L4): bf16 autocast;
    * older CUDA GPUs with tensor cores (capability 7.x: V100, T4, RTX 20xx): fp16 autocast + a GradScaler;
    * older GPUs still, the CPU (bfloat16 measured >= 5x slower than float32 on the course's CPUs) and Apple's
      MPS: float32.

    Logits under autocast differ from float32 ones by rounding: within ``AUTOCAST_RTOL`` relative to their
    largest value (``scripts/gpu_check.py`` checks it on a GPU; the README gives the values measured).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if _native_bf16():
            return Precision("cuda", torch.bfloat16)
        if torch.cuda.get_device_capability(device) >= (7, 0):
            return Precision("cuda", torch.float16)
    return Precision(device.type)


#: How far autocast logits may be from float32 ones, relative to the largest |logit| (see ``precision_for``).
AUTOCAST_RTOL = {"bf16": 5e-2, "fp16": 1e-2}


# ----------------------------------------------------------------------------- seed, counts
def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (all devices) random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared/tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------- the classifier head (notebook 04)
def add_classifier_head(model: nn.Module, num_classes: int = 2, trainable_blocks: int = 1, seed: int = 123) -> nn.Module:
    """Turn an LM into a classifier: freeze everything, new ``out_head`` Linear(emb_dim, num_classes)
    (initialised under ``seed``), then unfreeze the last ``trainable_blocks`` blocks and ``final_norm``.
    Returns ``model`` (changed in place)."""
    n_layers = len(model.blocks)
    if not 0 <= trainable_blocks <= n_layers:
        raise ValueError(f"trainable_blocks must be in 0..{n_layers}, got {trainable_blocks}.")
    for p in model.parameters():
        p.requires_grad_(False)
    reference = model.tok_emb.weight
    with torch.random.fork_rng(devices=[]):  # the same head on every device; global RNG untouched
        torch.manual_seed(seed)
        head = nn.Linear(model.cfg.emb_dim, num_classes, device="cpu" if reference.is_meta else None)
    model.out_head = head.to(device=reference.device, dtype=reference.dtype)
    for module in [*model.blocks[n_layers - trainable_blocks:], model.final_norm]:
        for p in module.parameters():
            p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- the last real token (notebook 04)
def _check_lengths(lengths: torch.Tensor | Sequence[int], batch: int, width: int, device) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    if lengths.shape != (batch,):
        raise ValueError(f"Expected one length per row ({batch}); got lengths of shape {tuple(lengths.shape)}.")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > width):
        raise ValueError(
            f"lengths must be in 1..{width} (the padded width); got {int(lengths.min())}..{int(lengths.max())}. "
            f"Pass the number of real (non-padding) tokens of each row."
        )
    return lengths


def _logits_at(model: nn.Module, x: torch.Tensor, index: torch.Tensor, first_block: int,
               packing: Packing | None = None) -> torch.Tensor:
    """Blocks ``first_block``.. on ``x``, the last one only at ``index`` (``block.forward_last``) -> logits [B, C]."""
    x = run_blocks(model, x, first_block, -1, packing)
    positions = None if packing is None else packing.positions
    x = model.blocks[-1].forward_last(x, index, positions, packing)  # [B, D]
    return model.out_head(model.final_norm(x))


def logits_from_hidden(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor | Sequence[int],
                       first_block: int = 0) -> torch.Tensor:
    """Logits [B, C] at the last real token, starting from hidden states ``x`` [B, T, D] that enter
    block ``first_block`` (0: the output of ``model.embed``; more: cached outputs of frozen blocks).

    The last block runs at one position per row (``block.forward_last``): its keys and values need
    every position, but nothing after it does.
    """
    lengths = _check_lengths(lengths, x.shape[0], x.shape[1], x.device)
    return _logits_at(model, x[:, : int(lengths.max())], lengths - 1, first_block)


def last_token_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Logits [B, C] at the last real token of each right-padded row (``lengths[b]`` real tokens).

    Only the positions that can influence that token are computed: the batch is cut to the longest
    row, and the last block runs at one position per row (``block.forward_last``).
    """
    if ids.ndim != 2:
        raise ValueError(f"Expected ids [B, T]; got shape {tuple(ids.shape)}.")
    lengths = _check_lengths(lengths, ids.shape[0], ids.shape[1], ids.device)
    return logits_from_hidden(model, model.embed(ids[:, : int(lengths.max())]), lengths)


# ----------------------------------------------------------------------------- packing (notebook 07)
def packed_hidden(model: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor | Sequence[int],
                  first_block: int = 0) -> torch.Tensor:
    """Hidden states after the final norm at every position of a packed row -> [1, N, D].

    ``inputs``: token ids [1, N] (``helpers.data.collate_packed``), or the hidden states [1, N, D] that enter
    block ``first_block`` (e.g. cached outputs of frozen blocks, one text after another). For token-level
    losses (instruction tuning): text b occupies columns ``sum(lengths[:b])`` to ``sum(lengths[:b+1]) - 1``, so
    each text's targets, concatenated, are the targets of the row. ``model.out_head`` of the result gives the
    logits (apply it at the target positions only: the vocabulary is large).
    """
    return model.final_norm(run_blocks(model, inputs, first_block, packing=Packing.of(lengths, inputs.device)))


def packed_logits_from_hidden(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor | Sequence[int],
                              first_block: int = 0) -> torch.Tensor:
    """``logits_from_hidden`` for a packed row ``x`` [1, N, D] of texts of ``lengths`` [B] -> logits [B, C]."""
    packing = Packing.of(lengths, x.device)
    packing.check(x)
    return _logits_at(model, x, packing.ends, first_block, packing)


def packed_last_token_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor | Sequence[int]
                             ) -> torch.Tensor:
    """Logits [B, C] at the last token of each text of a packed row ids [1, N] (``helpers.data.collate_packed``).

    Equal to ``last_token_logits`` on the same texts right-padded, without computing any padding.
    """
    packing = Packing.of(lengths, ids.device)
    packing.check(ids)
    x = model.embed(ids, packing.positions)
    return _logits_at(model, x, packing.ends, 0, packing)


# ----------------------------------------------------------------------------- generation (notebooks 04, 10)
Prompts = str | Sequence[int] | torch.Tensor | Sequence[str] | Sequence[Sequence[int]]


def _prompt_rows(model: nn.Module, prompts: Prompts, lengths: Sequence[int] | torch.Tensor | None
                 ) -> tuple[list[list[int]], bool, bool]:
    """(token lists, one prompt?, text?) of any accepted form of ``prompts``."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts.tolist()
        single = prompts.ndim == 1
        rows = [ids] if single else ids
        if lengths is not None:
            rows = [row[: int(n)] for row, n in zip(rows, lengths, strict=True)]  # right-padded rows
        return rows, single, False
    if isinstance(prompts, str):
        return [model.tokenizer.encode(prompts)], True, True
    items = list(prompts)
    if items and all(isinstance(item, str) for item in items):
        return [model.tokenizer.encode(item) for item in items], False, True
    if items and all(isinstance(item, int) for item in items):
        return [items], True, False
    return [list(map(int, item)) for item in items], False, False


def _next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or sampled next token of each row: logits [B, V] -> [B]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def _generation_mask(real: torch.Tensor, n_new: int) -> torch.Tensor:
    """What the last ``n_new`` positions of left-padded rows see, [B, 1, n_new, T]: the real tokens up to
    themselves (causal, padding hidden). A padding position sees itself, so no softmax row is empty."""
    keys = torch.arange(real.shape[1], device=real.device)
    queries = keys[-n_new:]
    sees = (keys[None, :] <= queries[:, None]) & real[:, None, :]  # [B, n_new, T]
    return (sees | (keys[None, :] == queries[:, None]))[:, None]


@torch.no_grad()
def generate(model: nn.Module, prompts: Prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None, stop_ids: Collection[int] = (),
             kv_cache: bool = True, lengths: Sequence[int] | torch.Tensor | None = None
             ) -> list[int] | list[list[int]] | str | list[str]:
    """Continue one prompt or a batch of prompts by up to ``max_new_tokens`` tokens.

    ``prompts``: a text, a list of token ids, ids [T], a list of texts or of token lists, or ids [B, T]
    (right-padded rows when ``lengths`` gives each row's real length). Returns only the new part: token ids
    (the stop id included when one came) for ids, text (the stop token left out) for text; a list per prompt
    for a batch.

    * ``temperature`` 0: greedy (argmax); > 0: sample from softmax(logits / temperature), from the ``top_k``
      most likely tokens only when given, with a ``torch.Generator`` seeded with ``seed`` (reproducible).
    * A row stops after producing one of ``stop_ids`` (e.g. ``<|im_end|>``, ``<|endoftext|>``) or
      ``max_new_tokens`` tokens; the batch stops when every row has.
    * Prompts of different lengths are **left-padded**, with positions counted from each row's first real token
      and the padding hidden by the attention mask, so each row is continued exactly as if it were alone, and
      all rows append their next token at the same column (one step for the whole batch).
    * ``kv_cache``: compute each position's keys and values once (``KVCache``); False recomputes the whole
      sequence every step (the same tokens, slower; the tests compare them).
    * A prompt longer than ``context_length - max_new_tokens`` keeps its last tokens.
    """
    rows, single, text = _prompt_rows(model, prompts, lengths)
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"Need max_new_tokens >= 0, temperature >= 0 and top_k >= 1 or None; got {max_new_tokens}, "
                         f"{temperature}, {top_k}.")
    keep = model.cfg.context_length - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the context of "
                         f"{model.cfg.context_length} tokens.")
    rows = [row[-keep:] for row in rows]
    if not rows or not all(rows):
        raise ValueError("Every prompt needs at least one token.")
    device = model_device(model)
    autocast = precision_for(device).autocast
    pad_id = getattr(model.tokenizer, "pad_id", 0)
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows]).to(device)  # [B, P] left-padded
    real = torch.tensor([[False] * (width - len(row)) + [True] * len(row) for row in rows]).to(device)
    positions = (real.cumsum(dim=1) - 1).clamp(min=0)  # 0 at each row's first real token
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    cache = [KVCache() for _ in model.blocks] if kv_cache else None
    stops = set(map(int, stop_ids))
    out: list[list[int]] = [[] for _ in rows]
    with evaluating(model):
        step_ids, step_positions = ids, positions
        for _ in range(max_new_tokens):
            mask = _generation_mask(real, step_ids.shape[1])
            with autocast():
                hidden = model.forward_hidden(step_ids, step_positions, mask, cache)[:, -1]  # [B, D]
                logits = model.out_head(hidden).float()  # [B, V]
            token = _next_tokens(logits, temperature, top_k, generator)  # [B]
            for row, t in zip(out, token.tolist()):
                if not (row and row[-1] in stops):  # a finished row only waits for the others
                    row.append(t)
            if all(row[-1] in stops for row in out):
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            real = torch.cat([real, torch.ones_like(real[:, :1])], dim=1)
            step_ids, step_positions = (ids[:, -1:], positions[:, -1:]) if kv_cache else (ids, positions)
    if text:
        out = [model.tokenizer.decode(row[:-1] if row and row[-1] in stops else row) for row in out]
    return out[0] if single else out


def generate_greedy(
    model: nn.Module, ids_or_text: str | torch.Tensor | Sequence[int], max_new_tokens: int, *, eos_id: int | None = None
) -> str | torch.Tensor:
    """Append up to ``max_new_tokens`` greedy (argmax) tokens with ``generate`` (KV cache on).

    Text in -> text out (prompt + continuation); ids [T] or [B, T] in -> ids [B, T + new] out on the model's
    device, rows that stopped early filled with ``eos_id``. Stops once every row has produced ``eos_id`` (when
    given). On the model's device, under its ``precision_for`` autocast.
    """
    stop_ids = () if eos_id is None else (eos_id,)
    if isinstance(ids_or_text, str):
        prompt = model.tokenizer.encode(ids_or_text)
        return model.tokenizer.decode(prompt + generate(model, prompt, max_new_tokens, stop_ids=stop_ids))
    ids = torch.as_tensor(ids_or_text, dtype=torch.long).to(model_device(model))
    ids = ids if ids.ndim == 2 else ids[None]
    new = generate(model, ids, max_new_tokens, stop_ids=stop_ids)
    steps = max(map(len, new))
    filled = [row + [eos_id] * (steps - len(row)) for row in new]
    return torch.cat([ids, torch.tensor(filled, dtype=torch.long).reshape(len(new), steps).to(ids.device)], dim=1)
