"""Run ONE configuration of the course's classification recipe and append its row to a CSV (notebook 09).

    python scripts/experiments.py --trainable last-block --lr 1e-4      # row "last block, lr 0.0001, 5 epochs"
    python scripts/experiments.py --run-list results/experiments.txt      # every row of the shipped table

A row holds the configuration, the trainable parameters, train / validation / test accuracy, the training time
(frozen-block cache + training), the peak memory, and what is needed to reproduce and judge it: the exact
command, the git commit, date, device, torch version and the machine's load average (time depends on load,
accuracy does not). Compare configurations on **validation** accuracy; test accuracy is reported, never used
to choose.

The script only wires options to ``helpers``: the model registry, ``data`` / ``own_data`` for the splits,
``fastpath`` for batches (and the reading position), ``train`` for the loop, ``lora`` for LoRA / QLoRA.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helpers import config, data, fastpath, lora, memory, own_data, train  # noqa: E402
from helpers.models import build_model, load_model  # noqa: E402
from helpers.models.base import add_classifier_head, count_params, pick_device, set_seed  # noqa: E402
from helpers.models.gpt2 import PRESETS  # noqa: E402

DEFAULT_OUT = Path("results/experiments.csv")
TRAINABLE = ("head", "last-block", "last-k", "all", "lora", "qlora")
COLUMNS = ("name", "status", "model", "weights", "trainable", "position", "padding", "epochs", "lr", "batch_size",
           "seed", "data", "classes", "trainable_params", "total_params", "train_acc", "val_acc", "test_acc",
           "steps", "train_seconds", "cache_seconds", "peak_rss_mb", "rss_after_load_mb", "peak_gpu_mb",
           "load_avg_5min", "cpus", "device", "torch", "date", "commit", "command")


# --- Options -------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python scripts/experiments.py",
        description="Run one configuration of the classification recipe and append one row (configuration, "
                    "trainable parameters, train/validation/test accuracy, training time, peak memory, command, "
                    "commit, date, device, torch version, load average) to a CSV. Compare rows on validation "
                    "accuracy; test accuracy is reported, not used to choose.",
        epilog="The device is chosen by COURSE_DEVICE (else cuda -> mps -> cpu); data and downloads go to "
               "COURSE_DATA_DIR. Notebook 09 shows the table.")
    what = parser.add_argument_group("the model and what trains")
    what.add_argument("--model", default="smollm2-135m",
                      help="smollm2-135m (installed with the course), a GPT-2 preset (gpt2, gpt2-medium, gpt2-large, "
                           "gpt2-xl: downloaded once) or a GPT-2 checkpoint folder (default: %(default)s)")
    what.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                      help="pretrained weights, or the same architecture freshly initialised (seeded by --seed) (default: %(default)s)")
    what.add_argument("--trainable", choices=TRAINABLE, default="last-block",
                      help="what trains: head = the new classification head only; last-block = the last block, the "
                           "final norm and the head (the course recipe); last-k = the last --k blocks + final norm + "
                           "head; all = every parameter, embeddings included; lora / qlora = LoRA adapters on every "
                           "Linear of the blocks (qlora: base weights stored in 4-bit NF4) + the head (default: %(default)s)")
    what.add_argument("--k", type=int, default=2, help="number of trained blocks for --trainable last-k (default: %(default)s)")
    what.add_argument("--rank", type=int, default=16, help="LoRA rank for --trainable lora / qlora (default: %(default)s)")
    what.add_argument("--alpha", type=float, default=16, help="LoRA alpha (scale alpha/rank) for lora / qlora (default: %(default)s)")
    read = parser.add_argument_group("where the classifier reads, and the padding")
    read.add_argument("--position", choices=fastpath.READ_POSITIONS, default="last-real-token",
                      help="last-real-token = each text's last real token (the course); first = position 0, which "
                           "has seen only the first token; last-position = the last position of the padded input, "
                           "after the padding (the reference implementation; use with --padding fixed) (default: %(default)s)")
    read.add_argument("--padding", choices=("batch-max", "fixed"), default="batch-max",
                      help="batch-max = each batch padded to its longest text; fixed = every text padded (or cut) to "
                           "--pad-to tokens, the padding becoming part of the input (only with --position "
                           "last-position: the other positions never see what follows them) (default: %(default)s)")
    read.add_argument("--pad-to", type=int, default=None,
                      help="length for --padding fixed (default: the longest training text)")
    recipe = parser.add_argument_group("training")
    recipe.add_argument("--epochs", type=int, default=5, help="passes over the training split (default: %(default)s)")
    recipe.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate, weight decay 0.1 (default: %(default)s)")
    recipe.add_argument("--batch-size", type=int, default=8, help="texts per training step (default: %(default)s)")
    recipe.add_argument("--seed", type=int, default=123,
                        help="seed of the new head, LoRA's A, random weights and the shuffling (the split itself "
                             "always uses the course's seed 123, so every row sees the same texts) (default: %(default)s)")
    recipe.add_argument("--max-steps", type=int, default=None,
                        help="at most this many steps per epoch: a quick check that the row runs (marked so in "
                             "its status), not a result")
    source = parser.add_argument_group("data")
    source.add_argument("--data", default="sms",
                        help="sms = the SMS Spam Collection split of notebook 03; or a labelled CSV / TSV / JSONL / "
                             "JSON file of your own (split 70/10/20 per label by helpers.own_data) (default: %(default)s)")
    source.add_argument("--text-column", default="text", help="column (or field) holding the text, for --data FILE (default: %(default)s)")
    source.add_argument("--label-column", default="label", help="column (or field) holding the label, for --data FILE (default: %(default)s)")
    recipe.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (default: PyTorch's choice, one per core). On a machine busy "
                             "with other work, 1 can be several times faster than 2 (threads wait for each other); "
                             "the row records the number used")
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="CSV to append the row to; relative paths start at the repository (default: %(default)s)")
    output.add_argument("--run-list", type=Path, default=None, metavar="FILE",
                        help="instead of one row: run every command line of FILE (options of this script, one row a "
                             "line, # comments), each in its own process with --out and --threads added when given, "
                             "skipping rows already in --out for the same command and commit (so an interrupted run "
                             "resumes)")
    return parser


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse combinations that cannot mean anything, with the reason."""
    if args.padding == "fixed" and args.position != "last-position":
        parser.error(f"--padding fixed only matters with --position last-position: reading at {args.position}, the "
                     "model never sees the padding after it (the attention is causal), so the predictions equal "
                     "--padding batch-max.")
    if args.pad_to is not None and args.padding != "fixed":
        parser.error("--pad-to needs --padding fixed.")
    for option in ("k", "epochs", "batch_size", "rank", "pad_to", "max_steps", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {value}.")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}.")


