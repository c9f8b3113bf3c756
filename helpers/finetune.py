"""Take it home: the course's fine-tuning recipe as one command, on one process or many (torchrun).

    python -m helpers.finetune --task classify --method last-block --output runs/sms          # notebook 05
    python -m helpers.finetune --task classify --data my_labels.csv --method lora --output runs/mine
    torchrun --standalone --nproc_per_node=2 -m helpers.finetune --task classify --output runs/sms2

Pipeline position: the last stage; it defines no new training step, it calls the others. No notebook defines
it: it runs notebook 05's recipe (classification; ``helpers.train``), notebook 07's LoRA / QLoRA and notebook 10's
instruction tuning (``helpers.instruct``) through the DDP engine of ``helpers.distributed`` (README
"Beyond one machine"). ``--help`` lists every option.

The output folder receives ``classifier.pt`` (or ``adapters.safetensors``: LoRA A/B + the head; for
``--task instruct`` ``trained.pt``: the trained tensors and the base model's name), ``metrics.json``, and the
plots ``finetune-loss.png`` / ``finetune-accuracy.png`` (classification only). While the run is unfinished it
also holds ``resume.pt`` (the trainable weights, the optimizer and where the run stood), written every
``--save-every`` steps and at each epoch's end; ``--resume`` continues from it exactly as if never stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from helpers import config, data, instruct, own_data
from helpers.checkpoints import save_adapters, save_classifier
from helpers.distributed import (
    DistContext, DistributedError, LossModule, classification_loss_sum, distributed, global_mean_loss, main_first,
    print_main, save_on_main, set_epoch, sharded_loader, unwrap, wrap_model,
)
from helpers.evaluate import plot_history
from helpers.fastpath import make_batches
from helpers.instruct_data import load_instruction_data, random_split_examples, split_like_book
from helpers.lora import apply_lora, apply_qlora
from helpers.models import load_model
from helpers.models.base import (
    CheckpointError, add_classifier_head, clock, count_params, last_token_logits, model_device, precision_for,
    set_seed,
)
from helpers.train import (
    History, TrainConfig, accuracies, history_dict, optimizer_step, record_epoch, record_losses, restore_trainable,
    trainable_state,
)

TASKS = ("classify", "instruct")
METHODS = ("last-block", "last-k", "all", "lora", "qlora")
COURSE_DATA = "course"
RESUME_FILE, METRICS_FILE, PLOT_PREFIX = "resume.pt", "metrics.json", "finetune"
CLASSIFIER_FILE, ADAPTERS_FILE, TRAINED_FILE = "classifier.pt", "adapters.safetensors", "trained.pt"
RESUME_FORMAT, TRAINED_FORMAT = "course-finetune-resume-v1", "course-finetune-trained-v1"
#: options that may differ between an interrupted run and its ``--resume`` (everything else must match)
RESUMABLE_CHANGES = ("epochs", "output", "resume", "save_every", "progress", "device")


class UsageError(ValueError):
    """A bad option, data file or output folder; the message says what to do (exit status 2)."""


# --- The command line -----------------------------------------------------------------------------------

def _number(kind: type, minimum: float, strict: bool) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` above ``minimum`` (or equal, when not ``strict``)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < minimum or (strict and value == minimum) or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>' if strict else '>='} {minimum:g}")
        return value
    return parse


positive_int, positive_float = _number(int, 0, True), _number(float, 0, True)
non_negative_float = _number(float, 0, False)

EPILOG = """\
outputs (in --output): classifier.pt (or adapters.safetensors for lora/qlora; trained.pt for --task
instruct), metrics.json, finetune-loss.png, finetune-accuracy.png (classify); resume.pt while the run is
unfinished (--resume continues it).

