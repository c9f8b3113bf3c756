"""Data stage for instruction fine-tuning: data sets, prompt formats with masked targets, batching, metrics.

No model here: tokenizers are passed in (anything with ``encode(text) -> list[int]`` that never parses
special tokens, and ``decode(ids)``); special tokens go in as token *ids*, never as text, so a user who types
``<|im_end|>`` cannot end the turn. Where each part is taught:

* notebook 10 (the SMS task as an instruction): ``format_chatml``, masking (``prompt_and_targets``),
  ``collate_instructions``, ``length_grouped_batches``, ``sms_instruction_splits``, ``decode_answer``,
  ``exact_match`` / ``format_ok`` / ``sms_scores``;
* notebook 11 (general instructions and your own data): ``load_instruction_data`` / ``split_like_book``,
  ``format_alpaca`` (GPT-2 path), ``rouge_l``, ``token_f1``, ``stop_rate``, ``ticket_scores``.
"""
from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from . import config
from .data import LABELS, SPLIT_NAMES, collate, collate_packed, encode_labels, load_splits, random_split
from .download import download_file
from .own_data import SUPPORT_CATEGORIES, load_instructions

IGNORE_INDEX = -100  # PyTorch's cross_entropy skips targets with this value
Example = dict[str, str]  # {"instruction": ..., "input": ... (may be ""), "output": ...}
Formatted = tuple[list[int], list[int]]  # (input ids, next-token targets), same length


# --- Special tokens: the one place that knows how a tokenizer exposes them ---------------------------------

def special_token_id(tokenizer: Any, token: str) -> int:
    """The id of a special token such as ``<|im_end|>`` or ``<|endoftext|>``.

    The only function here that looks inside a tokenizer; it understands ``tokenizer.special`` (a name -> id
    dict), ``tokenizer.token_to_id(name)`` (Hugging Face ``tokenizers``) and ``tokenizer.encoding`` (tiktoken,
    ``helpers.data.GPT2Tokenizer``). Every formatter also takes the ids explicitly.
    """
    special = getattr(tokenizer, "special", None)
    if isinstance(special, dict) and token in special:
        return int(special[token])
    token_to_id = getattr(tokenizer, "token_to_id", None)
    if callable(token_to_id) and token_to_id(token) is not None:
        return int(token_to_id(token))
    encoding = getattr(tokenizer, "encoding", None)
    if encoding is not None and token in getattr(encoding, "special_tokens_set", ()):
        return int(encoding.encode_single_token(token))
    raise KeyError(f"{tokenizer!r} has no special token {token!r}; pass its id explicitly.")


# --- Prompt formats (notebook 10; Alpaca for GPT-2: notebook 11) --------------------------------------------------

SYSTEM_PROMPT = "You are a helpful assistant."
ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


def user_message(example: Example) -> str:
    """The instruction, then the input (if any) after a blank line."""
    extra = example.get("input") or ""
    return example["instruction"] + (f"\n\n{extra}" if extra.strip() else "")


def chatml_prompt(tokenizer: Any, user: str, system: str | None = SYSTEM_PROMPT, *,
                  im_start_id: int | None = None, im_end_id: int | None = None) -> list[int]:
    """Token ids of a ChatML prompt that ends where the assistant starts answering (SmolLM2-Instruct)::

        <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n

    ``<|im_start|>`` / ``<|im_end|>`` are inserted as ids; texts are encoded without parsing special tokens.
    ``system=None`` leaves out the system turn.
    """
    start = special_token_id(tokenizer, "<|im_start|>") if im_start_id is None else im_start_id
    end = special_token_id(tokenizer, "<|im_end|>") if im_end_id is None else im_end_id
    turns = ([("system", system)] if system is not None else []) + [("user", user)]
    ids: list[int] = []
    for role, text in turns:
        ids += [start, *tokenizer.encode(f"{role}\n{text}"), end, *tokenizer.encode("\n")]
    return ids + [start, *tokenizer.encode("assistant\n")]


def alpaca_prompt_text(example: Example) -> str:
    """The Alpaca-style prompt of the book's chapter 7 (``format_input``), ending with the response header."""
    extra = example.get("input") or ""
    return (f"{ALPACA_HEADER}\n\n### Instruction:\n{example['instruction']}"
            + (f"\n\n### Input:\n{extra}" if extra else "") + "\n\n### Response:\n")


