"""What every course model shares: the ``CausalLM`` interface and the tools that only need that interface.

A course model is ``embed -> blocks -> final_norm -> out_head`` with a ``tokenizer`` attached:

    ids [B, T] -> embed -> x [B, T, D] -> block x n_layers -> final_norm -> out_head -> logits [B, T, V or C]

GPT-2 (``helpers.models.gpt2``, notebook 04) and SmolLM2 (``helpers.models.smollm2``, notebook 08) implement
it. Here: reading the logits at the last real token (notebook 04), the classification head (notebook 04),
greedy generation (notebook 04), parameter counts, seed, the checks every loader runs (``CheckpointError``,
finite weights, expected shapes, text a tokenizer can take), and the course's device policy: which device
(``pick_device``), where a model is (``model_device``), which precision (``precision_for``) and a clock that
waits for the device (``clock``).
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from helpers import config


class CheckpointError(ValueError):
    """A checkpoint, weight file or adapter file is missing, unreadable or does not fit; the message says what to do."""


class CausalLM(nn.Module):
    """The shared interface: ``embed`` (defined by each model) -> ``blocks`` -> ``final_norm`` -> ``out_head``.

    Subclasses set ``cfg`` (with ``emb_dim``, ``n_layers``, ``context_length``, ``vocab_size``), ``tok_emb``,
    ``blocks`` (each with ``forward(x)`` and ``forward_last(x, index)``), ``final_norm``, ``out_head`` and
    ``tokenizer`` (``encode``, ``decode``, ``pad_id``, ``vocab_size``, ``name``).
    """

    cfg: Any
    tokenizer: Any = None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Everything before block 0: token ids [B, T] -> hidden states [B, T, D]."""
        raise NotImplementedError

    def forward_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm [B, T, D]."""
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab_size] (or [B, T, classes] once a classifier head replaced ``out_head``)."""
        return self.out_head(self.forward_hidden(ids))


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


def logits_from_hidden(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor | Sequence[int],
                       first_block: int = 0) -> torch.Tensor:
    """Logits [B, C] at the last real token, starting from hidden states ``x`` [B, T, D] that enter
    block ``first_block`` (0: the output of ``model.embed``; more: cached outputs of frozen blocks).

    The last block runs at one position per row (``block.forward_last``): its keys and values need
    every position, but nothing after it does.
    """
    lengths = _check_lengths(lengths, x.shape[0], x.shape[1], x.device)
    x = x[:, : int(lengths.max())]
    for block in model.blocks[first_block:-1]:
        x = block(x)
    x = model.blocks[-1].forward_last(x, lengths - 1)  # [B, D]
    return model.out_head(model.final_norm(x))


def last_token_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Logits [B, C] at the last real token of each right-padded row (``lengths[b]`` real tokens).

    Only the positions that can influence that token are computed: the batch is cut to the longest
    row, and the last block runs at one position per row (``block.forward_last``).
    """
    if ids.ndim != 2:
        raise ValueError(f"Expected ids [B, T]; got shape {tuple(ids.shape)}.")
    lengths = _check_lengths(lengths, ids.shape[0], ids.shape[1], ids.device)
    return logits_from_hidden(model, model.embed(ids[:, : int(lengths.max())]), lengths)


# ----------------------------------------------------------------------------- generation (notebook 04)
@torch.no_grad()
def generate_greedy(
    model: nn.Module, ids_or_text: str | torch.Tensor | Sequence[int], max_new_tokens: int, *, eos_id: int | None = None
) -> str | torch.Tensor:
    """Append ``max_new_tokens`` greedy (argmax) tokens; the input is cropped to the model's context.

    Text in -> text out (prompt + continuation, via ``model.tokenizer``); ids [T] or [B, T] in -> ids [B, T + new] out.
    Stops early once every row has produced ``eos_id`` (when given). Runs in eval mode, then restores the mode;
    on the model's device, under its ``precision_for`` autocast.
    """
    device = model_device(model)
    autocast = precision_for(device).autocast
    text = isinstance(ids_or_text, str)
    ids = torch.tensor([model.tokenizer.encode(ids_or_text)]) if text else torch.as_tensor(ids_or_text)
    ids = (ids if ids.ndim == 2 else ids[None]).to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            with autocast():
                logits = model(ids[:, -model.cfg.context_length:])[:, -1]  # [B, V]
            nxt = logits.argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if eos_id is not None:
                done |= nxt[:, 0] == eos_id
                if bool(done.all()):
                    break
    finally:
        model.train(was_training)
    return model.tokenizer.decode(ids[0].tolist()) if text else ids
