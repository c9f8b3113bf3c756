"""The fast path: compute the frozen part of the model once per text, then train on its output (notebook 05).

Two ways to feed the model, with the same results (tests prove it within 1e-5):

* **tokens** — batches of token ids; every step runs the whole model (e.g. LoRA, which trains every block).
* **cached** — when dropout is 0 and only the last ``k`` blocks train, the frozen part (embeddings + the first
  ``n - k`` blocks) gives the same output for a text at every step. So we compute it once per text (in
  length-sorted batches, so padding costs almost nothing), keep it in memory at each text's real length,
  and train the last blocks on it.

Either way each batch is **packed** by default (notebook 07): its texts go one after another into one row, with
positions restarting at every text and a block-diagonal causal mask, so no padding is computed
(``pack=False``: right-padded to the batch's longest text). And the last block runs only at the classification
position (``block.forward_last``).

A cache is only right while the frozen part stays as it was: ``make_batches`` records which parameters it
assumed frozen (and their version counters), and every use of the cached batches checks that record, so a
block unfrozen later, or a frozen weight changed later, raises ``StaleCacheError`` instead of training on
stale activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from helpers.data import SpamDataset, collate, collate_packed
from helpers.models.base import (
    last_token_logits, logits_from_hidden, model_device, packed_last_token_logits, packed_logits_from_hidden,
    evaluating, run_blocks,
)

Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, inputs, lengths) -> logits [B, C]
_AFTER_BLOCKS = ("blocks.", "final_norm.", "out_head.")


class StaleCacheError(RuntimeError):
    """The model changed in a way that makes cached frozen-block outputs wrong; rebuild the batches."""


def prefix_parameters(model: nn.Module, n_blocks: int) -> dict[str, nn.Parameter]:
    """The parameters that produce the input of block ``n_blocks``: the embeddings and blocks 0..n_blocks-1."""
    cached_blocks = tuple(f"blocks.{i}." for i in range(n_blocks))
    return {name: p for name, p in model.named_parameters()
            if not name.startswith(_AFTER_BLOCKS) or name.startswith(cached_blocks)}


def frozen_prefix(model: nn.Module) -> int:
    """How many leading blocks (with the embeddings) are frozen and deterministic, i.e. cacheable.

    0 means no cache is possible: some embedding or early parameter trains, or dropout is active.
    """
    if any(m.p > 0 for m in model.modules() if isinstance(m, nn.Dropout)):
        return 0
    if any(p.requires_grad for p in prefix_parameters(model, 0).values()):
        return 0
    n = 0
    for block in model.blocks[:-1]:  # the last block always runs (at one position)
        if any(p.requires_grad for p in block.parameters()):
            break
        n += 1
    return n


@dataclass(frozen=True)
class CacheRecord:
    """What a cache assumed: the first block that runs on it, and each frozen parameter with its version.

    ``tensor._version`` counts in-place changes (an optimizer step, ``copy_``, ``load_state_dict``).
    """

    first_block: int
    frozen: tuple[tuple[str, nn.Parameter, int], ...]

    @classmethod
    def of(cls, model: nn.Module, first_block: int) -> "CacheRecord":
        params = prefix_parameters(model, first_block)
        return cls(first_block, tuple((name, p, p._version) for name, p in params.items()))

    def check(self, model: nn.Module, rebuild: str = "Call make_batches (or split_batches) again after changing "
                                                     "the model.") -> None:
        """Raise ``StaleCacheError`` unless every cached parameter is still the same, frozen and unchanged;
        ``rebuild`` says how to make the cache again."""
        current = prefix_parameters(model, self.first_block)
        for name, p, version in self.frozen:
            if current.get(name) is not p:
                raise StaleCacheError(f"{name} is not the parameter the cached batches were computed with "
                                      f"(another model, or the layer was replaced). {rebuild}")
            if p.requires_grad:
                raise StaleCacheError(f"{name} was unfrozen after the batches cached the first {self.first_block} "
                                      f"blocks: it would get no gradient. {rebuild}")
            if p._version != version:
                raise StaleCacheError(f"{name} changed after the batches cached the first {self.first_block} "
                                      f"blocks: the cached activations are stale. {rebuild}")


@dataclass(frozen=True)
class CachedForward:
    """``logits_from_hidden`` (or its packed twin) from block ``record.first_block`` on, after checking the
    cache still holds."""

    record: CacheRecord
    packed: bool = False

    def __call__(self, model: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.record.check(model)
        forward = packed_logits_from_hidden if self.packed else logits_from_hidden
        return forward(model, x, lengths, first_block=self.record.first_block)


#: Cached activations may fill at most this fraction of a CUDA GPU's free memory; beyond it they stay in CPU memory.
CACHE_GPU_FRACTION = 0.5


def cache_device(device: torch.device, nbytes: int) -> torch.device:
    """Where a cache of ``nbytes`` lives for a model on ``device``: on the model's device (no copy per step;
    GPT-2 124M's cache of the SMS splits is about 140 MB), except on a CUDA GPU where it would take more than
    ``CACHE_GPU_FRACTION`` of the free memory: then in CPU memory, copied to the GPU batch by batch."""
    if device.type == "cuda" and nbytes > CACHE_GPU_FRACTION * torch.cuda.mem_get_info(device)[0]:
        return torch.device("cpu")
    return device


@torch.no_grad()
def cache_hidden(model: nn.Module, dataset: SpamDataset, n_blocks: int, batch_size: int = 32,
                 progress: bool = True) -> list[torch.Tensor]:
    """Output of embeddings + the first ``n_blocks`` blocks for every text, each ``[length, emb_dim]``.

    Texts are processed in length-sorted batches (little padding) on the model's device, in float32 even where
    training uses autocast: the cache is computed once, and its rounding would stay in every epoch. Results are
    stored unpadded (on ``cache_device``), in the dataset's order, so training order and results are unaffected.
    """
    device = model_device(model)
    reference = model.tok_emb.weight
    store = cache_device(device, sum(map(len, dataset.encoded)) * model.cfg.emb_dim * reference.element_size())
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.encoded[i]))
    hidden: list[torch.Tensor | None] = [None] * len(dataset)
    with evaluating(model):
        for start in tqdm(range(0, len(order), batch_size), desc="caching frozen blocks", disable=not progress,
                          leave=False):
            chunk = order[start: start + batch_size]
            ids, lengths, _ = collate([dataset[i] for i in chunk], dataset.pad_id)
            x = run_blocks(model, ids.to(device), 0, n_blocks)  # [b, T, D]
            for row, i in enumerate(chunk):
                hidden[i] = x[row, : lengths[row]].to(store, copy=True)  # [length, D], a copy: not a view of x
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
    """Right-pad cached hidden states with zeros (never seen by real tokens: the mask is causal).

    Returns ``(x [B, T, D], lengths [B], labels [B])``.
    """
    lengths = torch.tensor([h.shape[0] for h, _ in items])
    first = items[0][0]
    x = torch.zeros(len(items), int(lengths.max()), first.shape[1], dtype=first.dtype, device=first.device)
    for row, (h, _) in enumerate(items):
        x[row, : h.shape[0]] = h
    return x, lengths, torch.tensor([label for _, label in items])


def collate_hidden_packed(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached hidden states one after another in one row: ``(x [1, N, D], lengths [B], labels [B])``."""
    return (torch.cat([h for h, _ in items])[None], torch.tensor([h.shape[0] for h, _ in items]),
            torch.tensor([label for _, label in items]))