def prompt_and_targets(prompt_ids: Sequence[int], response_ids: Sequence[int], mask_prompt: bool = True
                       ) -> Formatted:
    """Inputs and next-token targets of ``prompt + response`` (the response ends with its stop token).

    ``inputs = full[:-1]``, ``targets = full[1:]``: position ``i`` learns to predict token ``i + 1``.
    With ``mask_prompt`` the targets that are prompt tokens become -100, so the loss counts only the response
    and its stop token (the model learns to answer, and to stop). Without it, the prompt is learned as well.
    """
    full = [*prompt_ids, *response_ids]
    targets = full[1:]
    if mask_prompt:
        n_masked = len(prompt_ids) - 1
        targets[:n_masked] = [IGNORE_INDEX] * n_masked
    return full[:-1], targets


def format_chatml(example: Example, tokenizer: Any, system: str | None = SYSTEM_PROMPT, *,
                  mask_prompt: bool = True, im_start_id: int | None = None, im_end_id: int | None = None
                  ) -> Formatted:
    """One example as SmolLM2-Instruct's chat: ``chatml_prompt`` + the output + ``<|im_end|>`` (the target stop)."""
    end = special_token_id(tokenizer, "<|im_end|>") if im_end_id is None else im_end_id
    prompt = chatml_prompt(tokenizer, user_message(example), system, im_start_id=im_start_id, im_end_id=end)
    return prompt_and_targets(prompt, [*tokenizer.encode(example["output"]), end], mask_prompt)


def format_alpaca(example: Example, tokenizer: Any, *, mask_prompt: bool = True, eot_id: int | None = None
                  ) -> Formatted:
    """One example as the book's Alpaca-style prompt (GPT-2) + the output + ``<|endoftext|>`` (the target stop)."""
    eot = special_token_id(tokenizer, "<|endoftext|>") if eot_id is None else eot_id
    prompt = tokenizer.encode(alpaca_prompt_text(example))
    return prompt_and_targets(prompt, [*tokenizer.encode(example["output"]), eot], mask_prompt)


def tokenize_examples(examples: Sequence[Example], format_fn: Callable[[Example], Formatted]) -> list[Formatted]:
    """``format_fn`` applied to every example, e.g. ``lambda ex: format_chatml(ex, tokenizer)``."""
    return [format_fn(example) for example in examples]


# --- Batches (notebook 10) ----------------------------------------------------------------------------------------

def collate_instructions(items: Sequence[Formatted], pad_id: int, pad_to: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch: ``(ids [B, T], lengths [B], targets [B, T])``; padding targets are -100.

    Same shape of answer as ``helpers.data.collate`` (which pads both tensors here).
    """
    ids, lengths, _ = collate([(inputs, 0) for inputs, _ in items], pad_id, pad_to)
    targets, _, _ = collate([(labels, 0) for _, labels in items], IGNORE_INDEX, ids.shape[1])
    return ids, lengths, targets


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 123, shuffle: bool = True,
                           drop_last: bool = False) -> list[list[int]]:
    """Batches of indices with similar lengths, so little padding is needed.

    Indices are shuffled with ``seed`` (so equal lengths mix), sorted by length, cut into batches of
    ``batch_size``, and the batches are shuffled with the same seed (``shuffle=False`` keeps shortest first).
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])  # stable: ties keep their shuffled order
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        rng.shuffle(batches)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded positions that are padding when each batch is padded to its longest item."""
    total = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / total if total else 0.0


class LengthGroupedSampler(Sampler[list[int]]):
    """A batch sampler for ``DataLoader``: ``length_grouped_batches`` with seed ``seed + epoch``.

    Each pass over the loader is the next epoch, so every epoch gets a new (reproducible) order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 123, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.shuffle, self.drop_last, self.epoch = shuffle, drop_last, 0

    def __iter__(self):
        batches = length_grouped_batches(self.lengths, self.batch_size, self.seed + self.epoch, self.shuffle,
                                         self.drop_last)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