several processes: torchrun --standalone --nproc_per_node=N -m helpers.finetune ... (gloo on CPU, nccl on
CUDA GPUs, one process per GPU); several machines: torchrun --nnodes=M --nproc_per_node=N --rdzv_id=ID
--rdzv_backend=c10d --rdzv_endpoint=HOST:PORT -m helpers.finetune ... on every machine. --batch-size is per
process: the global batch is --batch-size x N. See README "Beyond one machine".
"""


def build_parser() -> argparse.ArgumentParser:
    """Every option of the command, documented (``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m helpers.finetune", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Fine-tune a course model on the course's data or your own file.")
    add = parser.add_argument
    add("--task", choices=TASKS, default="classify",
        help="classify: a classification head on the last real token (notebook 05); instruct: next-token loss on "
             "the responses only (notebook 10). Default: classify")
    add("--data", default=COURSE_DATA,
        help="'course' (the SMS Spam Collection / the book's instruction data) or your file: CSV, TSV, JSON or "
             "JSONL with a text and a label column (classify) or instruction / input / output fields (instruct)")
    add("--text-column", default="text", help="classify, your file: the column with the text (default: text)")
    add("--label-column", default="label", help="classify, your file: the column with the label (default: label)")
    add("--model", default=None,
        help="a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl), smollm2-135m, or a GPT-2 checkpoint folder; "
             "default: COURSE_MODEL, else gpt2 (classify); COURSE_INSTRUCT_MODEL, else smollm2-135m (instruct)")
    add("--method", choices=METHODS, default="last-block",
        help="what trains: the last block (+ final norm and head), the last --k blocks, all weights, or LoRA "
             "adapters on every block's linear layers (qlora: on NF4 weights) plus the head. "
             "Default: last-block")
    add("--k", type=positive_int, default=2, help="blocks trained by --method last-k (default: 2)")
    add("--lora-rank", type=positive_int, default=16, help="LoRA rank (default: 16)")
    add("--lora-alpha", type=positive_float, default=16.0, help="LoRA alpha; the update is scaled by alpha/rank "
                                                                 "(default: 16)")
    add("--epochs", type=positive_int, default=5, help="passes over the training split (default: 5)")
    add("--lr", type=positive_float, default=5e-5, help="AdamW learning rate (default: 5e-5)")
    add("--weight-decay", type=non_negative_float, default=0.1, help="AdamW weight decay (default: 0.1)")
    add("--batch-size", type=positive_int, default=8,
        help="examples per step and per process; global batch = this x processes (default: 8)")
    add("--max-steps-per-epoch", type=positive_int, default=None, help="stop each epoch early (default: no limit)")
    add("--eval-freq", type=positive_int, default=50, help="steps between loss evaluations (default: 50)")
    add("--eval-iter", type=positive_int, default=5, help="batches per evaluation (default: 5)")
    add("--seed", type=int, default=123, help="seed of the head, LoRA, the split of your file and the shuffling "
                                              "(default: 123)")
    add("--output", type=Path, default=Path("runs/finetune"), help="folder for the results (default: runs/finetune)")
    add("--save-every", type=positive_int, default=50, help="steps between resume checkpoints (default: 50)")
    add("--resume", action="store_true", help="continue the interrupted run in --output from its resume.pt")
    add("--device", default=None, help="cpu, cuda, mps; default: COURSE_DEVICE, else the best available")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options, checked: the data file exists and the output folder fits ``--resume``."""
    args = build_parser().parse_args(argv)
    args.model = args.model or (config.instruct_model_name() if args.task == "instruct" else config.model_name())
    if args.data != COURSE_DATA and not Path(args.data).is_file():
        raise UsageError(f"--data {args.data}: no such file. Give 'course' for the course's data, or the path of "
                         "a CSV / TSV / JSON / JSONL file.")
    check_output(args.output, args.resume)
    return args


def check_output(out: Path, resume: bool) -> None:
    """A new run needs a folder without a run in it; ``--resume`` needs the interrupted run's ``resume.pt``."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file; give a folder.")
    finished = [name for name in (CLASSIFIER_FILE, ADAPTERS_FILE, TRAINED_FILE) if (out / name).exists()]
    if resume and not (out / RESUME_FILE).exists():
        state = f"holds a finished run ({finished[0]})" if finished else f"has no {RESUME_FILE}"
        raise UsageError(f"--resume: {out} {state}; there is nothing to resume. Run without --resume "
                         "(with a new --output to keep that folder's results).")
    if not resume and ((out / RESUME_FILE).exists() or finished):
        found = RESUME_FILE if (out / RESUME_FILE).exists() else finished[0]
        raise UsageError(f"{out} already holds a run ({found}). Continue an interrupted run with --resume, or "
                         "choose another --output: nothing is overwritten.")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The options as ``helpers.train``'s recipe."""
    return TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                       eval_freq=args.eval_freq, eval_iter=args.eval_iter,
                       max_steps_per_epoch=args.max_steps_per_epoch, seed=args.seed)


