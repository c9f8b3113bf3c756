"""LoRA (Hu et al. 2021) and QLoRA-style NF4 weights (Dettmers et al. 2023), written from scratch.

* **LoRA** freezes a pretrained ``nn.Linear`` (``W``: ``[out, in]``) and learns a low-rank update
  ``ΔW = B @ A * alpha / rank`` with ``A``: ``[rank, in]`` (random) and ``B``: ``[out, rank]`` (zeros, so the
  wrapped model starts out *identical* to the pretrained one). Trainable numbers per layer: ``rank * (in + out)``.
* **NF4** stores a frozen weight as 4-bit indices into 16 "normal float" levels (spaced for normally
  distributed weights), one absmax scale per block of 64 values, two indices per byte. The scales are kept in
  fp32 here (4 bytes per 64 weights = 0.5 bit/weight); the paper also quantizes them ("double quantization",
  8-bit scales, ~0.127 bit/weight) — not done here.
* **QLoRA** = NF4 frozen base weights + LoRA adapters in full precision.

Only ``nn.Linear`` layers inside ``model.blocks`` are wrapped; ``model.out_head`` (the classification head)
stays fully trainable; everything else is frozen. Adapters + head are saved to a small safetensors file.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

ADAPTER_FORMAT = "course-lora-v1"

# --- NF4 ----------------------------------------------------------------------------------------------

#: The 16 NF4 levels, exactly as in the QLoRA paper's appendix / bitsandbytes (``create_normal_map``).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
#: Largest rounding error in units of the block's absmax: half the widest gap (between -1.0 and -0.696).
NF4_MAX_HALF_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2)


@dataclass(frozen=True)
class NF4Tensor:
    """A tensor stored as NF4: ``packed`` holds two 4-bit codes per byte (element ``2i`` in the high nibble,
    as bitsandbytes does), ``absmax`` one fp32 scale per block of ``block_size`` elements."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2)]
    absmax: torch.Tensor  # float32 [ceil(numel / block_size)]
    shape: torch.Size
    block_size: int = 64

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks, as ``[n_blocks, block_size]``."""
    return F.pad(flat, (0, (-flat.numel()) % block_size)).view(-1, block_size)


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> NF4Tensor:
    """Quantize ``w`` (any shape, any numel: the last block is zero-padded) to NF4 with per-block absmax."""
    if block_size % 2:
        raise ValueError(f"block_size must be even (two codes per byte), got {block_size}")
    flat = w.detach().reshape(-1).float()
    blocks = _blocks(flat, block_size)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = torch.bucketize(normalized, _NF4_MIDPOINTS.to(w.device)).to(torch.uint8).reshape(-1)[: flat.numel()]
    codes = F.pad(codes, (0, codes.numel() % 2))  # odd numel: one spare nibble
    packed = (codes[0::2] << 4) | codes[1::2]
    return NF4Tensor(packed.contiguous(), absmax.contiguous(), torch.Size(w.shape), block_size)


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """The fp32 tensor ``q`` stands for (code value times its block's absmax), in its original shape."""
    numel = math.prod(q.shape)
    codes = torch.stack([q.packed >> 4, q.packed & 0x0F], dim=1).reshape(-1)[:numel]
    values = _blocks(NF4_CODE.to(q.packed.device)[codes.long()], q.block_size) * q.absmax[:, None]
    return values.reshape(-1)[:numel].reshape(q.shape)


def nf4_error(w: torch.Tensor, q: NF4Tensor | None = None) -> dict[str, float]:
    """Rounding error of NF4 on ``w``: mean/max absolute error, also in units of each block's absmax."""
    q = q if q is not None else quantize_nf4(w)
    flat = w.detach().reshape(-1).float()
    err = (dequantize_nf4(q).reshape(-1) - flat).abs()
    scale = q.absmax.repeat_interleave(q.block_size)[: flat.numel()]
    rel = torch.where(scale > 0, err / scale.clamp_min(1e-30), torch.zeros_like(err))
    return {"numel": flat.numel(), "mean_abs": err.mean().item(), "max_abs": err.max().item(),
            "mean_rel_absmax": rel.mean().item(), "max_rel_absmax": rel.max().item()}


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in NF4 and dequantized to fp32 on every forward."""

    def __init__(self, linear: nn.Linear, block_size: int = 64):
        super().__init__()
        q = quantize_nf4(linear.weight, block_size)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size = block_size
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.quant_error = nf4_error(linear.weight, q)  # the original weight is gone after this

    @property
    def nf4(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.block_size)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_nf4(self.nf4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block_size={self.block_size}"


# --- LoRA ---------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """``base(x) + (x @ A^T @ B^T) * alpha / rank`` with the base layer frozen (``nn.Linear`` or ``NF4Linear``)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        weight = base.weight
        A = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # as in the LoRA reference code
        self.A = nn.Parameter(A.to(weight.device, weight.dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
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


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA-wrapped layer of ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _wrap(model: nn.Module, rank: int, alpha: float, seed: int, targets: Sequence[str] | None,
          quantize: bool) -> nn.Module:
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; load a fresh model before applying LoRA again")
    if getattr(model, "tok_emb", None) is not None and model.out_head.weight is model.tok_emb.weight:
        raise ValueError("model.out_head is still the LM head tied to the token embedding; replace it with "
                         "the classification head (add_classifier_head) before applying LoRA")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, linear in target_linears(model, targets).items():
        base = NF4Linear(linear) if quantize else linear
        _set_module(model, name, LoRALinear(base, rank, alpha, generator))
    model.out_head.requires_grad_(True)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": None if targets is None else list(targets),
                         "quantization": "nf4" if quantize else "none"}
    return model


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 16, seed: int = 123,
               targets: Sequence[str] | None = None) -> nn.Module:
    """Freeze ``model``, wrap the ``nn.Linear`` layers of ``model.blocks`` (all, or those whose name ends with
    one of ``targets``) with LoRA, keep ``model.out_head`` trainable. In place; returns ``model``."""
    return _wrap(model, rank, alpha, seed, targets, quantize=False)


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


# --- Save / load adapters -----------------------------------------------------------------------------

class AdapterFileError(ValueError):
    """The adapter file does not fit this model (or is not an adapter file)."""


def _base_model_name(model: nn.Module) -> str:
    for value in (getattr(model, "name", None), getattr(model.cfg, "name", None),
                  getattr(getattr(model, "tokenizer", None), "name", None)):
        if isinstance(value, str) and value:
            return value
    return "unknown"


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = layer.A, layer.B
    tensors["out_head.weight"] = model.out_head.weight
    if model.out_head.bias is not None:
        tensors["out_head.bias"] = model.out_head.bias
    return tensors


def save_adapters(model: nn.Module, path: str | os.PathLike, base_model: str | None = None) -> int:
    """Save only the LoRA A/B tensors and the classification head (+ metadata: rank, alpha, targets,
    quantization, num_classes, ``base_model`` name, sizes) as safetensors. Returns the file size in bytes."""
    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise ValueError("model has no LoRA layers; call apply_lora or apply_qlora first")
    tensors = {k: v.detach().cpu().contiguous() for k, v in _adapter_tensors(model).items()}
    metadata = {"format": ADAPTER_FORMAT, "rank": str(config["rank"]), "alpha": str(config["alpha"]),
                "targets": json.dumps(config["targets"]), "quantization": config["quantization"],
                "num_classes": str(model.out_head.out_features), "base_model": base_model or _base_model_name(model),
                "emb_dim": str(model.cfg.emb_dim), "n_layers": str(model.cfg.n_layers)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path.stat().st_size


_METADATA_KEYS = ("rank", "alpha", "targets", "quantization", "num_classes", "base_model", "emb_dim", "n_layers")


def _read_adapters(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for garbage files
        raise AdapterFileError(f"{path} is not a safetensors file ({exc}); pass a file written by "
                               "save_adapters") from exc
    if metadata.get("format") != ADAPTER_FORMAT:
        raise AdapterFileError(f"{path} is not a LoRA adapter file from save_adapters "
                               f"(metadata format={metadata.get('format')!r}, expected {ADAPTER_FORMAT!r})")
    missing = [k for k in _METADATA_KEYS if k not in metadata]
    if missing:
        raise AdapterFileError(f"{path}: adapter metadata lacks {missing}; re-save it with save_adapters")
    return metadata, tensors


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Turn a freshly loaded pretrained ``model`` into the saved fine-tuned one, in place: replace the LM head
    with the saved classification head, apply LoRA/QLoRA with the saved config, load A/B and the head.
    Every tensor name and shape is checked; a mismatch raises :class:`AdapterFileError`."""
    path = Path(path)
    meta, tensors = _read_adapters(path)
    for key in ("emb_dim", "n_layers"):
        if int(meta[key]) != getattr(model.cfg, key):
            raise AdapterFileError(
                f"{path} was saved for base model {meta['base_model']!r} with {key}={meta[key]}, but this "
                f"model has {key}={getattr(model.cfg, key)} ({_base_model_name(model)!r}); load the base "
                "model the adapters were trained on")
    head_w = tensors.get("out_head.weight")
    if head_w is None or head_w.shape != (int(meta["num_classes"]), model.cfg.emb_dim):
        raise AdapterFileError(f"{path}: classification head missing or of the wrong shape "
                               f"({None if head_w is None else tuple(head_w.shape)})")
    device, dtype = model.tok_emb.weight.device, model.tok_emb.weight.dtype
    model.out_head = nn.Linear(head_w.shape[1], head_w.shape[0], bias="out_head.bias" in tensors,
                               device=device, dtype=dtype)
    apply = apply_qlora if meta["quantization"] == "nf4" else apply_lora
    apply(model, rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=json.loads(meta["targets"]))

    params = _adapter_tensors(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterFileError(f"{path} does not match this model's LoRA layers: missing {missing[:5]}"
                               f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                               f"{'...' if len(unexpected) > 5 else ''}; was it saved for another base model?")
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
             for k, p in params.items() if tensors[k].shape != p.shape]
    if wrong:
        raise AdapterFileError(f"{path}: tensor shapes do not match this model: {wrong[:5]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    return model