def instruction_loader(items: Sequence[Formatted], pad_id: int, batch_size: int = 8, seed: int = 123,
                       shuffle: bool = True, drop_last: bool = False, pack: bool = False) -> DataLoader:
    """A DataLoader of length-grouped batches ``(ids, lengths, targets)``: right-padded ``[B, T]`` each, or with
    ``pack`` one row without padding (``helpers.data.collate_packed``: ids ``[1, N]``, targets ``[N]``, N = the
    batch's tokens; train on it with ``helpers.train.packed_next_token_loss``)."""
    sampler = LengthGroupedSampler([len(inputs) for inputs, _ in items], batch_size, seed, shuffle, drop_last)
    collate_fn = collate_packed if pack else partial(collate_instructions, pad_id=pad_id)
    return DataLoader(list(items), batch_sampler=sampler, collate_fn=collate_fn)


# --- The book's instruction data set (notebook 11; rasbt/LLMs-from-scratch ch07, Apache-2.0) ----------------------

INSTRUCTION_FILE = "instruction-data.json"


def download_instruction_data(urls: Sequence[str] | None = None, folder: Path | None = None,
                              sha256: str | None = None) -> Path:
    """The verified ``instruction-data.json`` in ``COURSE_DATA_DIR``, downloaded once.

    Defaults: ``INSTRUCTION_DATA_URLS`` / ``INSTRUCTION_DATA_SHA256`` (see ``helpers.config``).
    """
    urls = list(urls) if urls is not None else config.instruction_data_urls()
    folder = Path(folder) if folder is not None else config.data_dir()
    return download_file(urls, folder / INSTRUCTION_FILE, sha256=sha256 or config.instruction_data_sha256(),
                         desc="instruction data")


def load_instruction_data(path: Path | None = None) -> list[Example]:
    """The 1,100 examples in file order (downloaded first when ``path`` is None)."""
    return load_instructions(path or download_instruction_data())


def split_like_book(examples: Sequence[Example]) -> dict[str, list[Example]]:
    """File order, no shuffle: the first 85% train, the next 10% test, the rest validation (935 / 110 / 55)."""
    n_train, n_test = int(len(examples) * 0.85), int(len(examples) * 0.1)
    return {"train": list(examples[:n_train]), "validation": list(examples[n_train + n_test:]),
            "test": list(examples[n_train:n_train + n_test])}


def random_split_examples(examples: Sequence[Example], train_frac: float = 0.7, validation_frac: float = 0.1,
                          seed: int = 123) -> dict[str, list[Example]]:
    """The course's seeded 70 / 10 / 20 split (``helpers.data.random_split``) for a list of examples."""
    parts = random_split(pd.DataFrame(list(examples)), train_frac, validation_frac, seed)
    return {name: part.to_dict("records") for name, part in parts.items()}


# --- The SMS task as an instruction (notebook 10) -----------------------------------------------------------

SMS_INSTRUCTION = "Is this message spam? Answer with one word: spam or ham."
SMS_ANSWERS = tuple(sorted(LABELS, key=LABELS.get))  # ("ham", "spam"): the answer word of label id 0, 1


def sms_examples(df: pd.DataFrame) -> list[Example]:
    """Each message of a split as ``{instruction, input: the message, output: "spam" | "ham"}``."""
    ids = encode_labels(df)["Label"].tolist()
    return [{"instruction": SMS_INSTRUCTION, "input": text, "output": SMS_ANSWERS[i]}
            for text, i in zip(df["Text"], ids)]


def sms_instruction_splits(splits: dict[str, pd.DataFrame] | None = None) -> dict[str, list[Example]]:
    """The course's SMS splits (``helpers.data.load_splits``, 1,045 / 149 / 300) as instruction examples."""
    splits = splits if splits is not None else load_splits()
    return {name: sms_examples(splits[name]) for name in SPLIT_NAMES}


# --- Metrics that need no judge model (notebook 10: SMS answers; notebook 11: ROUGE-L, token F1) ------------------

