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

Two seams are kept small on purpose, so that sequence packing and the KV-cache generator of
``helpers.models`` (being written) replace a few lines: ``forward_targets`` (a batch -> logits at its
targets) and ``generate_answers`` (prompts -> answer ids). Until that generator lands, the end of this module
runs the blocks with a small key/value cache of its own (``KVCache``, tested token for token against
generation without a cache). It also computes a prompt start that all examples share (the system prompt and a
common instruction) only once, when generating and when caching the frozen blocks (``shared_prefix``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

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
from helpers.models.base import CausalLM
from helpers.models.gpt2 import TransformerBlock
from helpers.models.smollm2 import LlamaBlock, SmolLM2, apply_rope, rope_cos_sin
from helpers.train import History, TrainConfig

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

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (ids [B, T] or hidden [B, T, D], lengths [B], targets [B, T])


def forward_targets(model: CausalLM, x: torch.Tensor, targets: torch.Tensor, first_block: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the target positions only: ``(logits [N, V], targets [N])``, N = number of targets != -100.

    ``x`` is token ids [B, T] (``first_block=0``) or the hidden states [B, T, D] that enter block
    ``first_block`` (the frozen-prefix cache). Every block runs at every position (later positions need the
    earlier ones' keys and values); the final norm and the output head only where there is a target.
    """
    h = model.embed(x) if first_block == 0 else x  # [B, T, D]
    for block in model.blocks[first_block:]:
        h = block(h)
    keep = targets != IGNORE_INDEX  # [B, T]
    return model.out_head(model.final_norm(h[keep])), targets[keep]  # [N, V], [N]


def full_logits_loss(model: CausalLM, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain way, for comparison: logits at every position [B, T, V], then cross-entropy ignoring -100."""
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class InstructBatches:
    """Length-grouped batches ``(x, lengths, targets)`` of formatted examples, padded to each batch's longest.

    ``x`` is token ids, or (``record`` set) the cached input of block ``record.first_block``. With
    ``shuffle`` every pass is a new seeded order (``seed + epoch``); without it, shortest first.
    """

    inputs: list  # per example: token ids (list[int]) or cached hidden states [T, D]
    targets: list[list[int]]
    pad_id: int
    batch_size: int = 8
    shuffle: bool = False
    seed: int = 123
    record: CacheRecord | None = None
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
        targets, lengths, _ = collate([(self.targets[i], 0) for i in indices], IGNORE_INDEX)
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

    def forward(self, model: CausalLM, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_targets`` from the right block, after checking that the cache still holds."""
        if self.record is not None:
            self.record.check(model, "Call make_instruct_batches again after changing the model.")
        return forward_targets(model, x, targets, self.first_block)


def make_instruct_batches(model: CausalLM, items: Sequence[Formatted], *, batch_size: int = 8,
                          shuffle: bool = False, seed: int = 123, cache: bool = True, progress: bool = True
                          ) -> InstructBatches:
    """Batches for ``model``; with ``cache`` and a frozen, dropout-free prefix, its output is computed here once
    (every position of every example, ``cache_inputs``) and the blocks after it run at each step.

    Build them after choosing what trains (``train_top_blocks`` / ``lora_top_blocks``): the cache relies on it,
    and a later change raises ``fastpath.StaleCacheError``. Freezing more blocks afterwards is fine (one cache
    for several choices of how many top blocks train: the frozen ones between run at each step).
    """
    targets = [list(t) for _, t in items]
    pad_id = model.tokenizer.pad_id
    n_frozen = frozen_prefix(model) if cache else 0
    if not n_frozen:
        return InstructBatches([list(i) for i, _ in items], targets, pad_id, batch_size, shuffle, seed)
    record = CacheRecord.of(model, n_frozen)
    hidden = cache_inputs(model, [inputs for inputs, _ in items], n_frozen, progress=progress)
    return InstructBatches(hidden, targets, pad_id, batch_size, shuffle, seed, record)


# --- Loss, held-out loss, training (notebook 10) ------------------------------------------------------------------

def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batch_loss(model: CausalLM, batches: InstructBatches, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the batch's targets (the response tokens and the stop token, when the prompt is masked)."""
    x, _, targets = (t.to(_device(model)) for t in batch)
    logits, wanted = batches.forward(model, x, targets)
    return F.cross_entropy(logits, wanted, reduction=reduction)


@torch.no_grad()
def response_loss(model: CausalLM, batches: InstructBatches, num_batches: int | None = None) -> float:
    """Mean loss per target token over the first ``num_batches`` batches (all when None); eval mode.

    Every token counts once (long answers weigh more than short ones). ``math.exp`` of it is the perplexity.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for _, batch in zip(range(num_batches or len(batches)), batches):
        total += float(batch_loss(model, batches, batch, reduction="sum"))
        count += int((batch[2] != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / count if count else float("nan")


@torch.no_grad()
def reference_match(model: CausalLM, batches: InstructBatches) -> float:
    """Share of examples where the most likely token at *every* target position is the target.

    That is exactly when greedy decoding writes the reference answer token for token (and then its stop
    token), so it scores greedy exact match from one forward pass, without generating.
    """
    was_training = model.training
    model.eval()
    right = total = 0
    for batch in batches:
        x, _, targets = (t.to(_device(model)) for t in batch)
        logits, wanted = batches.forward(model, x, targets)
        rows = (targets != IGNORE_INDEX).nonzero()[:, 0]  # the example of each target
        wrong = torch.zeros(len(targets), dtype=torch.bool, device=targets.device)
        wrong[rows[logits.argmax(-1) != wanted]] = True
        right += int((~wrong).sum())
        total += len(targets)
    model.train(was_training)
    return right / total if total else float("nan")


@dataclass
class InstructHistory(History):
    """``train.History`` plus the validation loss after every epoch and the epoch whose weights were kept."""

    epoch_val_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every trainable parameter."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``trainable_state``) back into the model's trainable parameters."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)


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
        load_trainable_state(model, best)
    history.best_epoch = history.best_epoch or history.epochs
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


# --- Answers (notebooks 10 and 11) ---------------------------------------------------------------------------------

def generate_answers(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     stop_ids: Sequence[int], *, batch_size: int = 16, progress: bool = False) -> list[list[int]]:
    """Greedy answer ids (prompt excluded) for every prompt, in order; each ends at its first stop id
    (included) or after ``max_new_tokens``.

    Prompts go in length-sorted batches (little padding); the start that all prompts share (system prompt,
    a common instruction) is computed once. Runs in eval mode, then restores the mode.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > model.cfg.context_length:
        raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new ones exceed the context of "
                         f"{model.cfg.context_length}; shorten it or lower max_new_tokens.")
    was_training = model.training
    model.eval()
    try:
        n_shared = common_prefix_length(prompts)
        prefix = shared_prefix(model, prompts[0][:n_shared] if prompts else [], len(model.blocks))
        answers: list[list[int] | None] = [None] * len(prompts)
        batches = length_grouped_batches([len(p) for p in prompts], batch_size, shuffle=False)
        for indices in tqdm(batches, desc="generating", disable=not progress, leave=False):
            rows = [prompts[i][n_shared:] for i in indices]
            for i, ids in zip(indices, _generate_batch(model, rows, max_new_tokens, stop_ids, prefix)):
                answers[i] = ids
    finally:
        model.train(was_training)
    return answers  # type: ignore[return-value]


def answer_texts(model: CausalLM, fmt: PromptFormat, examples: Sequence[Example], max_new_tokens: int, *,
                 batch_size: int = 16, progress: bool = False) -> list[tuple[str, bool]]:
    """``(answer text, whether it stopped)`` for every example: prompt, generate, cut at the stop token."""
    prompts = [fmt.prompt(example) for example in examples]
    generated = generate_answers(model, prompts, max_new_tokens, fmt.stop_ids, batch_size=batch_size,
                                 progress=progress)
    return [decode_answer(ids, fmt.tokenizer, fmt.stop_ids) for ids in generated]


def seconds_per_call(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Wall-clock seconds of ``fn()``, the fastest of ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


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


# --- Running blocks with a key/value cache (local, until helpers.models has its own) ----------------------------------
# The same blocks, run on one chunk of positions at a time; each layer keeps the keys and values of the positions it
# has seen. Used to generate (prompts left-padded, so every row's next token is read at the last slot) and to compute
# a prompt start that all examples share only once. Padding slots are never visible to real tokens.

@dataclass
class KVCache:
    """Keys and values [B, H_kv, S, hd] of each layer for the S slots seen so far, and which slots are real [B, S]."""

    layers: list
    valid: torch.Tensor

    @classmethod
    def empty(cls, n_layers: int, batch: int, device: torch.device) -> "KVCache":
        return cls([None] * n_layers, torch.zeros(batch, 0, dtype=torch.bool, device=device))

    def expand(self, batch: int) -> "KVCache":
        """The cache of one row, shared by ``batch`` rows (a view: no copy)."""
        layers = [None if kv is None else tuple(t.expand(batch, -1, -1, -1) for t in kv) for kv in self.layers]
        return KVCache(layers, self.valid.expand(batch, -1))


def _embed_at(model: CausalLM, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token embeddings [B, T, D] of ids at explicit positions (GPT-2 adds its position table)."""
    x = model.tok_emb(ids)
    pos_emb = getattr(model, "pos_emb", None)
    return x + pos_emb(positions) if pos_emb is not None else x


def _qkv(block: nn.Module, h: torch.Tensor, positions: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries [B, H, T, hd], keys and values [B, H_kv, T, hd] of the normed input ``h`` at ``positions`` [B, T]."""
    attn = block.attn
    if isinstance(block, LlamaBlock):
        cos, sin = rope_cos_sin(positions, attn.head_dim, attn.rope_theta)
        q = apply_rope(attn._heads(attn.q_proj(h), attn.n_heads), cos, sin)
        k = apply_rope(attn._heads(attn.k_proj(h), attn.n_kv_heads), cos, sin)
        return q, k, attn._heads(attn.v_proj(h), attn.n_kv_heads)
    return attn._heads(attn.W_query(h)), attn._heads(attn.W_key(h)), attn._heads(attn.W_value(h))


def _block_step(block: nn.Module, x: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One block on new positions x [B, T, D], attending to the cached keys/values and their own."""
    llama = isinstance(block, LlamaBlock)
    if not (llama or isinstance(block, TransformerBlock)):
        raise TypeError(f"the key/value cache knows GPT-2 and SmolLM2 blocks, not {type(block).__name__}")
    q, k, v = _qkv(block, block.attn_norm(x) if llama else block.norm1(x), positions)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    group = q.shape[1] // k.shape[1]  # query heads per key/value head (grouped-query attention)
    context = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                             attn_mask=visible[:, None])  # [B, H, T, hd]
    x = x + block.attn.out_proj(context.transpose(1, 2).flatten(2))
    x = x + (block.mlp(block.mlp_norm(x)) if llama else block.ff(block.norm2(x)))
    return x, (k, v)


def _run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, positions: torch.Tensor, new_valid: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
    """New slots x [B, T, D] (``new_valid`` [B, T]: which are real) through ``blocks``; the cache grows by T slots."""
    cache.valid = torch.cat([cache.valid, new_valid], dim=1)
    n_all, n_new = cache.valid.shape[1], x.shape[1]
    slots = torch.arange(n_all, device=x.device)
    query_slots = slots[n_all - n_new:, None]  # [T, 1]
    # a real key at or before the query's slot; every slot also sees itself (a padding query must see something)
    visible = (cache.valid[:, None, :] & (slots <= query_slots)) | (slots == query_slots)  # [B, T, S]
    for i, block in enumerate(blocks):
        x, cache.layers[i] = _block_step(block, x, positions, visible, cache.layers[i])
    return x


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all sequences share, leaving each at least one token of its own."""
    if not sequences:
        return 0
    n = min(len(s) for s in sequences) - 1
    first = sequences[0]
    for s in sequences[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return max(n, 0)


@dataclass
class SharedPrefix:
    """A token run that every sequence starts with, computed once through ``n_blocks`` blocks."""

    length: int
    cache: KVCache
    hidden: torch.Tensor  # [length, D]: its output of the last of those blocks


def shared_prefix(model: CausalLM, ids: Sequence[int], n_blocks: int) -> SharedPrefix:
    """Run ``ids`` (one sequence) through the embedding and the first ``n_blocks`` blocks, keeping keys and values."""
    device = _device(model)
    cache = KVCache.empty(n_blocks, 1, device)
    if not ids:
        return SharedPrefix(0, cache, torch.zeros(0, model.cfg.emb_dim, device=device))
    ids_t = torch.tensor([list(ids)], device=device)
    positions = torch.arange(len(ids), device=device)[None]
    x = _run_blocks(model.blocks[:n_blocks], _embed_at(model, ids_t, positions), positions,
                    torch.ones_like(ids_t, dtype=torch.bool), cache)
    return SharedPrefix(len(ids), cache, x[0])


def _padded(rows: Sequence[Sequence[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, T], valid [B, T])`` of rows padded on the left or the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols], valid[i, cols] = torch.tensor(list(row), dtype=torch.long), True
    return ids.to(device), valid.to(device)


@torch.no_grad()
def cache_inputs(model: CausalLM, inputs: Sequence[Sequence[int]], n_blocks: int, batch_size: int = 16,
                 progress: bool = True) -> list[torch.Tensor]:
    """The input of block ``n_blocks`` at every position of every example, ``[length, D]`` each, in order.

    Examples go in length-sorted batches (little padding). A start all examples share (the system prompt and a
    common instruction) is computed once: under the causal mask its outputs are the same in every example.
    """
    was_training = model.training
    model.eval()
    n_shared = common_prefix_length(inputs)
    prefix = shared_prefix(model, inputs[0][:n_shared], n_blocks) if inputs else None
    hidden: list[torch.Tensor | None] = [None] * len(inputs)
    order = length_grouped_batches([len(i) for i in inputs], batch_size, shuffle=False)
    for chunk in tqdm(order, desc="caching frozen blocks", disable=not progress, leave=False):
        ids, valid = _padded([inputs[i][n_shared:] for i in chunk], model.tokenizer.pad_id, False, _device(model))
        positions = n_shared + torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
        x = _run_blocks(model.blocks[:n_blocks], _embed_at(model, ids, positions), positions, valid,
                        prefix.cache.expand(len(chunk)))
        for row, i in enumerate(chunk):
            hidden[i] = torch.cat([prefix.hidden, x[row, : len(inputs[i]) - n_shared]]).cpu()
    model.train(was_training)
    return hidden  # type: ignore[return-value]


@torch.no_grad()
def _generate_batch(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: Sequence[int], prefix: SharedPrefix) -> list[list[int]]:
    """Greedy answers of a batch of prompts that all start with ``prefix`` (only the rest is passed); each cut
    after its first stop id."""
    device = _device(model)
    ids, valid = _padded(prompts, model.tokenizer.pad_id, True, device)  # every prompt ends at the last slot
    positions = prefix.length + (valid.long().cumsum(1) - 1).clamp(min=0)  # each row counts its own positions
    cache = prefix.cache.expand(len(prompts))
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    x = _run_blocks(model.blocks, _embed_at(model, ids, positions), positions, valid, cache)
    next_position = positions[:, -1:] + 1
    new, done = [], torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = model.out_head(model.final_norm(x[:, -1])).argmax(-1)  # [B]
        new.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        x = _run_blocks(model.blocks, _embed_at(model, token[:, None], next_position), next_position,
                        torch.ones_like(token[:, None], dtype=torch.bool), cache)
        next_position = next_position + 1
    rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]
    stop_set = set(stops.tolist())
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))] for row in rows]