# --- What one run trains ----------------------------------------------------------------------------------

@dataclass
class Job:
    """A task made ready: the model inside its loss module, the training examples, how to evaluate and save."""

    step: nn.Module  # LossModule(model, its forward, its loss), wrapped by DDP under torchrun (wrap_model)
    train_set: Dataset
    collate: Callable
    log_losses: Callable[[History], None]  # rank 0, every --eval-freq steps
    log_epoch: Callable[[History], None]  # rank 0, at each epoch's end (also counts the epoch)
    final_metrics: Callable[[], dict[str, Any]]  # rank 0, after training
    save: Callable[[nn.Module, Path], Any]  # the unwrapped model -> a file
    checkpoint: str  # that file's name in --output


def load_course_model(args: argparse.Namespace, context: DistContext) -> nn.Module:
    """``--model`` on this process's device (rank 0 first: a download or a cache is written once)."""
    with main_first():
        return load_model(args.model, device=context.device)


def blocks_to_train(model: nn.Module, args: argparse.Namespace) -> int:
    """How many of the last blocks ``--method`` trains whole (LoRA: its adapters go in every block)."""
    n_layers = len(model.blocks)
    if args.method == "last-k" and args.k > n_layers:
        raise UsageError(f"--k {args.k}: this model has {n_layers} blocks; give --k 1..{n_layers}.")
    return {"last-block": 1, "last-k": args.k}.get(args.method, n_layers)


def choose_trainable(model: nn.Module, args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The classification head, then what ``--method`` trains (set BEFORE DDP wraps the model)."""
    lora = args.method in ("lora", "qlora")
    add_classifier_head(model, num_classes=num_classes, trainable_blocks=0 if lora else blocks_to_train(model, args),
                        seed=args.seed)
    if args.method == "all":
        model.requires_grad_(True)
    elif lora:
        apply = apply_lora if args.method == "lora" else apply_qlora
        apply(model, rank=args.lora_rank, alpha=args.lora_alpha, seed=args.seed)
    return model


def classify_splits(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, int]]:
    """Train / validation / test DataFrames and the label map: the SMS splits, or your file split by label."""
    if args.data == COURSE_DATA:
        with main_first():
            return data.load_splits(), dict(data.LABELS)
    df, labels = own_data.load_labelled(args.data, args.text_column, args.label_column)
    return own_data.stratified_split(df, seed=args.seed), labels


def saver(args: argparse.Namespace, max_length: int, labels: dict[str, int]) -> tuple[Callable, str]:
    """How the trained classifier is saved: LoRA adapters + head, or the whole classifier."""
    if args.method in ("lora", "qlora"):
        return (lambda model, path: save_adapters(model, path, base_model=args.model)), ADAPTERS_FILE
    return (lambda model, path: save_classifier(model, path, max_length=max_length, labels=labels)), CLASSIFIER_FILE


def classify_job(args: argparse.Namespace, context: DistContext) -> Job:
    """Notebook 05's set-up: the model with its head, the splits, the (cached when possible) batches."""
    model = load_course_model(args, context)
    splits, labels = classify_splits(args)
    datasets = data.tokenize_splits(splits, model.tokenizer, context_length=model.cfg.context_length)
    choose_trainable(model, args, num_classes=len(labels))
    loss = LossModule(model, last_token_logits, classification_loss_sum)
    step = wrap_model(loss, context)  # before caching: DDP starts by copying rank 0's weights in place
    batches = {name: make_batches(model, ds, batch_size=args.batch_size, seed=args.seed, progress=False)
               for name, ds in datasets.items()}  # in order: evaluation, and the source of the training batches
    cfg, train, val = train_config(args), batches["train"], batches["validation"]
    loss.logits_of = train.forward  # from the cached frozen blocks when the method allows it
    save, checkpoint = saver(args, datasets["train"].max_length, labels)
    return Job(step=step, train_set=train.loader.dataset,
               collate=train.loader.collate_fn,
               log_losses=lambda history: record_losses(history, model, train, val, cfg),
               log_epoch=lambda history: record_epoch(history, model, train, val, cfg),
               final_metrics=lambda: {"labels": labels, "fast_path": train.cached,
                                      "accuracy": accuracies(model, batches)},
               save=save, checkpoint=checkpoint)


class TargetLossModule(LossModule):
    """``LossModule`` for instruction tuning: its forward needs the targets too, because it runs the output head
    only where there is one (``InstructBatches.forward`` -> ``(logits [N, vocab], targets [N])``); the loss is
    then the summed cross-entropy of those N rows, and N the count that ``global_mean_loss`` sums over ranks."""

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor):
        device = model_device(self.model)
        logits, wanted = self.logits_of(self.model, inputs.to(device), lengths.to(device), targets.to(device))
        return self.loss_of(logits, wanted)


