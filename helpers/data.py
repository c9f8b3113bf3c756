"""Data stage: parse the SMS Spam Collection exactly, balance, label, split, tokenize, batch.

Notebook 02 teaches parsing, balancing and labels; notebook 03 the split, ``SpamDataset``, ``collate`` and
the loaders. Any tokenizer with ``encode(text) -> list[int]`` and ``pad_id`` works (``helpers.models``
provides GPT-2's and SmolLM2's); this module imports no model code.
"""
from __future__ import annotations

import copy
import csv
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from helpers.config import atomic_path, data_dir, file_lock
from helpers.download import download_sms_spam


# --- Parse, balance, label, split ---------------------------------------------------------------------

LABELS = {"ham": 0, "spam": 1}
LABEL_NAMES = tuple(sorted(LABELS, key=LABELS.get))  # index = class id: ("ham", "spam")
SPLIT_NAMES = ("train", "validation", "test")


def read_sms_spam(path: str | Path) -> pd.DataFrame:
    """Parse ``SMSSpamCollection`` exactly: one message per line, ``label<TAB>text``.

    ``quoting=csv.QUOTE_NONE`` matters: with pandas' default quoting a line that starts with ``"``
    opens a quoted field that swallows the following lines, and rows silently disappear.
    ``keep_default_na=False`` keeps messages such as "NA" as text.
    """
    df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE,
                     dtype=str, keep_default_na=False, encoding="utf-8")
    unknown = sorted(set(df["Label"]) - set(LABELS))
    if unknown:
        raise ValueError(f"{path}: unexpected labels {unknown}; is this the SMS Spam Collection file?")
    return df


def balance(df: pd.DataFrame, seed: int = 123) -> pd.DataFrame:
    """Undersample the majority class (ham) to the size of the minority class (spam)."""
    counts = df["Label"].value_counts()
    n = int(counts.min())
    parts = [df[df["Label"] == label].sample(n, random_state=seed) if count > n else df[df["Label"] == label]
             for label, count in sorted(counts.items(), key=lambda kv: str(kv[0]))]
    return pd.concat(parts).reset_index(drop=True)


def encode_labels(df: pd.DataFrame, labels: dict[str, int] = LABELS) -> pd.DataFrame:
    """Return a copy with ``Label`` mapped to class ids by ``labels`` (default ham -> 0, spam -> 1).

    Any label set works (``helpers.own_data.load_labelled`` returns one for your own file). Safe to run
    twice: ids that are already ids (``0``, ``"1"``) stay as they are.
    """
    names_to_ids = {**labels, **{v: v for v in labels.values()}, **{str(v): v for v in labels.values()}}
    mapped = df["Label"].map(lambda label: names_to_ids.get(label, -1))
    if (mapped < 0).any():
        bad = sorted(map(str, df.loc[mapped < 0, "Label"].unique()))
        raise ValueError(f"Unknown labels {bad}; expected one of {list(labels)} or {list(labels.values())}.")
    return df.assign(Label=mapped.astype("int64"))


def random_split(df: pd.DataFrame, train_frac: float = 0.7, validation_frac: float = 0.1,
                 seed: int = 123) -> dict[str, pd.DataFrame]:
    """Shuffle with a seed and cut into train / validation / test (the rest)."""
    shuffled = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    n_train = int(len(shuffled) * train_frac)
    n_val = int(len(shuffled) * validation_frac)
    cuts = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, len(shuffled))}
    return {name: shuffled.iloc[a:b].reset_index(drop=True) for name, (a, b) in cuts.items()}


def texts_also_in(df: pd.DataFrame, other: pd.DataFrame) -> pd.Series:
    """True for each row of ``df`` whose text also occurs in ``other`` (notebook 03: test texts seen in training)."""
    return df["Text"].isin(set(other["Text"]))


def splits_dir() -> Path:
    """Where the prepared train/validation/test CSVs live."""
    return data_dir() / "sms_spam"


def prepare_splits(seed: int = 123, folder: Path | None = None) -> dict[str, pd.DataFrame]:
    """Download (verified) -> parse -> balance -> label -> split -> save CSVs. Returns the splits.

    Each CSV is written atomically, and the three under one lock, so two runs at once never mix their files.
    """
    folder = folder or splits_dir()
    folder.mkdir(parents=True, exist_ok=True)
    df = encode_labels(balance(read_sms_spam(download_sms_spam()), seed=seed))
    splits = random_split(df, seed=seed)
    with file_lock(folder / "splits"):
        for name, part in splits.items():
            with atomic_path(folder / f"{name}.csv") as tmp:
                part.to_csv(tmp, index=False)
    return splits


