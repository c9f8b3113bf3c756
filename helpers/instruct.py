"""Instruction fine-tuning: the model side (notebooks 10 and 11).

The data side (prompt formats, -100 targets, length-grouped batches, metrics) is ``helpers.instruct_data``.
Here, what a model does with it:

* ``load_instruct_model`` / ``prompt_format``: SmolLM2-135M-Instruct in its chat format (ChatML), whatever
  ``COURSE_MODEL`` says; ``COURSE_INSTRUCT_MODEL=gpt2`` (or a GPT-2 folder) selects GPT-2 with the book's
  Alpaca prompt instead (notebook 10's exercise);
* ``forward_targets``: the next-token logits at the *target* positions only (targets != -100). The
  49,152-way output head is the most expensive layer of SmolLM2 per position, and the prompt's positions
  have no target, so computing it everywhere would waste most of the work (notebook 10, "the loss");
* ``train_top_blocks`` / ``lora_top_blocks``: what trains: the top ``k`` blocks (and the final norm), or
  LoRA adapters in them. The token embedding, tied to the output head, stays frozen: training it would change
  the inputs the frozen-prefix cache holds;
* ``make_instruct_batches``: length-grouped batches of token ids, or, when the first ``n - k`` blocks are
  frozen, their output computed once per example at every position (``cache_inputs``), guarded against later
  changes by ``helpers.fastpath``'s ``CacheRecord``;
* ``train_instruct``: AdamW on the response-only loss, the validation loss after every epoch, and the weights
  of the best epoch kept (the number of epochs is chosen on validation);
* ``response_loss`` (held-out loss per response token; ``math.exp`` of it is the perplexity) and
  ``reference_match`` (does greedy decoding reproduce the reference answer? read from one forward pass);
* ``generate_answers``: batched greedy answers that stop at ``<|im_end|>`` / ``<|endoftext|>`` or after
  ``max_new_tokens``;
* ``record_before_after``: the ``instruct.*`` entries of ``outputs/metrics.json``.

Both ends reuse ``helpers.models.base`` (sequence packing, notebook 07; KV-cache generation): training batches are
packed into one row per batch (``Packing``: no padding, every example sees only itself), the frozen prefix is
computed the same way (``cache_inputs``), and answers come from ``generate`` (greedy, KV cache, stop ids,
left-padded batches).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from helpers import config
from helpers.data import collate
from helpers.evaluate import confusion_matrix
from helpers.fastpath import CacheRecord, collate_hidden, frozen_prefix
from helpers.instruct_data import (IGNORE_INDEX, SMS_ANSWERS, SYSTEM_PROMPT, Example, Formatted,
                                   alpaca_prompt_text, answer_label, chatml_prompt, decode_answer, format_alpaca,
                                   format_chatml, length_grouped_batches, special_token_id, user_message)
from helpers.lora import apply_lora
from helpers.models import load_model
from helpers.models.base import CausalLM, Packing, evaluating, generate, model_device, run_blocks
from helpers.models.smollm2 import SmolLM2
from helpers.train import History, TrainConfig, restore_trainable, trainable_state

# --- The model and its prompt format (notebook 10) ---------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """How examples become token ids for one model: ChatML (SmolLM2-Instruct) or Alpaca (GPT-2).

    ``prompt(example)`` ends where the answer starts; ``encode(example)`` is ``(inputs, targets)`` with the
    prompt's targets -100 (``mask_prompt=False`` keeps them); ``stop_ids`` end an answer.
    """

    name: str
    tokenizer: Any
    stop_ids: tuple[int, ...]
    system: str | None = SYSTEM_PROMPT

    def prompt(self, example: Example) -> list[int]:
        if self.name == "chatml":
            return chatml_prompt(self.tokenizer, user_message(example), self.system)
        return self.tokenizer.encode(alpaca_prompt_text(example))

    def encode(self, example: Example, mask_prompt: bool = True) -> Formatted:
        if self.name == "chatml":
            return format_chatml(example, self.tokenizer, self.system, mask_prompt=mask_prompt)
        return format_alpaca(example, self.tokenizer, mask_prompt=mask_prompt)

    def encode_all(self, examples: Sequence[Example], mask_prompt: bool = True) -> list[Formatted]:
        return [self.encode(example, mask_prompt) for example in examples]


def prompt_format(model: CausalLM, system: str | None = SYSTEM_PROMPT) -> PromptFormat:
    """ChatML for SmolLM2 (stops: ``<|im_end|>``, ``<|endoftext|>``), Alpaca for GPT-2 (stop: ``<|endoftext|>``)."""
    tokenizer = model.tokenizer
    end_of_text = special_token_id(tokenizer, "<|endoftext|>")
    if isinstance(model, SmolLM2):
        return PromptFormat("chatml", tokenizer, (special_token_id(tokenizer, "<|im_end|>"), end_of_text), system)
    return PromptFormat("alpaca", tokenizer, (end_of_text,), None)


def load_instruct_model(name: str | None = None) -> tuple[CausalLM, PromptFormat]:
    """The instruction model (default: COURSE_INSTRUCT_MODEL, i.e. ``smollm2-135m``) and its prompt format."""
    model = load_model(name or config.instruct_model_name())
    return model, prompt_format(model)


# --- What trains ---------------------------------------------------------------------------------------------------

def train_top_blocks(model: CausalLM, k: int) -> CausalLM:
    """Freeze everything, then unfreeze the last ``k`` blocks and the final norm. In place; returns ``model``.

    The output head is tied to the token embedding and stays frozen: the model keeps its vocabulary, and the
    cached output of the frozen blocks stays valid.
    """
    model.requires_grad_(False)
    for module in [*top_blocks(model, k), model.final_norm]:
        module.requires_grad_(True)
    return model


def top_blocks(model: CausalLM, k: int) -> list[nn.Module]:
    """The last ``k`` blocks (1 <= k <= number of blocks)."""
    n_layers = len(model.blocks)
    if not 1 <= k <= n_layers:
        raise ValueError(f"k (blocks to train) must be in 1..{n_layers}, got {k}.")
    return list(model.blocks[n_layers - k:])


def block_linear_names(model: CausalLM) -> list[str]:
    """The names of the ``nn.Linear`` layers inside one block (e.g. ``attn.q_proj``, ``mlp.up``)."""
    return [name for name, module in model.blocks[0].named_modules() if isinstance(module, nn.Linear)]


def lora_top_blocks(model: CausalLM, k: int, rank: int = 8, alpha: float = 16, seed: int = 123) -> CausalLM:
    """LoRA adapters on every Linear layer of the last ``k`` blocks (``helpers.lora``); the rest stays frozen,
    the tied output head included. The first ``n - k`` blocks are still cacheable. In place; returns ``model``."""
    n_layers = len(model.blocks)
    first = n_layers - len(top_blocks(model, k))
    targets = [f"{i}.{name}" for i in range(first, n_layers) for name in block_linear_names(model)]
    return apply_lora(model, rank=rank, alpha=alpha, seed=seed, targets=targets, train_head=False)


# --- Batches: token ids, or the frozen prefix computed once (notebook 10) -----------------------------------------

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x, lengths [B], targets): packed [1, N] or padded [B, T]


def forward_targets(model: CausalLM, x: torch.Tensor, targets: torch.Tensor, first_block: int = 0,
                    lengths: torch.Tensor | Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the target positions only: ``(logits [N, V], targets [N])``, N = number of targets != -100.

    ``x`` is token ids [B, T] (``first_block=0``) or the hidden states [B, T, D] that enter block
    ``first_block`` (the frozen-prefix cache). With ``lengths``, ``x`` is one packed row [1, sum(lengths)]
    of texts of these lengths (``helpers.models.base.Packing``: positions restart at every text, and a
    block-diagonal causal mask keeps each text to itself). Every block runs at every position (later positions
    need the earlier ones' keys and values); the final norm and the output head only where there is a target.
    """
    packing = None if lengths is None else Packing.of(lengths, x.device)  # attention reads it: no N x N mask
    h = run_blocks(model, x, first_block, packing=packing)  # [B, T, D]
    keep = targets != IGNORE_INDEX  # [B, T]
    return model.out_head(model.final_norm(h[keep])), targets[keep]  # [N, V], [N]