def trainable_label(args: argparse.Namespace) -> str:
    """``last-k`` -> ``last-2-blocks``; ``lora`` -> ``lora (r=16, alpha=16)``."""
    if args.trainable == "last-k":
        return f"last-{args.k}-blocks"
    if args.trainable in ("lora", "qlora"):
        return f"{args.trainable} (r={args.rank}, alpha={args.alpha:g})"
    return args.trainable


def row_name(args: argparse.Namespace) -> str:
    """The row's name, built from the options so that it always says what ran: what trains, then only what
    differs from the course recipe (where it reads, random weights, another model or data file), then the
    learning rate and epochs, e.g. ``head only, lr 0.0001, 5 epochs`` or ``last block, read at the first token,
    lr 0.0001, 5 epochs``."""
    trains = {"head": "head only", "last-block": "last block", "last-k": f"last {args.k} blocks",
              "all": "all layers", "lora": f"LoRA r{args.rank} alpha {args.alpha:g}",
              "qlora": f"QLoRA r{args.rank} alpha {args.alpha:g}"}[args.trainable]
    parts = [trains]
    if args.position == "first":
        parts.append("read at the first token")
    elif args.position == "last-position":
        parts.append("read at the last position" + (", every text padded to one length"
                                                     if args.padding == "fixed" else ""))
    if args.weights == "random":
        parts.append("random weights")
    if args.model != "smollm2-135m":
        parts.append(f"model {args.model}")
    if args.data != "sms":
        parts.append(f"data {Path(args.data).name}")
    if args.batch_size != 8:
        parts.append(f"batch {args.batch_size}")
    if args.seed != 123:
        parts.append(f"seed {args.seed}")
    parts += [f"lr {args.lr:g}", f"{args.epochs} epochs"]
    return ", ".join(parts)