@dataclass
class Batches:
    """A DataLoader plus the function that turns its inputs into logits."""

    loader: DataLoader
    forward: Forward
    cached: bool
    packed: bool = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def make_batches(model: nn.Module, dataset: SpamDataset, *, batch_size: int = 8, shuffle: bool = False,
                 drop_last: bool = False, cache: bool = True, pack: bool = True, seed: int = 123,
                 progress: bool = True) -> Batches:
    """Batches for ``model``: cached hidden states when possible (and ``cache``), else token ids; each batch
    packed into one row (``pack``) or right-padded to its longest text.

    Shuffling uses a generator seeded with ``seed``, so every kind visits texts in the same order.
    Build them after choosing what trains (``add_classifier_head``): the cache relies on it.
    """
    generator = torch.Generator().manual_seed(seed)
    n_frozen = frozen_prefix(model) if cache else 0
    if n_frozen:
        record = CacheRecord.of(model, n_frozen)
        source = CachedDataset(cache_hidden(model, dataset, n_frozen, progress=progress), dataset.labels)
        collate_fn, forward = (collate_hidden_packed if pack else collate_hidden), CachedForward(record, pack)
    else:
        source = dataset
        collate_fn = collate_packed if pack else partial(collate, pad_id=dataset.pad_id)
        forward = packed_last_token_logits if pack else last_token_logits
    loader = DataLoader(source, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator,
                        collate_fn=collate_fn)
    return Batches(loader, forward, cached=bool(n_frozen), packed=pack)


