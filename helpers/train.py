"""Train stage: loss and accuracy at the classification position, and the training loop (notebook 05).

The batches come from ``helpers.fastpath`` (cached frozen blocks, or token ids): each ``Batches`` carries the
function that turns its inputs into logits, so the code here is the same for both. Accuracy is computed
here and only here (``calc_accuracy``; ``helpers.evaluate`` reuses it).

Devices: every batch is moved to the model's device; forward passes run under ``precision_for(device)``
(bf16 or fp16 autocast on CUDA GPUs, float32 elsewhere), and ``optimizer_step`` goes through a GradScaler,
which only acts under fp16. ``History.seconds`` is read after the device has finished (``clock``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from helpers.fastpath import Batches, Forward
from helpers.models.base import Precision, clock, model_device, packed_hidden, precision_for


@dataclass
class TrainConfig:
    """The classic recipe: AdamW, lr 5e-5, weight decay 0.1, 5 epochs, batch 8, evaluation every 50 steps."""

    epochs: int = 5
    lr: float = 5e-5
    weight_decay: float = 0.1
    batch_size: int = 8
    eval_freq: int = 50  # steps between evaluations
    eval_iter: int = 5  # batches per evaluation
    max_steps_per_epoch: int | None = None  # the smoke profile trains a few steps only
    seed: int = 123


@dataclass
class History:
    """What a training run measured."""

    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    train_accs: list[float] = field(default_factory=list)
    val_accs: list[float] = field(default_factory=list)
    eval_examples_seen: list[int] = field(default_factory=list)  # x-values of the losses
    examples_seen: int = 0
    steps: int = 0
    epochs: int = 0
    seconds: float = 0.0  # wall time of the whole loop, the device synchronised before each clock read
    fast_path: bool = False
    device: str = "cpu"
    precision: str = "fp32"  # fp32, or the autocast dtype: bf16 / fp16


# --- Loss, accuracy, training --------------------------------------------------------------------------

def batch_loss(model: nn.Module, forward: Forward, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cross-entropy of one batch at the classification position (the batch is moved to the model's device)."""
    inputs, lengths, labels = (t.to(model_device(model)) for t in batch)
    return F.cross_entropy(forward(model, inputs, lengths), labels)


def packed_next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, ...], ignore_index: int = -100
                           ) -> torch.Tensor:
    """Mean next-token cross-entropy of a packed batch ``(ids [1, N], lengths [B], targets [N])`` over the
    targets that are not ``ignore_index`` (instruction tuning: the response tokens; notebook 10).

    The blocks run on the packed row (``packed_hidden``: no padding computed); the output head, as wide as the
    vocabulary, runs only at the positions that have a target.
    """
    ids, lengths, targets = (t.to(model_device(model)) for t in batch)
    hidden = packed_hidden(model, ids, lengths)[0]  # [N, D]
    scored = targets != ignore_index  # [N]
    return F.cross_entropy(model.out_head(hidden[scored]), targets[scored])


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """``loss.backward()`` then ``optimizer.step()``, through ``scaler`` (``Precision.grad_scaler``).

    Under fp16 the scaler multiplies the loss before the backward pass, so that small gradients do not round to
    zero, divides the gradients back before the step, and skips a step whose gradients overflowed. Any other
    precision has a disabled scaler, and this is exactly backward + step. Call ``optimizer.zero_grad()`` first.
    """
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


@torch.no_grad()
def calc_loss(model: nn.Module, batches: Batches, num_batches: int | None = None,
              precision: Precision | None = None) -> float:
    """Mean loss over the first ``num_batches`` batches (all when None), under ``precision`` (default:
    ``precision_for`` the model's device)."""
    with (precision or precision_for(model_device(model))).autocast():
        losses = [batch_loss(model, batches.forward, batch).item()
                  for _, batch in zip(range(num_batches or len(batches)), batches)]
    return sum(losses) / len(losses) if losses else float("nan")


def accuracies(model: nn.Module, batches: dict[str, Batches], precision: Precision | None = None) -> dict[str, float]:
    """Accuracy on the whole of each split (notebooks 05-08 report these)."""
    return {name: calc_accuracy(model, split, precision=precision) for name, split in batches.items()}