# --- One configuration ------------------------------------------------------------------------------------

def load(name: str, weights: str, seed: int):
    """The model by name, pretrained or freshly initialised (same architecture and tokenizer, seeded)."""
    if weights == "random" and name in PRESETS:  # no need to download weights we would throw away
        set_seed(seed)
        return build_model("GPT2Model", asdict(PRESETS[name]))
    model = load_model(name)
    if weights == "pretrained":
        return model
    set_seed(seed)
    return build_model(type(model).__name__, asdict(model.cfg))


def load_data(args: argparse.Namespace) -> tuple[dict, dict[str, int]]:
    """The train / validation / test DataFrames and the label map (name -> id)."""
    if args.data == "sms":
        return data.load_splits(), dict(data.LABELS)
    df, label_map = own_data.load_labelled(args.data, args.text_column, args.label_column)
    return own_data.stratified_split(df), label_map


def make_trainable(model, args: argparse.Namespace, num_classes: int):
    """The new head, then unfreeze what ``--trainable`` says (``add_classifier_head`` / ``apply_lora``)."""
    n_layers = len(model.blocks)
    if args.trainable == "last-k" and args.k > n_layers:
        raise SystemExit(f"--k {args.k}: the model has only {n_layers} blocks.")
    blocks = {"last-block": 1, "last-k": args.k, "all": n_layers}.get(args.trainable, 0)
    add_classifier_head(model, num_classes=num_classes, trainable_blocks=blocks, seed=args.seed)
    if args.trainable == "head":
        model.final_norm.requires_grad_(False)  # only the new Linear layer learns
    elif args.trainable == "all":
        model.requires_grad_(True)  # the embeddings too
    elif args.trainable in ("lora", "qlora"):
        apply = lora.apply_qlora if args.trainable == "qlora" else lora.apply_lora
        apply(model, rank=args.rank, alpha=args.alpha, seed=args.seed)
    return model


def run_configuration(args: argparse.Namespace) -> dict:
    """Train one configuration and measure it; returns the row (every column but the provenance)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    device = pick_device()
    model = load(args.model, args.weights, args.seed)
    splits, label_map = load_data(args)
    datasets = data.tokenize_splits(splits, model.tokenizer, context_length=model.cfg.context_length,
                                    labels=label_map)
    padding = args.padding
    if args.padding == "fixed":
        pad_to = min(args.pad_to or datasets["train"].max_length, model.cfg.context_length)
        datasets = {name: data.pad_every_text(ds, pad_to) for name, ds in datasets.items()}
        padding = f"fixed ({pad_to} tokens)"
    make_trainable(model, args, num_classes=len(label_map)).to(device)
    rss_after_load = memory.reset_peak_rss()  # the peak is measured from here: tokenized data and model loaded
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Batches of cached frozen blocks where possible; the last position after batch-max padding must see the
    # real pad tokens, which the cache does not keep.
    cache = not (args.position == "last-position" and args.padding == "batch-max")
    start = time.perf_counter()
    # Padded batches (pack=False): every position is one text's, and the shipped rows were measured this way.
    batches = fastpath.split_batches(model, datasets, batch_size=args.batch_size, cache=cache, seed=args.seed,
                                     pack=False)
    batches = {name: fastpath.read_at(split, args.position) for name, split in batches.items()}
    cache_seconds = time.perf_counter() - start if batches["train"].cached else 0.0
    cfg = train.TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                            max_steps_per_epoch=args.max_steps)
    history = train.train_classifier(model, batches["train"], batches["validation"], cfg)
    train_seconds = time.perf_counter() - start
    accuracy = train.accuracies(model, batches)
    peak = memory.peak_rss()
    return {
        "name": row_name(args),
        "status": "measured" if args.max_steps is None else f"quick check (--max-steps {args.max_steps})",
        "model": args.model, "weights": args.weights, "trainable": trainable_label(args),
        "position": args.position, "padding": padding, "epochs": args.epochs, "lr": args.lr,
        "batch_size": args.batch_size, "seed": args.seed, "data": args.data, "classes": len(label_map),
        "trainable_params": count_params(model, trainable_only=True), "total_params": count_params(model),
        "train_acc": round(accuracy["train"], 4), "val_acc": round(accuracy["validation"], 4),
        "test_acc": round(accuracy["test"], 4), "steps": history.steps,
        "train_seconds": round(train_seconds, 1), "cache_seconds": round(cache_seconds, 1),
        "peak_rss_mb": _mb(peak), "rss_after_load_mb": _mb(rss_after_load),
        "peak_gpu_mb": _mb(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else "",
        "device": describe_device(device),
    }


def _mb(n_bytes: int | None) -> float | str:
    return "" if n_bytes is None else round(n_bytes / 1e6, 1)


# --- Provenance, and the CSV ------------------------------------------------------------------------------

def describe_device(device: torch.device) -> str:
    """``cpu (2 threads)``, ``cuda (NVIDIA H100 80GB HBM3)``, ..."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    return device.type