def split_batches(model: nn.Module, datasets: dict[str, SpamDataset], batch_size: int = 8, cache: bool = True,
                  seed: int = 123, pack: bool = True, progress: bool = True) -> dict[str, Batches]:
    """``make_batches`` for every split: training shuffled with ``drop_last``, the others in order."""
    return {name: make_batches(model, ds, batch_size=batch_size, shuffle=name == "train", drop_last=name == "train",
                               cache=cache, pack=pack, seed=seed, progress=progress) for name, ds in datasets.items()}


# --- Reading at another position (scripts/experiments.py; notebook 09) -------------------------------------

READ_POSITIONS = ("last-real-token", "first", "last-position")


def read_lengths(position: str, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The ``lengths`` that make a forward function (which reads at ``lengths - 1``) read at ``position``:

    * ``last-real-token`` — each text's last real token (the course's recipe): ``lengths`` unchanged;
    * ``first`` — position 0 for every row. With a causal mask it has seen only the first token;
    * ``last-position`` — the last column of the padded batch, ``width - 1``: after the padding when a text is
      shorter than the batch (the reference implementation's reading, with every text padded to one length).
    """
    if position == "last-real-token":
        return lengths
    if position == "first":
        return torch.ones_like(lengths)
    if position == "last-position":
        return torch.full_like(lengths, width)
    raise ValueError(f"position must be one of {READ_POSITIONS}, got {position!r}")


@dataclass(frozen=True)
class ReadAt:
    """A ``Forward`` that reads at ``position`` instead of the last real token (token ids or cached batches)."""

    forward: Forward
    position: str
    cached: bool = False

    def __call__(self, model: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.position == "last-position" and self.cached and bool((lengths != inputs.shape[1]).any()):
            raise ValueError("last-position on cached batches needs every text padded to one length "
                             "(helpers.data.pad_every_text): the cache pads with zeros, not with pad tokens.")
        return self.forward(model, inputs, read_lengths(self.position, lengths, inputs.shape[1]))


def read_at(batches: Batches, position: str) -> Batches:
    """The same batches, read at ``position`` (one of ``READ_POSITIONS``) by the model."""
    read_lengths(position, torch.ones(1, dtype=torch.long), 1)  # an unknown position fails here, not mid-training
    if batches.packed and position != "last-real-token":
        raise ValueError(f"reading at {position!r} needs padded batches: build them with pack=False "
                         "(a packed batch has no first token or last position per text).")
    return Batches(batches.loader, ReadAt(batches.forward, position, batches.cached), batches.cached, batches.packed)


def rebatch(batches: Batches, indices: Sequence[int] | None = None, *, shuffle: bool = False,
            drop_last: bool = False, seed: int = 123) -> Batches:
    """New batches over the same inputs (nothing is recomputed), all of them or those at ``indices``, in a
    freshly seeded order: the same steps again (notebook 05), cross-validation folds (notebook 08)."""
    source = batches.loader.dataset if indices is None else Subset(batches.loader.dataset, list(indices))
    loader = DataLoader(source, batch_size=batches.loader.batch_size, shuffle=shuffle, drop_last=drop_last,
                        generator=torch.Generator().manual_seed(seed), collate_fn=batches.loader.collate_fn)
    return Batches(loader, batches.forward, batches.cached, batches.packed)
