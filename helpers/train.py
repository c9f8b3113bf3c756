"""Train stage: loss and accuracy at the classification position, the training loop, checkpoints.

Two ways to feed the model, with the same results (tests prove it within 1e-5):

* **tokens** — batches of token ids padded to the batch's longest text; every step runs the whole model.
* **cached** (the fast path) — when dropout is 0 and only the last ``k`` blocks train, the frozen part
  (embeddings + the first ``n - k`` blocks) gives the same output for a text at every step. So we compute it
  once per text (in length-sorted batches, so padding costs almost nothing), keep it in memory at each text's
  real length, and train the last blocks on it.

Either way the last block runs only at the classification position (``block.forward_last``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import SpamDataset, collate
from .model import last_token_logits, logits_from_hidden

Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, inputs, lengths) -> logits


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
    seconds: float = 0.0
    fast_path: bool = False


# --- Feeding the model ------------------------------------------------------------------------------

def frozen_prefix(model: nn.Module) -> int:
    """How many leading blocks (with the embeddings) are frozen and deterministic, i.e. cacheable.

    0 means no cache is possible: some embedding or early parameter trains, or dropout is active.
    """
    if any(m.p > 0 for m in model.modules() if isinstance(m, nn.Dropout)):
        return 0
    if any(p.requires_grad for p in model.tok_emb.parameters()) or any(
        p.requires_grad for name, p in model.named_parameters() if name.startswith("pos_emb")
    ):
        return 0
    n = 0
    for block in model.blocks[:-1]:  # the last block always runs (at one position)
        if any(p.requires_grad for p in block.parameters()):
            break
        n += 1
    return n


@torch.no_grad()
def cache_hidden(model: nn.Module, dataset: SpamDataset, n_blocks: int, batch_size: int = 32,
                 progress: bool = True) -> list[torch.Tensor]:
    """Output of embeddings + the first ``n_blocks`` blocks for every text, each ``[length, emb_dim]``.

    Texts are processed in length-sorted batches (little padding); results are stored unpadded, in the
    dataset's order, so training order and results are unaffected.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.encoded[i]))
    hidden: list[torch.Tensor | None] = [None] * len(dataset)
    for start in tqdm(range(0, len(order), batch_size), desc="caching frozen blocks", disable=not progress,
                      leave=False):
        chunk = order[start: start + batch_size]
        ids, lengths, _ = collate([dataset[i] for i in chunk], dataset.pad_id)
        x = model.embed(ids.to(device))
        for block in model.blocks[:n_blocks]:
            x = block(x)
        for row, i in enumerate(chunk):
            hidden[i] = x[row, : lengths[row]].cpu().clone()
    model.train(was_training)
    return hidden  # type: ignore[return-value]


class CachedDataset(Dataset):
    """Cached hidden states and labels, indexable like the ``SpamDataset`` they came from."""

    def __init__(self, hidden: list[torch.Tensor], labels: list[int]) -> None:
        self.hidden, self.labels = hidden, labels

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.hidden[index], self.labels[index]