def full_logits_loss(model: CausalLM, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain way, for comparison: logits at every position [B, T, V], then cross-entropy ignoring -100."""
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class InstructBatches:
    """Length-grouped batches ``(x, lengths, targets)`` of formatted examples.

    ``x`` is token ids, or (``record`` set) the cached input of block ``record.first_block``. With ``pack``
    (the default) a batch is one row: the examples one after another, no padding (``x`` [1, N(, D)], targets
    [1, N]); else each is right-padded to the batch's longest ([B, T(, D)]). With ``shuffle`` every pass is a
    new seeded order (``seed + epoch``); without it, shortest first.
    """

    inputs: list  # per example: token ids (list[int]) or cached hidden states [T, D]
    targets: list[list[int]]
    pad_id: int
    batch_size: int = 8
    shuffle: bool = False
    seed: int = 123
    record: CacheRecord | None = None
    pack: bool = True
    epoch: int = field(default=0, init=False)

    @property
    def cached(self) -> bool:
        return self.record is not None

    @property
    def first_block(self) -> int:
        return self.record.first_block if self.record else 0

    def lengths(self) -> list[int]:
        return [len(t) for t in self.targets]

    def index_batches(self) -> list[list[int]]:
        """The example indices of each batch of the next pass."""
        return length_grouped_batches(self.lengths(), self.batch_size, self.seed + self.epoch, self.shuffle)

    def collate(self, indices: Sequence[int]) -> Batch:
        lengths = torch.tensor([len(self.targets[i]) for i in indices])
        if self.pack:
            targets = torch.tensor([t for i in indices for t in self.targets[i]])[None]  # [1, N]
            if self.cached:
                return torch.cat([self.inputs[i] for i in indices])[None], lengths, targets  # [1, N, D]
            return torch.tensor([t for i in indices for t in self.inputs[i]])[None], lengths, targets  # [1, N]
        targets, _, _ = collate([(self.targets[i], 0) for i in indices], IGNORE_INDEX)
        if self.cached:
            x, _, _ = collate_hidden([(self.inputs[i], 0) for i in indices])
        else:
            x, _, _ = collate([(self.inputs[i], 0) for i in indices], self.pad_id)
        return x, lengths, targets

    def __iter__(self) -> Iterator[Batch]:
        batches = self.index_batches()
        if self.shuffle:
            self.epoch += 1
        return (self.collate(indices) for indices in batches)

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def with_targets(self, targets: Sequence[Sequence[int]]) -> "InstructBatches":
        """The same inputs (and cache) with other targets, e.g. the prompt unmasked (``mask_prompt=False``)."""
        if [len(t) for t in targets] != self.lengths():
            raise ValueError("the new targets must have the lengths of the old ones (same inputs)")
        return replace(self, targets=[list(t) for t in targets])

    def forward(self, model: CausalLM, x: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_targets`` from the right block, after checking that the cache still holds."""
        if self.record is not None:
            self.record.check(model, "Call make_instruct_batches again after changing the model.")
        return forward_targets(model, x, targets, self.first_block, lengths if self.pack else None)

    def example_of_targets(self, lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The example (0..B-1 within the batch) of every target != -100, in ``forward_targets``' order."""
        if self.pack:
            example = torch.arange(len(lengths), device=targets.device).repeat_interleave(lengths.to(targets.device))
            return example[targets[0] != IGNORE_INDEX]
        return (targets != IGNORE_INDEX).nonzero()[:, 0]


def make_instruct_batches(model: CausalLM, items: Sequence[Formatted], *, batch_size: int = 8,
                          shuffle: bool = False, seed: int = 123, cache: bool = True, pack: bool = True,
                          progress: bool = True) -> InstructBatches:
    """Batches for ``model``; with ``cache`` and a frozen, dropout-free prefix, its output is computed here once
    (every position of every example, ``cache_inputs``) and the blocks after it run at each step. ``pack``:
    each batch is one packed row (no padding), else right-padded rows.

    Build them after choosing what trains (``train_top_blocks`` / ``lora_top_blocks``): the cache relies on it,
    and a later change raises ``fastpath.StaleCacheError``. Freezing more blocks afterwards is fine (one cache
    for several choices of how many top blocks train: the frozen ones between run at each step).
    """
    targets = [list(t) for _, t in items]
    pad_id = model.tokenizer.pad_id
    n_frozen = frozen_prefix(model) if cache else 0
    if not n_frozen:
        return InstructBatches([list(i) for i, _ in items], targets, pad_id, batch_size, shuffle, seed, pack=pack)
    record = CacheRecord.of(model, n_frozen)
    hidden = cache_inputs(model, [inputs for inputs, _ in items], n_frozen, progress=progress)
    return InstructBatches(hidden, targets, pad_id, batch_size, shuffle, seed, record, pack)


@torch.no_grad()
def cache_inputs(model: CausalLM, inputs: Sequence[Sequence[int]], n_blocks: int, batch_size: int = 16,
                 progress: bool = True) -> list[torch.Tensor]:
    """The input of block ``n_blocks`` at every position of every example, ``[length, D]`` each, in order.

    Examples go in length-sorted batches, each packed into one row (``Packing``: no padding, each example
    attends to itself only, so it gets the outputs it would get alone). Kept in CPU memory.
    """
    device = model_device(model)
    hidden: list[torch.Tensor | None] = [None] * len(inputs)
    order = length_grouped_batches([len(i) for i in inputs], batch_size, shuffle=False)
    with evaluating(model):
        for chunk in tqdm(order, desc="caching frozen blocks", disable=not progress, leave=False):
            lengths = [len(inputs[i]) for i in chunk]
            ids = torch.tensor([t for i in chunk for t in inputs[i]], device=device)[None]  # [1, N]
            x = run_blocks(model, ids, 0, n_blocks, Packing.of(lengths, device))  # [1, N, D]
            for i, h in zip(chunk, x[0].split(lengths)):
                hidden[i] = h.cpu().clone()  # [length, D], a copy: not a view of the packed row
    return hidden  # type: ignore[return-value]


# --- Loss, held-out loss, training (notebook 10) ------------------------------------------------------------------

def batch_loss(model: CausalLM, batches: InstructBatches, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the batch's targets (the response tokens and the stop token, when the prompt is masked)."""
    x, lengths, targets = (t.to(model_device(model)) for t in batch)
    logits, wanted = batches.forward(model, x, lengths, targets)
    return F.cross_entropy(logits, wanted, reduction=reduction)


@torch.no_grad()
def response_loss(model: CausalLM, batches: InstructBatches, num_batches: int | None = None) -> float:
    """Mean loss per target token over the first ``num_batches`` batches (all when None); eval mode.

    Every token counts once (long answers weigh more than short ones). ``math.exp`` of it is the perplexity.
    """
    total, count = 0.0, 0
    with evaluating(model):
        for _, batch in zip(range(num_batches or len(batches)), batches):
            total += float(batch_loss(model, batches, batch, reduction="sum"))
            count += int((batch[2] != IGNORE_INDEX).sum())
    return total / count if count else float("nan")


@torch.no_grad()
def reference_match(model: CausalLM, batches: InstructBatches) -> float:
    """Share of examples where the most likely token at *every* target position is the target.

    That is exactly when greedy decoding writes the reference answer token for token (and then its stop
    token), so it scores greedy exact match from one forward pass, without generating.
    """
    right = total = 0
    with evaluating(model):
        for batch in batches:
            x, lengths, targets = (t.to(model_device(model)) for t in batch)
            logits, wanted = batches.forward(model, x, lengths, targets)
            rows = batches.example_of_targets(lengths, targets)  # the example of each target
            wrong = torch.zeros(len(lengths), dtype=torch.bool, device=targets.device)
            wrong[rows[logits.argmax(-1) != wanted]] = True
            right += int((~wrong).sum())
            total += len(lengths)
    return right / total if total else float("nan")


@dataclass
class InstructHistory(History):
    """``train.History`` plus the validation loss after every epoch and the epoch whose weights were kept."""

    epoch_val_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0


def train_instruct(model: CausalLM, train: InstructBatches, val: InstructBatches, cfg: TrainConfig | None = None,
                   *, keep_best: bool = True, progress: bool = True) -> InstructHistory:
    """Fine-tune the trainable parameters with AdamW on the response-only loss.

    Every ``cfg.eval_freq`` steps: training and validation loss on ``cfg.eval_iter`` batches (the curves).
    After every epoch: the loss on the whole validation split; with ``keep_best`` the model ends with the
    weights of the epoch where it was lowest (so the number of epochs is chosen on validation).
    """
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("No trainable parameters: call train_top_blocks (or lora_top_blocks) first.")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = InstructHistory(fast_path=train.cached)
    steps_per_epoch = min(len(train), cfg.max_steps_per_epoch or len(train))
    best, best_loss = None, float("inf")
    start = time.perf_counter()
    model.train()
    with tqdm(total=cfg.epochs * steps_per_epoch, desc="training", disable=not progress) as bar:
        for epoch in range(1, cfg.epochs + 1):
            for _, batch in zip(range(steps_per_epoch), train):
                optimizer.zero_grad()
                loss = batch_loss(model, train, batch)
                loss.backward()
                optimizer.step()
                history.examples_seen += len(batch[2])
                history.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if history.steps % cfg.eval_freq == 0:
                    history.train_losses.append(response_loss(model, train, cfg.eval_iter))
                    history.val_losses.append(response_loss(model, val, cfg.eval_iter))
                    history.eval_examples_seen.append(history.examples_seen)
            history.epochs = epoch
            history.epoch_val_losses.append(response_loss(model, val))
            if keep_best and history.epoch_val_losses[-1] < best_loss:
                best, best_loss, history.best_epoch = trainable_state(model), history.epoch_val_losses[-1], epoch
    if keep_best and best is not None and history.best_epoch != history.epochs:
        restore_trainable(model, best)
    history.best_epoch = history.best_epoch or history.epochs
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


# --- Answers (notebooks 10 and 11) ---------------------------------------------------------------------------------

def generate_answers(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     stop_ids: Sequence[int], *, batch_size: int = 16, progress: bool = False) -> list[list[int]]:
    """Greedy answer ids (prompt excluded) for every prompt, in order; each ends at its first stop id
    (included) or after ``max_new_tokens``.

    Prompts go in length-sorted batches (little padding) through ``helpers.models.base.generate`` (KV cache,
    left-padded rows). A prompt that would not fit in the context with its answer is an error, not cropped.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > model.cfg.context_length:
        raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new ones exceed the context of "
                         f"{model.cfg.context_length}; shorten it or lower max_new_tokens.")
    answers: list[list[int] | None] = [None] * len(prompts)
    batches = length_grouped_batches([len(p) for p in prompts], batch_size, shuffle=False)
    for indices in tqdm(batches, desc="generating", disable=not progress, leave=False):
        new = generate(model, [list(prompts[i]) for i in indices], max_new_tokens, stop_ids=stop_ids)
        for i, ids in zip(indices, new):
            answers[i] = ids
    return answers  # type: ignore[return-value]


def answer_texts(model: CausalLM, fmt: PromptFormat, examples: Sequence[Example], max_new_tokens: int, *,
                 batch_size: int = 16, progress: bool = False) -> list[tuple[str, bool]]:
    """``(answer text, whether it stopped)`` for every example: prompt, generate, cut at the stop token."""
    prompts = [fmt.prompt(example) for example in examples]
    generated = generate_answers(model, prompts, max_new_tokens, fmt.stop_ids, batch_size=batch_size,
                                 progress=progress)
    return [decode_answer(ids, fmt.tokenizer, fmt.stop_ids) for ids in generated]


# --- Tables and the record (notebooks 10 and 11) ------------------------------------------------------------------

def before_after(before: dict[str, float], after: dict[str, float]) -> pd.DataFrame:
    """A metric-by-metric table of two score dicts with the same keys."""
    return pd.DataFrame({"before": before, "after": after}).rename_axis("metric")


def generations_table(examples: Sequence[Example], before: Sequence[tuple[str, bool]],
                      after: Sequence[tuple[str, bool]], n: int = 5, width: int = 160) -> pd.DataFrame:
    """The first ``n`` examples: request, reference, answer before and after (``...`` where it did not stop)."""
    def show(text: str, stopped: bool = True) -> str:
        text = " ".join(text.split())
        return (text[:width] + " …" if len(text) > width else text) + ("" if stopped else " [no stop]")

    return pd.DataFrame([{"request": show(user_message(ex)), "reference": show(ex["output"]),
                          "before": show(*b), "after": show(*a)}
                         for ex, b, a in zip(examples[:n], before, after)])


def sms_confusion(answers: Sequence[tuple[str, bool]], references: Sequence[str],
                  words: Sequence[str] = SMS_ANSWERS) -> pd.DataFrame:
    """Counts of [true word, answer]: one column per allowed word and one for anything else ("invalid")."""
    preds = torch.tensor([answer_label(text, stopped, tuple(words)) for text, stopped in answers], dtype=torch.long)
    labels = torch.tensor([list(words).index(r) for r in references], dtype=torch.long)
    matrix = confusion_matrix(preds, labels, num_classes=len(words) + 1)[: len(words)]
    return pd.DataFrame(matrix.numpy(), index=pd.Index(list(words), name="true"),
                        columns=pd.Index([*words, "invalid"], name="answer"))


def record_before_after(task: str, before: dict[str, float], after: dict[str, float], **extra: Any
                        ) -> dict[str, Any]:
    """Record ``instruct.<task>.<metric>.{before,after}`` (and ``instruct.<task>.<extra>``) in metrics.json."""
    entry: dict[str, Any] = {name: {"before": before[name], "after": after[name]} for name in before}
    return config.record_metrics({"instruct": {task: {**entry, **extra}}})
