"""NF4: 4-bit "normal float" weights (Dettmers et al. 2023, the "Q" of QLoRA), written from scratch (notebook 07).

NF4 stores a frozen weight as 4-bit indices into 16 levels spaced for normally distributed weights, one absmax
scale per block of 64 values, two indices per byte. The scales are kept in fp32 here (4 bytes per 64 weights =
0.5 bit/weight); the paper also quantizes them ("double quantization", ~0.127 bit/weight) — not done here.

``NF4Linear`` is a frozen layer with such a weight. Its forward and backward dequantize the weight just when
they need it (``NF4LinearFunction``), so no fp32 copy of the weight lives between forward and backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
#: The two values of every possible byte, ``[256, 2]``: ``(NF4_CODE[byte >> 4], NF4_CODE[byte & 0x0F])``.
NF4_PAIRS = torch.stack([NF4_CODE[torch.arange(256) >> 4], NF4_CODE[torch.arange(256) & 0x0F]], dim=1)


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
    if flat.numel() % block_size:
        flat = F.pad(flat, (0, (-flat.numel()) % block_size))
    return flat.view(-1, block_size)


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


def dequantize_nf4_plain(q: NF4Tensor) -> torch.Tensor:
    """The fp32 tensor ``q`` stands for (code value times its block's absmax), in its original shape: the
    definition, one code at a time (``dequantize_nf4`` gives the same values, bit for bit, faster)."""
    numel = math.prod(q.shape)
    codes = torch.stack([q.packed >> 4, q.packed & 0x0F], dim=1).reshape(-1)[:numel]
    values = _blocks(NF4_CODE.to(q.packed.device)[codes.long()], q.block_size) * q.absmax[:, None]
    return values.reshape(-1)[:numel].reshape(q.shape)


def dequantize_nf4(q: NF4Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_nf4_plain``, fast: one lookup per *byte* in ``NF4_PAIRS`` gives both of its values (no
    unpacking of nibbles), then one in-place multiplication by the block scales (no second weight-sized
    tensor). QLoRA runs it in every forward and backward pass of every quantized layer.

    ``pairs``: ``NF4_PAIRS`` already on ``q``'s device (``NF4Linear`` keeps one), else it is copied there.
    """
    numel = math.prod(q.shape)
    pairs = NF4_PAIRS.to(q.packed.device) if pairs is None else pairs
    values = pairs.index_select(0, q.packed.int())  # [bytes, 2]: both values of every byte
    values = _blocks(values.view(-1), q.block_size).mul_(q.absmax[:, None])  # [n_blocks, block_size], in place
    return values.view(-1)[:numel].view(q.shape)


def nf4_error(w: torch.Tensor, q: NF4Tensor | None = None) -> dict[str, float]:
    """Rounding error of NF4 on ``w``: mean/max absolute error, also in units of each block's absmax."""
    q = q if q is not None else quantize_nf4(w)
    flat = w.detach().reshape(-1).float()
    err = (dequantize_nf4(q).reshape(-1) - flat).abs()
    scale = q.absmax.repeat_interleave(q.block_size)[: flat.numel()]
    rel = torch.where(scale > 0, err / scale.clamp_min(1e-30), torch.zeros_like(err))
    return {"numel": flat.numel(), "mean_abs": err.mean().item(), "max_abs": err.max().item(),
            "mean_rel_absmax": rel.mean().item(), "max_rel_absmax": rel.max().item()}


class NF4LinearFunction(torch.autograd.Function):
    """``y = x @ W^T + b`` for a frozen NF4 weight ``W``, keeping only the 4-bit codes for the backward pass.

    ``F.linear(x, dequantize(W))`` would save the full fp32 ``W`` [out, in] of every layer until backward, so
    a QLoRA model would hold all its weights in fp32 at the peak. Here forward saves the packed codes and
    scales (already in memory), and backward dequantizes ``W`` again for ``grad_x = grad_y @ W``. ``W`` and
    ``b`` are frozen: no gradient for them, so ``x`` need not be saved either.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
                block_size: int, bias: torch.Tensor | None, pairs: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(packed, absmax)
        ctx.shape, ctx.block_size, ctx.pairs = shape, block_size, pairs  # pairs: the layer's constant NF4_PAIRS
        weight = dequantize_nf4(NF4Tensor(packed, absmax, shape, block_size), pairs).to(x.dtype)  # [out, in], freed
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))  # [..., out]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        packed, absmax = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_nf4(NF4Tensor(packed, absmax, ctx.shape, ctx.block_size), ctx.pairs).to(grad_out.dtype)
            grad_x = grad_out @ weight  # [..., out] @ [out, in] -> [..., in]
        return grad_x, None, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in NF4 and dequantized on the fly (``NF4LinearFunction``)."""

    def __init__(self, linear: nn.Linear, block_size: int = 64):
        super().__init__()
        q = quantize_nf4(linear.weight, block_size)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size = block_size
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        # the values of every byte (NF4_PAIRS), on the layer's device (moved with it; not saved: constants)
        self.register_buffer("pairs", NF4_PAIRS.to(linear.weight.device, copy=True), persistent=False)
        self.quant_error = nf4_error(linear.weight, q)  # the original weight is gone after this

    @property
    def nf4(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.block_size)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_nf4(self.nf4, self.pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NF4LinearFunction.apply(x, self.packed, self.absmax, self.nf4.shape, self.block_size, self.bias,
                                       self.pairs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block_size={self.block_size}"
