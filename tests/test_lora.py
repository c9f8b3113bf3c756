"""LoRA (helpers/lora.py), NF4 (helpers/nf4.py) and adapter files (helpers/checkpoints.py): offline, small models."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from helpers.checkpoints import load_adapters, save_adapters
from helpers.lora import (
    LoRALinear, apply_lora, apply_qlora, expected_lora_params, lora_param_count, merge_lora, target_linears,
    unmerge_lora, weight_memory,
)
from helpers.models.base import CheckpointError
from helpers.nf4 import (
    NF4_CODE, NF4_MAX_HALF_GAP, NF4_PAIRS, NF4Linear, dequantize_nf4, dequantize_nf4_plain, quantize_nf4,
)

D, CLASSES = 20, 2  # 20 * 20 = 400 weights: not a multiple of the NF4 block size 64


class ToyBlock(nn.Module):
    """Stand-in transformer block: the same kinds of Linear layers as GPT-2 (q/k/v/out, two MLP layers)."""

    def __init__(self, d: int):
        super().__init__()
        self.att = nn.ModuleDict({n: nn.Linear(d, d, bias=n != "out_proj") for n in ("q", "k", "v", "out_proj")})
        self.ff = nn.Sequential(nn.Linear(d, 3 * d), nn.GELU(), nn.Linear(3 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.att[n](x) for n in "qkv")
        x = x + self.att["out_proj"](nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.ff(x)


class ToyModel(nn.Module):
    def __init__(self, d: int = D, n_layers: int = 2, vocab: int = 50, classes: int | None = CLASSES):
        super().__init__()
        self.cfg = SimpleNamespace(emb_dim=d, n_layers=n_layers, n_heads=1, context_length=16, vocab_size=vocab)
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(ToyBlock(d) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d)
        self.out_head = nn.Linear(d, classes) if classes else nn.Linear(d, vocab, bias=False)
        if not classes:
            self.out_head.weight = self.tok_emb.weight  # tied LM head, as in GPT-2

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.out_head(self.final_norm(x))


def toy(seed: int = 0, **kwargs) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel(**kwargs).eval()


IDS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
TOY_LINEARS = ([(D, D)] * 4 + [(D, 3 * D), (3 * D, D)]) * 2  # (in, out) of every Linear in the blocks


def perturb_b(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.1)


# --- LoRA ---------------------------------------------------------------------------------------------

def test_lora_model_equals_base_at_init():
    base, wrapped = toy(), apply_lora(toy(), rank=4, alpha=8)
    assert sum(isinstance(m, LoRALinear) for m in wrapped.modules()) == 12
    torch.testing.assert_close(wrapped(IDS), base(IDS), atol=1e-6, rtol=0)
    layer = wrapped.blocks[0].att["q"]
    assert layer.A.shape == (4, D) and layer.B.shape == (D, 4) and layer.scaling == 2.0
    assert layer.A.abs().max() > 0 and layer.B.abs().max() == 0


def test_trainable_params_match_formula_and_seed_is_reproducible():
    model = apply_lora(toy(), rank=4)
    head = D * CLASSES + CLASSES
    assert lora_param_count(model) == expected_lora_params(TOY_LINEARS, 4) == 4 * sum(i + o for i, o in TOY_LINEARS)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_param_count(model) + head
    again = apply_lora(toy(), rank=4)
    torch.testing.assert_close(model.blocks[1].ff[2].A, again.blocks[1].ff[2].A, atol=0, rtol=0)


def test_targets_choose_layers_by_name_suffix():
    model = apply_lora(toy(), rank=2, targets=["q", "v"])
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == [
        "blocks.0.att.q", "blocks.0.att.v", "blocks.1.att.q", "blocks.1.att.v"]
    assert lora_param_count(model) == expected_lora_params([(D, D)] * 4, 2)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        target_linears(toy(), ["W_query"])


def test_refuses_tied_lm_head_and_double_application():
    with pytest.raises(ValueError, match="classification head"):
        apply_lora(toy(classes=None))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(apply_lora(toy()))


def test_gradients_flow_only_into_a_b_and_head():
    model = apply_lora(toy(), rank=4)
    perturb_b(model)  # with B = 0 the gradient of A would be zero
    nn.functional.cross_entropy(model(IDS)[:, -1], torch.tensor([0, 1, 1])).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(n.endswith((".A", ".B")) or n.startswith("out_head.") for n in trainable)
    assert len(trainable) == 2 * 12 + 2


def test_merge_equals_unmerged_and_unmerge_restores_weights():
    model = apply_lora(toy(), rank=4, alpha=8)
    perturb_b(model)
    before = {n: p.clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    unmerged = model(IDS)
    assert (unmerged - toy()(IDS)).abs().max() > 1e-3  # the perturbation does change the output
    merge_lora(model)
    torch.testing.assert_close(model(IDS), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n.endswith("base.weight"):
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(IDS), unmerged, atol=1e-6, rtol=0)


# --- NF4 ----------------------------------------------------------------------------------------------

def test_nf4_code_book():
    assert NF4_CODE.shape == (16,) and NF4_CODE[0] == -1 and NF4_CODE[7] == 0 and NF4_CODE[15] == 1
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert NF4_MAX_HALF_GAP == pytest.approx((1 - 0.6961928009986877) / 2)


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0 ** -6])  # powers of two: scaling is exact in float
def test_every_code_value_round_trips_exactly(scale):
    w = torch.cat([NF4_CODE, NF4_CODE.flip(0), NF4_CODE[torch.randperm(16)], NF4_CODE]) * scale  # 64 values
    q = quantize_nf4(w)
    assert q.absmax.tolist() == [scale]
    assert torch.equal(dequantize_nf4(q), w)


@pytest.mark.parametrize("shape", [(768, 768), (3, 7), (1,), (5, 13, 3), (64,), (0, 4)])
def test_nf4_error_bound_shapes_and_size(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    q = quantize_nf4(w)
    n, n_blocks = w.numel(), math.ceil(w.numel() / 64)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == math.ceil(n / 2)
    assert q.absmax.numel() == n_blocks and q.nbytes == math.ceil(n / 2) + 4 * n_blocks
    back = dequantize_nf4(q)
    assert back.shape == w.shape and back.dtype == torch.float32
    if n:
        absmax = q.absmax.repeat_interleave(64)[:n].reshape(shape)
        assert torch.all((back - w).abs() <= absmax * NF4_MAX_HALF_GAP + 1e-7)


@pytest.mark.parametrize("shape, block_size", [((768, 768), 64), ((3, 7), 64), ((1,), 64), ((5, 13, 3), 16),
                                               ((130,), 64), ((0, 4), 64), ((1000,), 128)])
def test_fast_dequantization_equals_the_plain_one_bit_for_bit(shape, block_size):
    """One lookup per byte in NF4_PAIRS (both of its values) instead of one per 4-bit code: the same floats."""
    assert [tuple(NF4_PAIRS[byte].tolist()) for byte in range(256)] == \
        [(NF4_CODE[byte >> 4].item(), NF4_CODE[byte & 15].item()) for byte in range(256)]
    q = quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02, block_size)
    fast, plain = dequantize_nf4(q), dequantize_nf4_plain(q)
    assert fast.shape == plain.shape == shape and torch.equal(fast, plain)


def test_nf4_zero_block_and_packing_order():
    w = torch.zeros(130)
    w[64], w[65] = 1.0, -1.0  # block 1 = [1, -1, 0, ...]: codes 15, 0 -> byte 0xF0 (first value in high nibble)
    q = quantize_nf4(w)
    assert q.absmax.tolist() == [0.0, 1.0, 0.0]
    assert q.packed[32].item() == 0xF0 and q.packed[0].item() == 0x77
    assert torch.equal(dequantize_nf4(q), w)


def test_nf4_linear_and_qlora():
    linear = nn.Linear(D, 3 * D)
    nf4 = NF4Linear(linear)
    x = torch.randn(4, D)
    expected = nn.functional.linear(x, dequantize_nf4(quantize_nf4(linear.weight)), linear.bias)
    torch.testing.assert_close(nf4(x), expected)
    assert not list(nf4.parameters())  # frozen: codes, scales and bias are buffers

    base, model = toy(), apply_qlora(toy(), rank=4)
    assert all(isinstance(m.base, NF4Linear) for m in model.modules() if isinstance(m, LoRALinear))
    assert (model(IDS) - base(IDS)).abs().max() < 0.1  # only NF4 rounding (B = 0)
    assert lora_param_count(model) == expected_lora_params(TOY_LINEARS, 4)
    with pytest.raises(TypeError, match="NF4"):
        merge_lora(model)

    mem = weight_memory(model)
    n = sum(i * o for i, o in TOY_LINEARS)
    assert mem["fp32_bytes"] == 4 * n and mem["bf16_bytes"] == 2 * n
    assert mem["nf4_bytes"] == sum(math.ceil(i * o / 2) + 4 * math.ceil(i * o / 64) for i, o in TOY_LINEARS)
    assert 0 < mem["nf4_max_error_rel_absmax"] <= NF4_MAX_HALF_GAP + 1e-6
    assert weight_memory(toy())["nf4_mean_abs_error"] == pytest.approx(mem["nf4_mean_abs_error"])


# --- Save / load adapters -----------------------------------------------------------------------------

@pytest.mark.parametrize("apply", [apply_lora, apply_qlora])
def test_adapters_round_trip_with_head(tmp_path, apply):
    trained = apply(toy(), rank=4, alpha=8, targets=["q", "v", "ff.2"])
    perturb_b(trained)
    with torch.no_grad():
        trained.out_head.weight.add_(1.0)  # a "trained" head that differs from any fresh one
    size = save_adapters(trained, tmp_path / "adapters.safetensors")
    numbers = expected_lora_params([(D, D)] * 4 + [(3 * D, D)] * 2, 4) + D * CLASSES + CLASSES
    assert size == (tmp_path / "adapters.safetensors").stat().st_size < 4 * numbers + 2048  # fp32 + header

    fresh = toy(classes=None)  # a freshly loaded pretrained model still has its tied LM head
    load_adapters(fresh, tmp_path / "adapters.safetensors")
    assert fresh.out_head.out_features == CLASSES and fresh.lora_config == trained.lora_config
    torch.testing.assert_close(fresh(IDS), trained(IDS), atol=0, rtol=0)
    assert sum(p.numel() for p in fresh.parameters() if p.requires_grad) == \
        sum(p.numel() for p in trained.parameters() if p.requires_grad)


def test_wrong_adapter_files_give_clear_errors(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapters(apply_lora(toy(), rank=4), path)
    with pytest.raises(CheckpointError, match="emb_dim=20.*emb_dim=24"):
        load_adapters(toy(d=24, classes=None), path)

    other = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a LoRA adapter file"):
        load_adapters(toy(classes=None), other)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_adapters(toy(classes=None), garbage)

    # same metadata, but a tensor of the wrong shape (e.g. a base model with a different MLP width)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.0.ff.0.A"] = torch.zeros(4, D + 1)
    save_file(tensors, str(other), metadata=meta)
    with pytest.raises(CheckpointError, match=r"blocks.0.ff.0.A: file \(4, 21\) vs model \(4, 20\)"):
        load_adapters(toy(classes=None), other)

    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapters(toy(), path)


# --- A tiny random GPT-2 -------------------------------------------------------------------------------

@pytest.mark.parametrize("apply", [apply_lora, apply_qlora])
def test_tiny_gpt2(tmp_path, apply):
    from helpers.models import base, gpt2
    cfg = gpt2.GPT2Config(vocab_size=100, context_length=64, emb_dim=32, n_heads=2, n_layers=2)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return gpt2.GPT2Model(cfg).eval()

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([9, 5])
    model = apply(base.add_classifier_head(fresh()), rank=4, alpha=8)
    pairs = [(m.in_features, m.out_features) for m in target_linears(fresh()).values()]
    assert len(pairs) == 2 * 6 and lora_param_count(model) == expected_lora_params(pairs, 4)
    assert base.count_params(model, trainable_only=True) == lora_param_count(model) + 32 * 2 + 2
    before = base.last_token_logits(model, ids, lengths)
    perturb_b(model)
    after = base.last_token_logits(model, ids, lengths)  # through block.forward_last
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, model(ids)[torch.arange(2), lengths - 1], atol=1e-5, rtol=0)

    size = save_adapters(model, tmp_path / "gpt2.safetensors")
    reloaded = load_adapters(fresh(), tmp_path / "gpt2.safetensors")
    torch.testing.assert_close(base.last_token_logits(reloaded, ids, lengths), after, atol=0, rtol=0)
    assert size < 64 * 1024
    assert len(target_linears(fresh(), ["W_query", "W_value"])) == 4


# --- QLoRA's memory: no fp32 weight kept for backward --------------------------------------------------

def test_nf4_linear_keeps_only_the_packed_weight_for_backward():
    linear = nn.Linear(64, 192)
    layer = NF4Linear(linear)
    x = torch.randn(5, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes <= layer.packed.numel() + 4 * layer.absmax.numel()  # 4-bit codes + scales, no fp32 weight
    weight = dequantize_nf4(quantize_nf4(linear.weight))
    grad_out = torch.randn(5, 192)
    y.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ weight)  # dequantized again in backward
    torch.testing.assert_close(y, nn.functional.linear(x, weight, linear.bias))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resetting the peak RSS needs Linux /proc")
def test_qlora_trains_in_less_memory_than_lora_on_124m_shapes():
    """Peak RSS of a few training steps after the model is built, one subprocess per method (helpers.memory).
    GPT-2 124M shapes: on tiny models the weights are too small for the difference to show."""
    from helpers.memory import training_peak_rss

    lora, qlora = (training_peak_rss(method, steps=1, seq_len=64) for method in ("lora", "qlora"))
    print(f"training peak RSS: LoRA {lora / 2**30:.2f} GiB, QLoRA {qlora / 2**30:.2f} GiB")
    assert qlora < lora - 100 * 2**20  # at least 100 MiB less