def instruct_splits(args: argparse.Namespace, fmt: instruct.PromptFormat, context_length: int
                    ) -> dict[str, list[dict]]:
    """The book's instruction data split like the book, or your file (checked to fit the model) split 70/10/20."""
    if args.data == COURSE_DATA:
        with main_first():
            return split_like_book(load_instruction_data())
    examples = own_data.load_instructions(args.data, count_tokens=lambda example: len(fmt.encode(example)[0]),
                                          context_length=context_length)
    return random_split_examples(examples, seed=args.seed)


def choose_trainable_blocks(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """Instruction tuning keeps the language-model head: the last blocks, all weights, or LoRA in every block."""
    if args.method == "qlora":
        raise UsageError("--method qlora is not available for --task instruct (helpers.instruct adapts the "
                         "blocks with LoRA only); use --method lora.")
    if args.method == "lora":
        return instruct.lora_top_blocks(model, len(model.blocks), rank=args.lora_rank, alpha=args.lora_alpha,
                                        seed=args.seed)
    if args.method == "all":
        return model.requires_grad_(True)
    return instruct.train_top_blocks(model, blocks_to_train(model, args))


def save_trained_part(args: argparse.Namespace, model: nn.Module, path: Path) -> None:
    """What instruction tuning changed: the trainable tensors, the base model and the method (to rebuild it:
    ``load_model(base_model)``, the same method, then ``train.restore_trainable``)."""
    torch.save({"format": TRAINED_FORMAT, "base_model": args.model, "method": args.method,
                "lora": getattr(model, "lora_config", None), "trainable": trainable_state(model)}, path)


def record_response_losses(history: History, model: nn.Module, train: instruct.InstructBatches,
                           val: instruct.InstructBatches, eval_iter: int) -> None:
    """Append the loss per response token on ``eval_iter`` training and validation batches."""
    history.train_losses.append(instruct.response_loss(model, train, eval_iter))
    history.val_losses.append(instruct.response_loss(model, val, eval_iter))
    history.eval_examples_seen.append(history.examples_seen)


def count_epoch(history: History) -> None:
    history.epochs += 1


def instruct_metrics(model: nn.Module, batches: dict[str, instruct.InstructBatches], prompt_format: str
                     ) -> dict[str, Any]:
    """Loss per response token and reference match (greedy decoding would write the reference) per split."""
    return {"prompt_format": prompt_format, "fast_path": batches["train"].cached,
            "response_loss": {name: instruct.response_loss(model, b) for name, b in batches.items()},
            "reference_match": {name: instruct.reference_match(model, b) for name, b in batches.items()}}


def instruct_job(args: argparse.Namespace, context: DistContext) -> Job:
    """Notebook 10's set-up: the model's prompt format, -100 prompt targets, packed (cached) batches."""
    model = load_course_model(args, context)
    fmt = instruct.prompt_format(model)
    splits = instruct_splits(args, fmt, model.cfg.context_length)
    choose_trainable_blocks(model, args)
    loss = TargetLossModule(model, instruct.forward_targets, classification_loss_sum)
    step = wrap_model(loss, context)  # before caching: DDP starts by copying rank 0's weights in place
    batches = {name: instruct.make_instruct_batches(model, fmt.encode_all(examples), batch_size=args.batch_size,
                                                    seed=args.seed, progress=False)
               for name, examples in splits.items()}  # in order, packed: evaluation, and the training examples
    train, val = batches["train"], batches["validation"]
    loss.logits_of = train.forward
    return Job(step=step, train_set=list(range(len(train.targets))), collate=train.collate,
               log_losses=lambda history: record_response_losses(history, model, train, val, args.eval_iter),
               log_epoch=count_epoch,
               final_metrics=lambda: instruct_metrics(model, batches, fmt.name),
               save=lambda model, path: save_trained_part(args, model, path), checkpoint=TRAINED_FILE)


def make_job(args: argparse.Namespace, context: DistContext) -> Job:
    """The job of ``--task``."""
    return instruct_job(args, context) if args.task == "instruct" else classify_job(args, context)


# --- Resume -------------------------------------------------------------------------------------------------

def resume_settings(args: argparse.Namespace, world_size: int) -> dict[str, str]:
    """The options a resumed run must share with the interrupted one (as text), and the process count."""
    settings = {name: str(value) for name, value in sorted(vars(args).items()) if name not in RESUMABLE_CHANGES}
    return {**settings, "world_size": str(world_size)}


def save_resume(args: argparse.Namespace, step: nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, history: History, epoch: int, done: int, world_size: int) -> None:
    """Rank 0 writes ``resume.pt`` atomically: the trainable weights, the optimizer, where the run stands."""
    state = {"format": RESUME_FORMAT, "settings": resume_settings(args, world_size), "epoch": epoch, "done": done,
             "trainable": trainable_state(unwrap(step)), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "history": history_dict(history), "rng": torch.get_rng_state()}
    save_on_main(step, args.output / RESUME_FILE, save=lambda _model, path: torch.save(state, path))


def read_resume(args: argparse.Namespace, world_size: int, device: torch.device) -> dict[str, Any]:
    """``resume.pt``, checked: readable, of this format, and written by a run with the same settings."""
    path = args.output / RESUME_FILE
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise UsageError(f"{path} cannot be read ({type(exc).__name__}): it is damaged. Start the run again "
                         "without --resume in a new --output.") from exc
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise UsageError(f"{path} was not written by helpers.finetune ({RESUME_FORMAT}); start a new run.")
    expected = resume_settings(args, world_size)
    changed = {name: (state["settings"].get(name), value) for name, value in expected.items()
               if state["settings"].get(name) != value}
    if changed:
        details = "; ".join(f"{name}: {old} then, {new} now" for name, (old, new) in changed.items())
        raise UsageError(f"--resume needs the interrupted run's settings ({details}). Only "
                         f"{', '.join(RESUMABLE_CHANGES)} may change.")
    return state


def load_resume(args: argparse.Namespace, step: nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, world_size: int) -> tuple[int, int, History]:
    """Put the interrupted run's weights, optimizer and random state back; returns (epoch, batches done, history)."""
    model = unwrap(step)
    state = read_resume(args, world_size, model_device(model))
    restore_trainable(model, state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"].cpu())
    print_main(f"resumed from {args.output / RESUME_FILE}: epoch {state['epoch'] + 1}, "
               f"{state['history']['steps']} steps done")
    return state["epoch"], state["done"], History(**state["history"])


# --- Training -------------------------------------------------------------------------------------------------

def train_step(step: nn.Module, batch: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, precision) -> float:
    """One optimizer step through the (wrapped) loss module; returns the global batch's mean loss."""
    optimizer.zero_grad()
    with precision.autocast():
        loss_sum, count = step(*batch)  # through the wrapper: DDP synchronises the gradients
    loss, mean = global_mean_loss(loss_sum, count)
    optimizer_step(loss, optimizer, scaler)
    return mean


def fit(job: Job, args: argparse.Namespace, context: DistContext) -> tuple[nn.Module, History]:
    """``--epochs`` epochs of AdamW on this process's shard of every global batch; rank 0 evaluates and logs."""
    step = job.step
    loader = sharded_loader(job.train_set, args.batch_size, seed=args.seed, collate_fn=job.collate)
    steps_per_epoch = min(len(loader), args.max_steps_per_epoch or len(loader))
    if steps_per_epoch == 0:
        raise UsageError(f"{len(job.train_set)} training examples do not fill one global batch of "
                         f"{args.batch_size * context.world_size} (--batch-size x processes): lower --batch-size.")
    precision = precision_for(context.device)
    scaler = precision.grad_scaler()
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    history = History(device=str(context.device), precision=precision.name)
    start_epoch, done = 0, 0
    if args.resume:
        start_epoch, done, history = load_resume(args, step, optimizer, scaler, context.world_size)
    start = clock(context.device) - history.seconds
    bar = tqdm(total=args.epochs * steps_per_epoch, initial=history.steps, desc="fine-tuning",
               disable=not (args.progress and context.is_main))
    for epoch in range(start_epoch, args.epochs):
        set_epoch(loader, epoch)  # the same shuffle on every process, a new one each epoch
        step.train()
        for batch in islice(loader, done, steps_per_epoch):  # a resumed epoch skips the batches already done
            mean = train_step(step, batch, optimizer, scaler, precision)
            history.steps += 1
            history.examples_seen += len(batch[1]) * context.world_size  # lengths: one per example
            history.seconds = clock(context.device) - start
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.3f}", examples_per_s=f"{history.examples_seen / history.seconds:.1f}")
            if context.is_main and history.steps % args.eval_freq == 0:
                job.log_losses(history)
            done += 1
            if history.steps % args.save_every == 0 and done < steps_per_epoch:
                save_resume(args, step, optimizer, scaler, history, epoch, done, context.world_size)
        if context.is_main:
            job.log_epoch(history)
        else:
            history.epochs += 1
        done = 0
        save_resume(args, step, optimizer, scaler, history, epoch + 1, 0, context.world_size)
    bar.close()
    unwrap(step).eval()
    return step, history


# --- Results --------------------------------------------------------------------------------------------------

def run_metrics(job: Job, model: nn.Module, history: History, args: argparse.Namespace,
                context: DistContext) -> dict[str, Any]:
    """What the run measured, for ``metrics.json``."""
    return {"task": args.task, "data": args.data, "model": args.model, "method": args.method,
            "settings": {name: str(value) for name, value in sorted(vars(args).items())},
            "world_size": context.world_size, "backend": context.backend, "device": str(context.device),
            "trainable_params": count_params(model, trainable_only=True), "params": count_params(model),
            "examples_per_second": history.examples_seen / history.seconds if history.seconds else None,
            "history": history_dict(history), **job.final_metrics()}


def finish(job: Job, step: nn.Module, history: History, args: argparse.Namespace,
           context: DistContext) -> dict[str, Any] | None:
    """Rank 0: the checkpoint (without ``module.``), ``metrics.json``, the plots; then ``resume.pt`` goes."""
    save_on_main(step, args.output / job.checkpoint, save=job.save)
    if not context.is_main:
        return None
    metrics = run_metrics(job, unwrap(step), history, args, context)
    config.atomic_write_text(args.output / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    for figure in plot_history(history, PLOT_PREFIX, args.output):
        if figure is not None:
            plt.close(figure)
    (args.output / RESUME_FILE).unlink(missing_ok=True)  # finished: the checkpoint is the result
    print(f"wrote {args.output / job.checkpoint}, {METRICS_FILE} and the plots in {args.output}")
    return metrics


def run(args: argparse.Namespace, context: DistContext) -> tuple[nn.Module, History, dict[str, Any] | None]:
    """Set up the task, train, write the results; returns the (wrapped) step module, the history, the metrics."""
    set_seed(args.seed)
    job = make_job(args, context)
    model = unwrap(job.step)
    print_main(f"{args.task} with {args.model} ({args.method}): trainable {count_params(model, True):,} of "
               f"{count_params(model):,} parameters; {len(job.train_set)} training examples; "
               f"{context.world_size} process(es), global batch {args.batch_size * context.world_size}")
    step, history = fit(job, args, context)
    return step, history, finish(job, step, history, args, context)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.finetune``: 0 when the run finished, 2 (with a message) for bad options or data."""
    try:
        args = parse_args(argv)
        with distributed(args.device) as context:
            run(args, context)
    except (UsageError, own_data.DataFileError, CheckpointError, DistributedError) as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
