"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023), written from scratch (notebook 07).

* **LoRA** freezes a pretrained ``nn.Linear`` (``W``: ``[out, in]``) and learns a low-rank update
  ``ΔW = B @ A * alpha / rank`` with ``A``: ``[rank, in]`` (random) and ``B``: ``[out, rank]`` (zeros, so the
  wrapped model starts out *identical* to the pretrained one). Trainable numbers per layer: ``rank * (in + out)``.
* **QLoRA** = the frozen base weights stored as NF4 (``helpers.nf4``) + LoRA adapters in full precision.

Only ``nn.Linear`` layers inside ``model.blocks`` are wrapped; ``model.out_head`` (the classification head)
stays fully trainable; everything else is frozen. Saving and loading adapters: ``helpers.checkpoints``.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from helpers.nf4 import NF4Linear, nf4_error, quantize_nf4

# --- LoRA ---------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """``base(x) + (x @ A^T @ B^T) * alpha / rank`` with the base layer frozen (``nn.Linear`` or ``NF4Linear``)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        reference = base.absmax if isinstance(base, NF4Linear) else base.weight  # device and dtype to match
        A = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # as in the LoRA reference code
        self.A = nn.Parameter(A.to(reference.device, reference.dtype))  # [rank, in]
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=reference.device, dtype=reference.dtype))
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling``: the update LoRA adds to the base weight, ``[out, in]``."""
        return (self.B @ self.A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + ((x.to(self.A.dtype) @ self.A.t() @ self.B.t()) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (inference without the extra matmuls)."""
        if not isinstance(self.base, nn.Linear):
            raise TypeError("cannot merge LoRA into a 4-bit NF4 base weight (it would be re-quantized); "
                            "use apply_lora (full-precision base) if you need a merged model")
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to float rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _matches(name: str, targets: Sequence[str] | None) -> bool:
    return targets is None or any(name == t or name.endswith("." + t) for t in targets)


def target_linears(model: nn.Module, targets: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers in ``model.blocks`` whose name ends with one of ``targets`` (None: all),
    keyed by their full name (e.g. ``blocks.0.att.W_query``)."""
    found = {f"blocks.{name}": m for name, m in model.blocks.named_modules()
             if isinstance(m, nn.Linear) and _matches(name, targets)}
    for t in targets or []:
        if not any(_matches(name, [t]) for name in found):
            linears = sorted({n.split(".", 2)[-1] for n, m in model.blocks.named_modules()
                              if isinstance(m, nn.Linear)})
            raise ValueError(f"LoRA target {t!r} matches no nn.Linear in model.blocks; "
                             f"names in a block: {linears}")
    return found


def lora_shapes(model: nn.Module, rank: int, targets: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """Name -> shape of every ``A`` and ``B`` that ``apply_lora(model, rank, targets=targets)`` would create,
    without changing ``model`` (``helpers.checkpoints`` checks an adapter file against it before loading)."""
    shapes = {}
    for name, linear in target_linears(model, targets).items():
        shapes[f"{name}.A"], shapes[f"{name}.B"] = (rank, linear.in_features), (linear.out_features, rank)
    return shapes


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA-wrapped layer of ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _wrap(model: nn.Module, rank: int, alpha: float, seed: int, targets: Sequence[str] | None,
          quantize: bool, train_head: bool = True) -> nn.Module:
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; load a fresh model before applying LoRA again")
    tied = getattr(model, "tok_emb", None) is not None and model.out_head.weight is model.tok_emb.weight
    if train_head and tied:
        raise ValueError("model.out_head is still the LM head tied to the token embedding; replace it with "
                         "the classification head (add_classifier_head) before applying LoRA")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, linear in target_linears(model, targets).items():
        base = NF4Linear(linear) if quantize else linear
        _set_module(model, name, LoRALinear(base, rank, alpha, generator))
    model.out_head.requires_grad_(train_head)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": None if targets is None else list(targets),
                         "quantization": "nf4" if quantize else "none"}
    return model


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 16, seed: int = 123,
               targets: Sequence[str] | None = None, train_head: bool = True) -> nn.Module:
    """Freeze ``model``, wrap the ``nn.Linear`` layers of ``model.blocks`` (all, or those whose name ends with
    one of ``targets``) with LoRA, keep ``model.out_head`` trainable. In place; returns ``model``.

    ``train_head=False`` keeps the output head frozen too, e.g. the language-model head tied to the token
    embedding in instruction fine-tuning (notebook 10), where only the adapters learn."""
    return _wrap(model, rank, alpha, seed, targets, quantize=False, train_head=train_head)


def apply_qlora(model: nn.Module, rank: int = 16, alpha: float = 16, seed: int = 123,
                targets: Sequence[str] | None = None) -> nn.Module:
    """Like :func:`apply_lora`, but the frozen base weights of the wrapped layers are stored as NF4."""
    return _wrap(model, rank, alpha, seed, targets, quantize=True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (in place)."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (in place)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def lora_param_count(model: nn.Module) -> int:
    """Number of LoRA parameters (A and B of every wrapped layer; the head is not included)."""
    return sum(m.A.numel() + m.B.numel() for m in lora_layers(model).values())


def expected_lora_params(in_out_pairs: Iterable[tuple[int, int]], rank: int) -> int:
    """The formula: ``sum(rank * (in + out))`` over the wrapped layers."""
    return sum(rank * (n_in + n_out) for n_in, n_out in in_out_pairs)


def weight_memory(model: nn.Module, block_size: int = 64) -> dict[str, float]:
    """Bytes of the frozen base weights of the Linear layers in ``model.blocks`` in fp32, bf16 and NF4
    (packed codes + fp32 scales), and NF4's rounding error (from quantizing now, or recorded by NF4Linear).
    Quantizing GPT-2 124M's weights to measure the error takes ~15 s on 2 CPU cores."""
    fp32 = bf16 = nf4 = 0
    errors = []
    for name, m in model.blocks.named_modules():
        if isinstance(m, LoRALinear) or not isinstance(m, (nn.Linear, NF4Linear)):
            continue
        n = m.in_features * m.out_features
        fp32, bf16 = fp32 + 4 * n, bf16 + 2 * n
        nf4 += math.ceil(n / 2) + 4 * math.ceil(n / getattr(m, "block_size", block_size))
        is_nf4 = isinstance(m, NF4Linear)
        errors.append(m.quant_error if is_nf4 else nf4_error(m.weight, quantize_nf4(m.weight, block_size)))
    total = sum(e["numel"] for e in errors) or 1
    return {"fp32_bytes": fp32, "bf16_bytes": bf16, "nf4_bytes": nf4,
            "nf4_mean_abs_error": sum(e["mean_abs"] * e["numel"] for e in errors) / total,
            "nf4_max_abs_error": max((e["max_abs"] for e in errors), default=0.0),
            "nf4_mean_error_rel_absmax": sum(e["mean_rel_absmax"] * e["numel"] for e in errors) / total,
            "nf4_max_error_rel_absmax": max((e["max_rel_absmax"] for e in errors), default=0.0)}
