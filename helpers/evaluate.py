"""Evaluate stage: predictions, confusion matrix, precision/recall/F1, plots, a baseline, ``classify``.

Notebook 05 draws the training curves (``plot_history``); notebook 06 teaches the rest. Accuracy itself is
``helpers.train.calc_accuracy`` (one definition for the whole course).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from helpers.data import LABEL_NAMES, LABELS, SpamDataset
from helpers.fastpath import Batches
from helpers.models.base import last_token_logits, model_device, precision_for


# --- Predictions and metrics ---------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, batches: Batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(predicted class, true label, spam probability)`` for every example, in order (no shuffling).

    Runs on the model's device under ``precision_for`` it; the results come back to the CPU.
    """
    model.eval()
    device = model_device(model)
    preds, labels, probs = [], [], []
    for inputs, lengths, batch_labels in batches:
        with precision_for(device).autocast():
            logits = batches.forward(model, inputs.to(device), lengths.to(device)).float()
        preds.append(logits.argmax(-1).cpu())
        probs.append(torch.softmax(logits, -1)[:, 1].cpu())
        labels.append(batch_labels)
    return torch.cat(preds), torch.cat(labels), torch.cat(probs)


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """Counts ``[true class, predicted class]``."""
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for truth, pred in zip(labels.tolist(), preds.tolist()):
        matrix[truth, pred] += 1
    return matrix


def precision_recall_f1(matrix: torch.Tensor, positive: int = 1) -> dict[str, float]:
    """Precision, recall and F1 of the ``positive`` class (spam), plus accuracy; any number of classes
    (``per_class_scores`` gives every class's)."""
    tp = int(matrix[positive, positive])
    fp = int(matrix[:, positive].sum()) - tp
    fn = int(matrix[positive, :].sum()) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = int(matrix.diag().sum()) / int(matrix.sum()) if int(matrix.sum()) else 0.0
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}


def confusion_frame(matrix: torch.Tensor, names: Sequence[str] = LABEL_NAMES) -> pd.DataFrame:
    """The confusion matrix as a table: a row per true class, a column per predicted class, any number of classes."""
    return pd.DataFrame(matrix.numpy(), index=[f"true {n}" for n in names], columns=[f"predicted {n}" for n in names])


def per_class_scores(matrix: torch.Tensor, names: Sequence[str] = LABEL_NAMES) -> pd.DataFrame:
    """Precision, recall, F1 and support (true examples) of every class, each in turn the "positive" one, and
    their macro average: the plain mean over classes, so a small class counts as much as a large one."""
    if len(names) != matrix.shape[0]:
        raise ValueError(f"{len(names)} names {list(names)} for a {matrix.shape[0]}-class confusion matrix")
    rows = {name: {**precision_recall_f1(matrix, positive=c), "support": int(matrix[c].sum())}
            for c, name in enumerate(names)}
    table = pd.DataFrame.from_dict(rows, orient="index")[["precision", "recall", "f1", "support"]]
    macro = table[["precision", "recall", "f1"]].mean()
    table.loc["macro average"] = [macro["precision"], macro["recall"], macro["f1"], int(matrix.sum())]
    return table.astype({"support": "int64"})


def misclassified(df: pd.DataFrame, preds: torch.Tensor, probs: torch.Tensor) -> pd.DataFrame:
    """The rows of ``df`` the model got wrong, with its prediction and spam probability."""
    table = df.assign(predicted=[LABEL_NAMES[p] for p in preds.tolist()], spam_probability=probs.numpy().round(3),
                      actual=[LABEL_NAMES[int(label)] for label in df["Label"]])
    return table.loc[table["predicted"] != table["actual"], ["Text", "actual", "predicted", "spam_probability"]]


def accuracy_summary(preds: torch.Tensor, labels: torch.Tensor, seen_in_training: Sequence[bool]) -> dict[str, float]:
    """Accuracy with its binomial standard error, and the accuracy without the texts that also occur in the
    training split (``helpers.data.texts_also_in``). Notebook 05 computes the same in its cell.

    Returns ``{"accuracy", "standard_error", "n", "accuracy_unseen", "n_unseen"}``.
    """
    right = (preds.cpu() == labels.cpu()).double()
    unseen = ~torch.as_tensor(list(seen_in_training), dtype=torch.bool)
    if unseen.shape != right.shape:
        raise ValueError(f"seen_in_training has {len(unseen)} entries for {len(right)} predictions")
    accuracy = right.mean().item()
    return {"accuracy": accuracy, "standard_error": (accuracy * (1 - accuracy) / len(right)) ** 0.5,
            "n": len(right), "accuracy_unseen": right[unseen].mean().item(), "n_unseen": int(unseen.sum())}


# --- Plots ---------------------------------------------------------------------------------------------

