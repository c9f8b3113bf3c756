"""The check that the cached fast path and the plain token path give the same logits, loss and gradients."""
from __future__ import annotations

import torch
from torch import nn

from helpers.data import SpamDataset
from helpers.fastpath import make_batches
from helpers.train import batch_loss


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_paths_agree(model: nn.Module, dataset: SpamDataset, atol: float, rtol: float = 0.0,
                       batch_size: int = 4) -> None:
    """Cached vs token batches: equal lengths and labels; logits, loss and every gradient within
    ``atol + rtol * max|reference|`` (a relative part for models with huge activations)."""
    token = make_batches(model, dataset, batch_size=batch_size, cache=False, progress=False)
    cached = make_batches(model, dataset, batch_size=batch_size, cache=True, progress=False)
    assert cached.cached and not token.cached

    def close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        limit = atol + rtol * float(expected.abs().max())
        error = float((got - expected).abs().max())
        assert error <= limit, f"{what}: max error {error:.3g} > {limit:.3g}"

    for batch_t, batch_c in zip(token, cached, strict=True):
        assert torch.equal(batch_t[1], batch_c[1]) and torch.equal(batch_t[2], batch_c[2])
        with torch.no_grad():
            close(cached.forward(model, batch_c[0], batch_c[1]), token.forward(model, batch_t[0], batch_t[1]), "logits")
        model.zero_grad()
        loss_t = batch_loss(model, token.forward, batch_t)
        loss_t.backward()
        grads_t = _grads(model)
        model.zero_grad()
        loss_c = batch_loss(model, cached.forward, batch_c)
        loss_c.backward()
        close(loss_c.detach(), loss_t.detach(), "loss")
        for name, g in _grads(model).items():
            close(g, grads_t[name], f"gradient of {name}")
