"""What every course model shares: the ``CausalLM`` interface and the tools that only need that interface.

A course model is ``embed -> blocks -> final_norm -> out_head`` with a ``tokenizer`` attached:

    ids [B, T] -> embed -> x [B, T, D] -> block x n_layers -> final_norm -> out_head -> logits [B, T, V or C]

GPT-2 (``helpers.models.gpt2``, notebook 04) and SmolLM2 (``helpers.models.smollm2``, notebook 08) implement
it. Here: reading the logits at the last real token (notebook 04), the classification head (notebook 04),
greedy generation (notebook 04), parameter counts, device and seed, and the checks every loader runs
(``CheckpointError``, finite weights, expected shapes, text a tokenizer can take).
"""
from __future__ import annotations

import random
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


# ----------------------------------------------------------------------------- device, seed, counts
def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else env COURSE_DEVICE, else the best available: cuda -> mps -> cpu."""
    choice = device or config.device_name()
    if choice:
        chosen = torch.device(choice)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"Device {choice!r} was requested but CUDA is not available; unset COURSE_DEVICE or use 'cpu'.")
        if chosen.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"Device {choice!r} was requested but MPS is not available; unset COURSE_DEVICE or use 'cpu'.")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
    Stops early once every row has produced ``eos_id`` (when given). Runs in eval mode, then restores the mode.
    """
    device = next(model.parameters()).device
    text = isinstance(ids_or_text, str)
    ids = torch.tensor([model.tokenizer.encode(ids_or_text)]) if text else torch.as_tensor(ids_or_text)
    ids = (ids if ids.ndim == 2 else ids[None]).to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
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