def plot_values(epochs_seen: torch.Tensor, examples_seen: torch.Tensor, train_values: list[float],
                val_values: list[float], label: str = "loss", path: Path | None = None) -> plt.Figure:
    """Training vs validation ``label`` against epochs, with an "examples seen" axis on top."""
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, label=f"training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"validation {label}")
    ax1.set_xlabel("epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()  # same curve against examples seen, drawn invisibly to align the top axis
    ax2.plot(examples_seen, train_values, alpha=0)
    ax2.set_xlabel("examples seen")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_history(history, prefix: str, folder: Path) -> tuple[plt.Figure, plt.Figure | None]:
    """Loss and accuracy curves of a ``train.History``, saved as ``{prefix}-loss.png`` / ``-accuracy.png``
    (no accuracy figure, None, for a history without accuracies: instruction tuning)."""
    n_losses = len(history.train_losses)
    epochs_loss = torch.linspace(0, history.epochs, n_losses + 1)[1:] if n_losses else torch.tensor([])
    loss_fig = plot_values(epochs_loss, torch.tensor(history.eval_examples_seen, dtype=torch.float),
                           history.train_losses, history.val_losses, "loss", folder / f"{prefix}-loss.png")
    n_accs = len(history.train_accs)
    if not n_accs:
        return loss_fig, None
    epochs_acc = torch.linspace(0, history.epochs, n_accs + 1)[1:]
    examples_acc = torch.linspace(0, history.examples_seen, n_accs + 1)[1:]
    acc_fig = plot_values(epochs_acc, examples_acc, history.train_accs, history.val_accs, "accuracy",
                          folder / f"{prefix}-accuracy.png")
    return loss_fig, acc_fig


# --- A baseline to beat ----------------------------------------------------------------------------------

class BagOfTokens(nn.Module):
    """Logistic regression on token frequencies: one learned weight pair per token seen in training."""

    def __init__(self, vocabulary: list[int], num_classes: int = 2) -> None:
        super().__init__()
        self.column = {token: i for i, token in enumerate(vocabulary)}
        self.linear = nn.Linear(len(vocabulary), num_classes)
        nn.init.zeros_(self.linear.weight)

    def features(self, token_lists: list[list[int]]) -> torch.Tensor:
        """Each text as the fraction of its tokens that are each known token (unseen tokens are ignored)."""
        x = torch.zeros(len(token_lists), len(self.column))
        for row, ids in enumerate(token_lists):
            for token in ids:
                if token in self.column:
                    x[row, self.column[token]] += 1.0 / len(ids)
        return x

    def forward(self, token_lists: list[list[int]]) -> torch.Tensor:
        return self.linear(self.features(token_lists))


def train_bag_of_tokens(train: SpamDataset, epochs: int = 300, lr: float = 0.5, weight_decay: float = 1e-4,
                        seed: int = 123) -> BagOfTokens:
    """Fit the baseline on the training split (full-batch Adam)."""
    torch.manual_seed(seed)
    model = BagOfTokens(sorted({token for ids in train.encoded for token in ids}))
    x, labels = model.features(train.encoded), torch.tensor(train.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(model.linear(x), labels).backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def bag_of_tokens_accuracy(model: BagOfTokens, dataset: SpamDataset) -> float:
    """Accuracy of the baseline on a split."""
    preds = model(dataset.encoded).argmax(-1)
    return float((preds == torch.tensor(dataset.labels)).float().mean())


# --- Use the classifier ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    label: str
    spam_probability: float  # probability of class 1 (``spam`` in the course's labels)
    tokens_used: int
    truncated: bool
    probabilities: dict[str, float] = field(default_factory=dict)  # every label's probability


def label_names(model: nn.Module) -> tuple[str, ...]:
    """The class names of a classifier, by class id: those stored in its checkpoint, else ``("ham", "spam")``."""
    labels = getattr(model, "labels", None) or LABELS
    return tuple(sorted(labels, key=labels.get))


def classify_max_length(model: nn.Module, max_length: int | None = None) -> int:
    """How many tokens ``classify`` reads: ``max_length``, else the length the classifier was trained with
    (stored in its checkpoint), else the model's context; never more than the context."""
    if max_length is None:
        max_length = getattr(model, "max_length", None) or model.cfg.context_length
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a whole number of tokens >= 1, got {max_length!r}; "
                         "leave it out to use the length the classifier was trained with.")
    return min(max_length, model.cfg.context_length)


@torch.no_grad()
def classify(model: nn.Module, text: str, max_length: int | None = None) -> Prediction:
    """Label one text with the classifier's label names and probabilities, read at its last real token.

    Texts longer than ``max_length`` (default: the length the classifier was trained with, see
    ``classify_max_length``) keep their first tokens. An empty text is read as a single end-of-text token.
    Text the tokenizer cannot take (a lone surrogate; for SmolLM2 also control characters such as ``\x04``)
    raises ``ValueError`` saying which character; tabs and line breaks are fine. Runs on the model's device.
    """
    if not isinstance(text, str):
        raise TypeError(f"classify expects a string, got {type(text).__name__}")
    limit = classify_max_length(model, max_length)
    names = label_names(model)
    ids = model.tokenizer.encode(text) or [model.tokenizer.pad_id]
    truncated = len(ids) > limit
    ids = ids[:limit]
    device = model_device(model)
    model.eval()
    with precision_for(device).autocast():
        logits = last_token_logits(model, torch.tensor([ids]).to(device), torch.tensor([len(ids)]).to(device))
    probs = torch.softmax(logits[0].float(), -1)  # [C]
    if len(names) != len(probs):
        raise ValueError(f"the classifier has {len(probs)} classes but {len(names)} label names {names}")
    return Prediction(names[int(probs.argmax())], float(probs[1]), len(ids), truncated,
                      {name: float(p) for name, p in zip(names, probs)})