def decode_answer(generated: Sequence[int], tokenizer: Any, stop_ids: int | Collection[int]) -> tuple[str, bool]:
    """``(text before the first stop token, whether a stop token came)`` of the generated ids (prompt excluded)."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    cut = next((i for i, token in enumerate(generated) if token in stops), None)
    return tokenizer.decode(list(generated[:cut])), cut is not None


def exact_match(text: str, stopped: bool, reference: str) -> bool:
    """Right only when the stripped answer is exactly ``reference`` (case-sensitive) *and* the model stopped."""
    return stopped and text.strip() == reference


def format_ok(text: str, stopped: bool, allowed: Collection[str] = SMS_ANSWERS) -> bool:
    """The answer is one allowed word (stripped, case-sensitive), and the model stopped after it."""
    return stopped and text.strip() in allowed


def answer_label(text: str, stopped: bool, answers: Sequence[str] = SMS_ANSWERS) -> int:
    """The label id of a well-formed answer, else ``len(answers)`` (an extra "invalid" class).

    So ``helpers.evaluate.confusion_matrix(preds, labels, num_classes=len(answers) + 1)`` counts invalid
    answers in their own column.
    """
    return answers.index(text.strip()) if format_ok(text, stopped, answers) else len(answers)


def sms_scores(answers: Sequence[tuple[str, bool]], references: Sequence[str]) -> dict[str, float]:
    """Exact match, format compliance and stop rate of ``(text, stopped)`` answers against reference words."""
    _check_same_length(answers, references)
    n = len(references)
    return {"exact_match": sum(exact_match(t, s, r) for (t, s), r in zip(answers, references)) / n,
            "format_ok": sum(format_ok(t, s) for t, s in answers) / n,
            "stopped": stop_rate([s for _, s in answers])}


def stop_rate(stopped: Sequence[bool]) -> float:
    """Share of answers that ended with the stop token (not cut off at ``max_new_tokens``)."""
    return sum(map(bool, stopped)) / len(stopped) if len(stopped) else 0.0


def rouge_tokens(text: str) -> list[str]:
    """ROUGE-L's tokens here: the lowercased text split on whitespace."""
    return text.lower().split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: ``2PR / (P + R)`` with P = LCS / predicted tokens, R = LCS / reference tokens.

    0.0 when either text has no tokens.
    """
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    common = lcs_length(pred, ref) if pred and ref else 0
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


PUNCTUATION = frozenset(string.punctuation)


def squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lowercase, drop punctuation and the articles a / an / the, split."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 (bag of normalised tokens); two empty answers agree (1.0)."""
    pred, ref = squad_tokens(prediction), squad_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_score(metric: Callable[[str, str], float], predictions: Sequence[str], references: Sequence[str]) -> float:
    """Average of ``metric(prediction, reference)``, e.g. ``mean_score(rouge_l, answers, outputs)``."""
    _check_same_length(predictions, references)
    return sum(metric(p, r) for p, r in zip(predictions, references)) / len(references) if references else 0.0


def _check_same_length(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")


# --- The JSON support tickets (notebook 11, your own data) --------------------------------------------------------

TICKET_INSTRUCTION = "Turn this support request into a JSON ticket."
TICKET_FIELDS = ("category", "urgency", "summary")
URGENCIES = ("low", "normal", "high")


def ticket_json(category: str, urgency: str, summary: str) -> str:
    """The canonical one-line ticket: the three fields, always in this order."""
    return json.dumps({"category": category, "urgency": urgency, "summary": summary}, ensure_ascii=False)


def parse_ticket(text: str) -> dict | None:
    """The JSON object in ``text`` (surrounding spaces ignored), or None when it is not a valid JSON object."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def is_valid_ticket(ticket: dict | None) -> bool:
    """Exactly the three fields in order, with an allowed category and urgency and a text summary."""
    return (ticket is not None and tuple(ticket) == TICKET_FIELDS and ticket["category"] in SUPPORT_CATEGORIES
            and ticket["urgency"] in URGENCIES and isinstance(ticket["summary"], str))


def ticket_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Valid-JSON rate, valid-ticket rate, category and urgency accuracy, mean summary ROUGE-L.

    A prediction that is not a JSON object scores 0 on every field.
    """
    _check_same_length(predictions, references)
    n = len(references)
    scores = dict.fromkeys(("valid_json", "valid_ticket", "category", "urgency", "summary_rouge_l"), 0.0)
    for prediction, reference in zip(predictions, references):
        got, want = parse_ticket(prediction), json.loads(reference)
        if got is None:
            continue
        scores["valid_json"] += 1
        scores["valid_ticket"] += is_valid_ticket(got)
        scores["category"] += got.get("category") == want["category"]
        scores["urgency"] += got.get("urgency") == want["urgency"]
        summary = got.get("summary")
        scores["summary_rouge_l"] += rouge_l(summary, want["summary"]) if isinstance(summary, str) else 0.0
    return {name: value / n for name, value in scores.items()} if n else scores