def collate_hidden(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad cached hidden states with zeros (never seen by real tokens: the mask is causal)."""
    lengths = torch.tensor([h.shape[0] for h, _ in items])
    x = torch.zeros(len(items), int(lengths.max()), items[0][0].shape[1], dtype=items[0][0].dtype)
    for row, (h, _) in enumerate(items):
        x[row, : h.shape[0]] = h
    return x, lengths, torch.tensor([label for _, label in items])


@dataclass
class Batches:
    """A DataLoader plus the function that turns its inputs into logits."""

    loader: DataLoader
    forward: Forward
    cached: bool

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def make_batches(model: nn.Module, dataset: SpamDataset, *, batch_size: int = 8, shuffle: bool = False,
                 drop_last: bool = False, cache: bool = True, seed: int = 123, progress: bool = True) -> Batches:
    """Batches for ``model``: cached hidden states when possible (and ``cache``), else token ids.

    Shuffling uses a generator seeded with ``seed``, so both kinds visit texts in the same order.
    """
    generator = torch.Generator().manual_seed(seed)
    n_frozen = frozen_prefix(model) if cache else 0
    if n_frozen:
        source = CachedDataset(cache_hidden(model, dataset, n_frozen, progress=progress), dataset.labels)
        loader = DataLoader(source, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                            generator=generator, collate_fn=collate_hidden)
        return Batches(loader, partial(logits_from_hidden, first_block=n_frozen), cached=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator,
                        collate_fn=partial(collate, pad_id=dataset.pad_id))
    return Batches(loader, last_token_logits, cached=False)


def split_batches(model: nn.Module, datasets: dict[str, SpamDataset], batch_size: int = 8, cache: bool = True,
                  seed: int = 123) -> dict[str, Batches]:
    """``make_batches`` for every split: training shuffled with ``drop_last``, the others in order."""
    return {name: make_batches(model, ds, batch_size=batch_size, shuffle=name == "train", drop_last=name == "train",
                               cache=cache, seed=seed) for name, ds in datasets.items()}


def accuracies(model: nn.Module, batches: dict[str, Batches]) -> dict[str, float]:
    """Accuracy on the whole of each split."""
    return {name: calc_accuracy(model, split) for name, split in batches.items()}


# --- Loss, accuracy, training --------------------------------------------------------------------------

def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batch_loss(model: nn.Module, forward: Forward, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cross-entropy of one batch at the classification position."""
    inputs, lengths, labels = (t.to(_device(model)) for t in batch)
    return F.cross_entropy(forward(model, inputs, lengths), labels)


@torch.no_grad()
def calc_loss(model: nn.Module, batches: Batches, num_batches: int | None = None) -> float:
    """Mean loss over the first ``num_batches`` batches (all when None)."""
    losses = [batch_loss(model, batches.forward, batch).item()
              for _, batch in zip(range(num_batches or len(batches)), batches)]
    return sum(losses) / len(losses) if losses else float("nan")


@torch.no_grad()
def calc_accuracy(model: nn.Module, batches: Batches, num_batches: int | None = None) -> float:
    """Fraction of correct predictions over the first ``num_batches`` batches (all when None)."""
    correct = total = 0
    for _, (inputs, lengths, labels) in zip(range(num_batches or len(batches)), batches):
        device = _device(model)
        predictions = batches.forward(model, inputs.to(device), lengths.to(device)).argmax(dim=-1)
        correct += int((predictions == labels.to(device)).sum())
        total += len(labels)
    return correct / total if total else float("nan")


def evaluate(model: nn.Module, train: Batches, val: Batches, num_batches: int) -> tuple[float, float]:
    """Train and validation loss on a few batches, in eval mode."""
    model.eval()
    losses = calc_loss(model, train, num_batches), calc_loss(model, val, num_batches)
    model.train()
    return losses


def train_classifier(model: nn.Module, train: Batches, val: Batches, cfg: TrainConfig | None = None,
                     progress: bool = True) -> History:
    """Fine-tune the trainable parameters with AdamW; evaluate every ``cfg.eval_freq`` steps."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: call add_classifier_head (or apply_lora) first.")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = History(fast_path=train.cached)
    steps_per_epoch = min(len(train), cfg.max_steps_per_epoch or len(train))
    start = time.perf_counter()
    model.train()
    with tqdm(total=cfg.epochs * steps_per_epoch, desc="training", disable=not progress) as bar:
        for _ in range(cfg.epochs):
            for _, batch in zip(range(steps_per_epoch), train):
                optimizer.zero_grad()
                loss = batch_loss(model, train.forward, batch)
                loss.backward()
                optimizer.step()
                history.examples_seen += len(batch[2])
                history.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if history.steps % cfg.eval_freq == 0:
                    train_loss, val_loss = evaluate(model, train, val, cfg.eval_iter)
                    history.train_losses.append(train_loss)
                    history.val_losses.append(val_loss)
                    history.eval_examples_seen.append(history.examples_seen)
            model.eval()
            history.train_accs.append(calc_accuracy(model, train, cfg.eval_iter))
            history.val_accs.append(calc_accuracy(model, val, cfg.eval_iter))
            model.train()
            history.epochs += 1
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def history_dict(history: History) -> dict:
    """The history as plain JSON-able data."""
    return asdict(history)


# --- Checkpoints -------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "course-classifier-v1"


class CheckpointError(ValueError):
    """A classifier checkpoint is missing, unreadable or does not fit; the message says what to do."""


def save_classifier(model: nn.Module, path: str | Path, labels: dict[str, int] | None = None) -> Path:
    """Save weights + architecture + config + label map (tensors and plain values only), atomically."""
    from .data import LABELS

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "architecture": type(model).__name__,
        "config": asdict(model.cfg),
        "labels": dict(labels or LABELS),
        "num_classes": model.out_head.out_features,
        "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A saved classifier in eval mode, loaded with ``weights_only=True`` (no arbitrary code runs)."""
    from .model import add_classifier_head, build_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}. Train and save one first (notebook 05), or fix the path.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint ({type(exc).__name__}); "
                              "it is damaged or not a checkpoint: save it again.") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a course classifier checkpoint (expected format {CHECKPOINT_FORMAT}).")
    model = build_model(checkpoint["architecture"], checkpoint["config"])
    add_classifier_head(model, num_classes=checkpoint["num_classes"], trainable_blocks=0)
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the {checkpoint['architecture']} it describes: "
                              f"{str(exc).splitlines()[0]}") from exc
    model.labels = checkpoint["labels"]
    return model.to(device).eval()