def git_commit() -> str:
    """The commit the code ran on; ``+changes`` when the code that runs (helpers/, scripts/, requirements.txt)
    differs from it. Notebooks, docs and results/ may change while a table is being measured."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "helpers", "scripts", "requirements.txt")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+changes" if changed else "")


def command_line(argv: list[str]) -> str:
    """The command that reproduces the row, as typed in the repository folder."""
    return shlex.join(["python", "scripts/experiments.py", *argv])


def provenance(argv: list[str]) -> dict:
    return {"load_avg_5min": round(os.getloadavg()[1], 2) if hasattr(os, "getloadavg") else "",
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": git_commit(), "command": command_line(argv)}


def resolve(path: Path) -> Path:
    return path if path.is_absolute() else ROOT / path


def read_rows(path: Path) -> list[dict]:
    """The rows of a results CSV (none when it does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` under a lock, atomically (the file is rewritten whole through a temporary file)."""
    path = resolve(path)
    with config.file_lock(path):
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        header = old.splitlines()[0].split(",") if old else list(COLUMNS)
        if header != list(COLUMNS):
            raise SystemExit(f"{path} has other columns ({header}); pass --out with a new file name.")
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        if not old:
            writer.writeheader()
        writer.writerow({column: row.get(column, "") for column in COLUMNS})
        config.atomic_write_text(path, old + out.getvalue())


def run_list(list_file: Path, out: Path, threads: int | None = None) -> int:
    """Run every command of ``list_file`` in its own process (so each row's memory peak is its own); ``--out``
    and ``--threads``, when given, are added to each command."""
    lines = [line.strip() for line in resolve(list_file).read_text(encoding="utf-8").splitlines()]
    extra = (["--threads", str(threads)] if threads else []) + (["--out", str(out)] if out != DEFAULT_OUT else [])
    commands = [[*shlex.split(line), *extra] for line in lines if line and not line.startswith("#")]
    commit, failed = git_commit(), 0
    for number, argv in enumerate(commands, start=1):
        done = {(r["command"], r["commit"]) for r in read_rows(resolve(out))}
        if (command_line(argv), commit) in done and not commit.endswith("+changes"):
            print(f"[{number}/{len(commands)}] already in {out} for this commit: {command_line(argv)}")
            continue
        print(f"[{number}/{len(commands)}] {command_line(argv)}", flush=True)
        result = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], cwd=ROOT)
        failed += result.returncode != 0
    print(f"{len(commands) - failed} of {len(commands)} rows in {out}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run_list is not None:
        return run_list(args.run_list, args.out, args.threads)
    check_options(parser, args)
    row = {**run_configuration(args), **provenance(argv)}
    append_row(args.out, row)
    print(f"{row['name']}: validation {row['val_acc']:.2%}, test {row['test_acc']:.2%}, train {row['train_acc']:.2%}; "
          f"{row['trainable_params']:,} trainable parameters; {row['train_seconds']} s; peak {row['peak_rss_mb']} MB "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
