"""The checks that every way of feeding a model (frozen-block cache or not, packed or padded batches) gives the
logits, loss and gradients of the plain right-padded token batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from helpers.data import SpamDataset, collate, collate_packed
from helpers.fastpath import frozen_prefix, make_batches
from helpers.lora import apply_lora, lora_layers
from helpers.models.base import add_classifier_head, last_token_logits, packed_last_token_logits


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_paths_agree(model: nn.Module, dataset: SpamDataset, atol: float, rtol: float = 0.0,
                       batch_size: int = 4) -> None:
    """Packed token batches, and (when the model allows a cache) cached batches padded and packed, against
    right-padded token batches: equal lengths and labels; logits, loss and every gradient within
    ``atol + rtol * max|reference|`` (a relative part for models with huge activations)."""
    def batches(cache: bool, pack: bool):
        return make_batches(model, dataset, batch_size=batch_size, cache=cache, pack=pack, progress=False)

    reference = batches(cache=False, pack=False)
    variants = [batches(cache=False, pack=True)]
    if frozen_prefix(model):
        variants += [batches(cache=True, pack=False), batches(cache=True, pack=True)]
        assert all(v.cached for v in variants[1:])
    assert not reference.cached and all(v.packed for v in variants[::2]) and not reference.packed

    def close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        limit = atol + rtol * float(expected.abs().max())
        error = float((got - expected).abs().max())
        assert error <= limit, f"{what}: max error {error:.3g} > {limit:.3g}"

    def outputs(batches, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        logits = batches.forward(model, batch[0], batch[1])
        loss = F.cross_entropy(logits, batch[2])
        loss.backward()
        return logits.detach(), loss.detach(), _grads(model)

    for batch_r, *batch_vs in zip(reference, *variants, strict=True):
        logits_r, loss_r, grads_r = outputs(reference, batch_r)
        for variant, batch_v in zip(variants, batch_vs):
            kind = f"cached={variant.cached}, packed={variant.packed}"
            assert torch.equal(batch_r[1], batch_v[1]) and torch.equal(batch_r[2], batch_v[2])
            logits_v, loss_v, grads_v = outputs(variant, batch_v)
            close(logits_v, logits_r, f"logits ({kind})")
            close(loss_v, loss_r, f"loss ({kind})")
            for name, g in grads_v.items():
                close(g, grads_r[name], f"gradient of {name} ({kind})")


def lora_classifier(model: nn.Module) -> nn.Module:
    """LoRA on every block with B moved away from zero (so A gets a gradient too) and the 2-class head."""
    model = apply_lora(add_classifier_head(model, trainable_blocks=0), rank=4, alpha=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.B.normal_(0, 0.1, generator=generator)
    return model


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within 1e-5 x max(1, the largest reference value): SmolLM2's residual stream reaches ~2.4e4."""
    limit = 1e-5 * max(1.0, float(expected.abs().max()))
    error = float((got - expected).abs().max())
    assert error <= limit, f"{what}: max error {error:.3g} > {limit:.3g}"


def assert_packed_equals_padded(model: nn.Module, texts: list[list[int]], pad_id: int = 0) -> None:
    """Last-token logits, loss and the gradient of every trainable parameter: packed row vs right-padded batch."""
    items = [(text, i % 2) for i, text in enumerate(texts)]
    results = {}
    for name, (ids, lengths, labels), forward in (("padded", collate(items, pad_id), last_token_logits),
                                                  ("packed", collate_packed(items), packed_last_token_logits)):
        model.zero_grad()
        logits = forward(model, ids, lengths)
        F.cross_entropy(logits, labels).backward()
        results[name] = logits.detach(), _grads(model)
    (logits_pad, grads_pad), (logits_pack, grads_pack) = results["padded"], results["packed"]
    assert_close(logits_pack, logits_pad, "logits")
    assert grads_pad and grads_pack.keys() == grads_pad.keys()
    assert any(n.endswith(".A") for n in grads_pad) and "out_head.weight" in grads_pad
    for name, grad in grads_pad.items():
        assert grad.abs().max() > 0, f"{name} got no gradient: the comparison would prove nothing"
        assert_close(grads_pack[name], grad, f"gradient of {name}")