def load_splits(folder: Path | None = None) -> dict[str, pd.DataFrame]:
    """The saved splits, preparing them first if any CSV is missing (so every notebook can start here)."""
    folder = folder or splits_dir()
    paths = {name: folder / f"{name}.csv" for name in SPLIT_NAMES}
    if not all(p.exists() for p in paths.values()):
        return prepare_splits(folder=folder)
    return {name: pd.read_csv(p, dtype={"Text": str}, keep_default_na=False) for name, p in paths.items()}


# --- Tokenize and batch ---------------------------------------------------------------------------------

class SpamDataset(Dataset):
    """Token ids and labels of a split. Texts longer than ``max_length`` are truncated.

    ``max_length`` defaults to the longest text, and is never beyond the model's context.
    Items are unpadded; ``collate`` pads each batch (see ``make_loader``). ``labels`` maps label names to
    class ids (default: ham/spam); it is kept as ``label_map`` so the names can go into the checkpoint.
    """

    def __init__(self, df: pd.DataFrame, tokenizer, max_length: int | None = None,
                 context_length: int = 1024, labels: dict[str, int] = LABELS) -> None:
        encoded = [tokenizer.encode(text) for text in df["Text"]]
        longest = max((len(ids) for ids in encoded), default=1)
        self.max_length = max(1, min(max_length or longest, context_length))
        self.encoded = [ids[: self.max_length] or [tokenizer.pad_id] for ids in encoded]
        self.labels = encode_labels(df, labels)["Label"].tolist()
        self.label_map = dict(labels)
        self.pad_id = tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.encoded[index], self.labels[index]


def collate(items: list[tuple[list[int], int]], pad_id: int, pad_to: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists with ``pad_id`` to the batch's longest (or to ``pad_to``).

    Returns ``(ids [B, T], lengths [B], labels [B])``; ``lengths`` says where each text really ends.
    """
    lengths = [len(ids) for ids, _ in items]
    width = max(lengths) if pad_to is None else pad_to
    if width < max(lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest text in the batch ({max(lengths)} tokens).")
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    for row, (tokens, _) in enumerate(items):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids, torch.tensor(lengths), torch.tensor([label for _, label in items])


def collate_packed(items: list[tuple[list[int], int | list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack a batch into ONE row, the texts one after another with no padding (notebook 07).

    Returns ``(ids [1, N], lengths [B], labels)`` with N = sum(lengths): ``labels`` [B] when each item has one
    label (classification), or [N] when each has one target per token (instruction tuning: the targets
    concatenated like the ids). ``helpers.models.base.Packing`` turns ``lengths`` into positions and the mask.
    """
    ids = torch.tensor([token for tokens, _ in items for token in tokens], dtype=torch.long)[None]
    lengths = torch.tensor([len(tokens) for tokens, _ in items])
    labels = [label for _, label in items]
    if all(isinstance(label, (list, tuple)) for label in labels):  # one target per token
        labels = [target for label in labels for target in label]
    return ids, lengths, torch.tensor(labels, dtype=torch.long)


def make_loader(dataset: SpamDataset, batch_size: int = 8, shuffle: bool = False, drop_last: bool = False,
                pad_to: int | None = None, seed: int = 123) -> DataLoader:
    """A DataLoader yielding ``(ids, lengths, labels)``; padded to each batch's longest text by default."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator,
                      collate_fn=lambda items: collate(items, dataset.pad_id, pad_to))


def tokenize_splits(splits: dict[str, pd.DataFrame], tokenizer, context_length: int = 1024,
                    labels: dict[str, int] = LABELS) -> dict[str, SpamDataset]:
    """A ``SpamDataset`` per split; validation and test are truncated to the longest *training* text.

    ``labels``: the label map (name -> id) of the data, ham/spam by default.
    """
    train = SpamDataset(splits["train"], tokenizer, context_length=context_length, labels=labels)
    return {"train": train, **{name: SpamDataset(df, tokenizer, max_length=train.max_length,
                                                 context_length=context_length, labels=labels)
                               for name, df in splits.items() if name != "train"}}


def pad_every_text(dataset: SpamDataset, pad_to: int) -> SpamDataset:
    """A copy of ``dataset`` in which every text is exactly ``pad_to`` tokens: cut, or right-padded with the
    pad token. The padding then becomes part of what the model reads, as with the reference implementation's
    fixed-length padding read at the last position (``scripts/experiments.py --padding fixed``)."""
    if pad_to < 1:
        raise ValueError(f"pad_to must be at least 1 token, got {pad_to}.")
    padded = copy.copy(dataset)
    padded.encoded = [ids[:pad_to] + [dataset.pad_id] * (pad_to - len(ids[:pad_to])) for ids in dataset.encoded]
    padded.max_length = pad_to
    return padded
