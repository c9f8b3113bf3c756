"""The training that ``tests/test_distributed.py`` runs under torchrun (2 gloo processes) and, for the reference,
in one process: a tiny causal transformer, its data, and a few steps through ``helpers.distributed``.

    torchrun --nproc_per_node=2 tests/ddp_worker.py OUT_DIR

Every process writes ``OUT_DIR/rank<r>.pt`` (its final weights, losses and gradients); rank 0 alone writes the
checkpoint ``OUT_DIR/checkpoint/model.pt`` and prints one ``step <i> loss <x>`` line per step.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from helpers.distributed import (
    DistContext, LossModule, classification_loss_sum, distributed, global_mean_loss, print_main, save_on_main,
    set_epoch, sharded_loader, token_loss_sum, unwrap, wrap_model,
)

VOCAB, DIM, CLASSES, SEQ = 32, 16, 3, 6
EXAMPLES, BATCH, EPOCHS = 20, 4, 2  # per process: 10 examples -> 2 steps of 4 per epoch (drop_last) -> 4 steps
FROZEN = ("tok_emb", "frozen")  # parameter-name prefixes that never train


class TinyModel(nn.Module):
    """Frozen embedding + frozen layer, one trainable causal transformer block, a classification head and a
    language-model head (each loss leaves the other head unused, as in the course).

    The block has no biases because an attention *key* bias has an exactly zero gradient (adding the same
    number to every score of a query leaves the softmax unchanged): what it gets is rounding noise (~1e-10),
    whose sign depends on the order of the sums, and AdamW turns any nonzero gradient into a step of about
    ``lr``. So two runs that sum in a different order (2 processes vs 1, or 1 vs 2 threads) disagree on that
    bias by ``lr`` per step, while every other weight agrees to 1e-7. SGD, or a model without it, shows the
    equality that the test is about.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, DIM)
        self.frozen = nn.Linear(DIM, DIM)
        self.block = nn.TransformerEncoderLayer(DIM, nhead=2, dim_feedforward=2 * DIM, dropout=0.0,
                                                batch_first=True, norm_first=True, bias=False)  # see below
        self.head = nn.Linear(DIM, CLASSES)
        self.lm_head = nn.Linear(DIM, VOCAB)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.frozen(self.tok_emb(ids)))  # [B, T, DIM]
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.block(x, src_mask=mask, is_causal=True)


def last_token_logits(model: TinyModel, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Class logits at each text's last real token: ``[B, CLASSES]``."""
    hidden = model.hidden(ids)
    return model.head(hidden[torch.arange(len(ids)), lengths - 1])


def token_logits(model: TinyModel, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Next-token logits at every position: ``[B, T, VOCAB]``."""
    return model.lm_head(model.hidden(ids))


def build_model(seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    model = TinyModel()
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(FROZEN)
    return model


def classification_data(seed: int = 1) -> TensorDataset:
    """``(ids, lengths, labels)`` rows; texts of 2..SEQ real tokens, right-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, SEQ + 1, (EXAMPLES,), generator=g)
    ids = torch.randint(1, VOCAB, (EXAMPLES, SEQ), generator=g) * (torch.arange(SEQ) < lengths[:, None])
    return TensorDataset(ids, lengths, torch.randint(0, CLASSES, (EXAMPLES,), generator=g))


def train(loader, context: DistContext) -> tuple[nn.Module, list[float]]:
    """EPOCHS epochs of AdamW on ``loader``; returns the (wrapped) step module and the logged global losses."""
    step = wrap_model(LossModule(build_model(), last_token_logits, classification_loss_sum), context)
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    losses = []
    for epoch in range(EPOCHS):
        set_epoch(loader, epoch)
        for batch in loader:
            optimizer.zero_grad()
            loss, mean = global_mean_loss(*step(*batch))
            loss.backward()
            optimizer.step()
            losses.append(mean)
            print_main(f"step {len(losses)} loss {mean:.6f}")
    return step, losses


# --- Loss normalisation: the processes hold different numbers of scored items ----------------------------

def normalisation_batches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One batch per process. ``classify``: 1 example vs 5. ``tokens``: 2 rows each, 2 vs 12 scored targets."""
    g = torch.Generator().manual_seed(2)
    if kind == "classify":
        ids = torch.randint(1, VOCAB, (6, SEQ), generator=g)
        lengths, labels = torch.randint(2, SEQ + 1, (6,), generator=g), torch.randint(0, CLASSES, (6,), generator=g)
        return [(ids[:1], lengths[:1], labels[:1]), (ids[1:], lengths[1:], labels[1:])]
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    targets = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    targets[:2, : SEQ - 1] = -100  # rows 0-1 (process 0): a long prompt, one response token each
    lengths = torch.full((4,), SEQ)
    return [(ids[:2], lengths[:2], targets[:2]), (ids[2:], lengths[2:], targets[2:])]


def loss_module(kind: str) -> LossModule:
    if kind == "classify":
        return LossModule(build_model(), last_token_logits, classification_loss_sum)
    return LossModule(build_model(), token_logits, token_loss_sum)


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in unwrap(module).named_parameters() if p.grad is not None}


def normalisation(kind: str, context: DistContext) -> dict:
    """Gradients of one backward with ``global_mean_loss`` and with the naive per-process mean."""
    step = wrap_model(loss_module(kind), context)
    batch = normalisation_batches(kind)[context.rank]
    loss_sum, count = step(*batch)
    loss, mean = global_mean_loss(loss_sum, count)
    loss.backward()
    result = {"count": int(count), "mean": mean, "global": grads(step)}
    step.zero_grad(set_to_none=True)
    loss_sum, count = step(*batch)
    (loss_sum / count).backward()
    result["naive"] = grads(step)
    return result


def bypass(context: DistContext) -> dict[str, torch.Tensor]:
    """Gradients when the forward calls the wrapped module's inner module directly (DDP never sees it)."""
    step = wrap_model(loss_module("classify"), context)
    loss_sum, count = step.module(*normalisation_batches("classify")[context.rank])
    (loss_sum / count).backward()
    return grads(step)


def main(out: Path) -> None:
    with distributed("cpu") as context:
        loader = sharded_loader(classification_data(), BATCH, seed=5)
        step, losses = train(loader, context)
        save_on_main(step, out / "checkpoint" / "model.pt")
        record = {"rank": context.rank, "world_size": context.world_size, "backend": context.backend,
                  "threads": torch.get_num_threads(), "state": unwrap(step).state_dict(), "losses": losses,
                  "normalisation": {kind: normalisation(kind, context) for kind in ("classify", "tokens")},
                  "bypass": bypass(context)}
        torch.save(record, out / f"rank{context.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