@torch.no_grad()
def calc_accuracy(model: nn.Module, batches: Batches, num_batches: int | None = None,
                  precision: Precision | None = None) -> float:
    """Fraction of correct predictions over the first ``num_batches`` batches (all when None), under
    ``precision`` (default: ``precision_for`` the model's device)."""
    correct = total = 0
    device = model_device(model)
    precision = precision or precision_for(device)
    for _, (inputs, lengths, labels) in zip(range(num_batches or len(batches)), batches):
        with precision.autocast():
            predictions = batches.forward(model, inputs.to(device), lengths.to(device)).argmax(dim=-1)
        correct += int((predictions == labels.to(device)).sum())
        total += len(labels)
    return correct / total if total else float("nan")


def estimate_losses(model: nn.Module, train: Batches, val: Batches, num_batches: int,
                    precision: Precision | None = None) -> tuple[float, float]:
    """Train and validation loss on a few batches, in eval mode."""
    model.eval()
    losses = calc_loss(model, train, num_batches, precision), calc_loss(model, val, num_batches, precision)
    model.train()
    return losses


def record_losses(history: History, model: nn.Module, train: Batches, val: Batches, cfg: TrainConfig,
                  precision: Precision | None = None) -> None:
    """Append the train / validation loss on ``cfg.eval_iter`` batches, at ``history.examples_seen``."""
    train_loss, val_loss = estimate_losses(model, train, val, cfg.eval_iter, precision)
    history.train_losses.append(train_loss)
    history.val_losses.append(val_loss)
    history.eval_examples_seen.append(history.examples_seen)


def record_epoch(history: History, model: nn.Module, train: Batches, val: Batches, cfg: TrainConfig,
                 precision: Precision | None = None) -> None:
    """At the end of an epoch: append the train / validation accuracy on ``cfg.eval_iter`` batches, count it."""
    model.eval()
    history.train_accs.append(calc_accuracy(model, train, cfg.eval_iter, precision))
    history.val_accs.append(calc_accuracy(model, val, cfg.eval_iter, precision))
    model.train()
    history.epochs += 1


def train_classifier(model: nn.Module, train: Batches, val: Batches, cfg: TrainConfig | None = None,
                     progress: bool = True, precision: Precision | None = None) -> History:
    """Fine-tune the trainable parameters with AdamW; evaluate every ``cfg.eval_freq`` steps.

    Runs on the model's device; ``precision`` (training and the evaluations on the way) defaults to
    ``precision_for`` that device.
    """
    cfg = cfg or TrainConfig()
    device = model_device(model)
    precision = precision or precision_for(device)
    scaler = precision.grad_scaler()
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: call add_classifier_head (or apply_lora) first.")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = History(fast_path=train.cached, device=str(device), precision=precision.name)
    steps_per_epoch = min(len(train), cfg.max_steps_per_epoch or len(train))
    start = clock(device)
    model.train()
    with tqdm(total=cfg.epochs * steps_per_epoch, desc="training", disable=not progress) as bar:
        for _ in range(cfg.epochs):
            for _, batch in zip(range(steps_per_epoch), train):
                optimizer.zero_grad()
                with precision.autocast():
                    loss = batch_loss(model, train.forward, batch)
                optimizer_step(loss, optimizer, scaler)
                history.examples_seen += len(batch[2])
                history.steps += 1
                bar.update(1)
                if progress and history.steps % 10 == 1:  # .item() waits for the GPU: not at every step
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                if history.steps % cfg.eval_freq == 0:
                    record_losses(history, model, train, val, cfg, precision)
            record_epoch(history, model, train, val, cfg, precision)
    model.eval()
    history.seconds = clock(device) - start
    return history


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters, to start training again from the same point (notebooks 05, 08)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a ``trainable_state`` back into the model (in place: cached batches stay valid)."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)


def history_dict(history: History) -> dict:
    """The history as plain JSON-able data."""
    return asdict(history)
