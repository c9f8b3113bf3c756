"""How much faster is the course's fine-tuning path than the reference-style one? (GPT-2 124M, CPU.)

Both paths run the classic recipe with the *same* loop (``helpers.train.train_classifier``) and the same
evaluation code; only the batches differ:

* **(a) reference-style**: every text padded to a fixed 120 tokens (the longest training text), logits read at
  the last position (``model(ids)[:, -1, :]``): all 12 blocks and the head at every position, every step.
* **(b) course default**: ``make_batches(..., cache=True)``: the frozen blocks run once per text (length-sorted
  batches), training pads to the batch's longest text and runs the last block at the last real token only.
* **(c) / (d)** (``--lora``): the same two styles with LoRA adapters in every block (``apply_lora``). No cache is
  possible there (every block trains), so (d) gets batch-max padding + last real token + ``forward_last``.

Recipe: 5 epochs, AdamW lr 5e-5 weight decay 0.1, batch 8 (train: shuffled, drop_last), evaluation every 50
steps on 5 batches of train and validation, accuracy on 5 batches of each after every epoch, then accuracy on
the full train/validation/test sets. Random weights (seeded; speed does not depend on the values).

Every path runs in a fresh subprocess, so the peak RSS printed is that path's own.
Data: the real splits (1,045 / 149 / 300 texts) when they are available offline (prepared CSVs in
``COURSE_DATA_DIR``, or ``SMS_SPAM_URLS`` set, plus the tiktoken cache), else synthetic token lists of the
same sizes with SMS-like lengths.

    python benchmarks/finetune_speed.py            # the full recipe, paths a and b (most of an hour on 2 cores)
    python benchmarks/finetune_speed.py --quick    # samples every phase, prints ESTIMATES (< 5 min)
    python benchmarks/finetune_speed.py --quick --lora   # also paths c and d (line ``lora_speedup:``)

When paths a and b run (the default), the last line is ``speedup: <wall time a / wall time b>``.
On a machine where other jobs are running, ``--threads 1`` gives steadier (if slower) figures: with more
threads than free cores, every small operation waits for a descheduled thread.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from helpers.data import SpamDataset, make_loader  # noqa: E402
from helpers.fastpath import Batches, Forward, make_batches  # noqa: E402
from helpers.models.base import add_classifier_head, set_seed  # noqa: E402
from helpers.models.gpt2 import PRESETS, GPT2Config, GPT2Model  # noqa: E402
from helpers.train import TrainConfig, batch_loss, calc_accuracy, train_classifier  # noqa: E402

SEED = 123
SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 1045, "validation": 149, "test": 300}  # the course's balanced 70/10/20 split
FIXED_PAD = 120  # reference: every text padded to the longest training text
TARGETS = {"speedup": 6.0, "rss_gib_b": 1.5}

# --quick: what is sampled (then extrapolated to the full recipe)
QUICK_FRACTION = 0.12  # of every split: the texts that are cached / batched
QUICK_EVAL_ITER = 1  # batches per evaluation (the recipe uses 5; the cost per batch is what we measure)
QUICK_FINAL_BATCHES = 1  # per split, for the final accuracy


# --- The paths ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PathSpec:
    """One way to fine-tune: how batches are fed (``style``) and what trains (``lora``)."""

    title: str
    style: str  # "reference": fixed padding + last position + full forward; "course": make_batches(cache=True)
    lora: bool
    quick_steps: int  # training steps timed by --quick


PATHS: dict[str, PathSpec] = {
    "a": PathSpec("reference-style: pad to 120, logits at the last position, full forward", "reference", False, 6),
    "b": PathSpec("course: make_batches(cache=True), frozen-block cache, last real token", "course", False, 12),
    "c": PathSpec("reference-style LoRA: pad to 120, last position, full forward", "reference", True, 8),
    "d": PathSpec("course LoRA: batch-max padding, last real token, forward_last", "course", True, 8),
}
#: (printed name, slow path, fast path); the printed ratio is time(slow) / time(fast)
COMPARISONS: list[tuple[str, str, str]] = [("lora_speedup", "c", "d"), ("speedup", "a", "b")]


def reference_forward(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The reference's classification logits: the whole model, read at the last (usually padding) position."""
    return model(ids)[:, -1, :]


def seeded_classifier(preset: str, lora: bool) -> nn.Module:
    """Seeded random GPT-2 with the 2-class head (last block + final norm train), or LoRA on every block."""
    set_seed(SEED)
    model = add_classifier_head(GPT2Model(model_config(preset)), num_classes=2, trainable_blocks=1)
    if lora:
        from helpers.lora import apply_lora

        apply_lora(model, rank=16, alpha=16, seed=SEED)
    return model


def model_config(preset: str) -> GPT2Config:
    """A GPT-2 preset; ``tiny`` is only for checking this script quickly (timings meaningless)."""
    if preset == "tiny":
        return GPT2Config(emb_dim=64, n_heads=2, n_layers=4, context_length=256)
    return PRESETS[preset]


def path_batches(spec: PathSpec, model: nn.Module, dataset: SpamDataset, train: bool) -> Batches:
    """The batches of one split for a path (train: shuffled, drop_last; others: in order, all texts)."""
    if spec.style == "reference":
        loader = make_loader(dataset, batch_size=8, shuffle=train, drop_last=train, pad_to=FIXED_PAD, seed=SEED)
        return Batches(loader, reference_forward, cached=False)
    return make_batches(model, dataset, batch_size=8, shuffle=train, drop_last=train, cache=True, seed=SEED,
                        progress=False)


# --- Data ---------------------------------------------------------------------------------------------

class IdTokenizer:
    """Synthetic 'texts' are space-separated token ids; this tokenizer just reads them back."""

    name, pad_id, vocab_size = "ids", 50256, 50257

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


def synthetic_splits(seed: int = SEED) -> tuple[dict[str, pd.DataFrame], IdTokenizer]:
    """Splits of the real sizes with SMS-like GPT-2 token lengths (lognormal, mean ~31, longest train text 120)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in SPLIT_SIZES.items():
        lengths = np.clip(np.rint(rng.lognormal(3.25, 0.6, size=n)), 2, FIXED_PAD).astype(int)
        if name == "train":
            lengths[int(np.argmax(lengths))] = FIXED_PAD
        texts = [" ".join(map(str, rng.integers(0, 50256, size=k))) for k in lengths]
        splits[name] = pd.DataFrame({"Label": [i % 2 for i in range(n)], "Text": texts})
    return splits, IdTokenizer()


def real_data_available() -> bool:
    """True when the real splits can be prepared offline (CSVs or the raw file there, or SMS_SPAM_URLS set)."""
    from helpers.data import splits_dir

    folder = splits_dir()
    raw = folder.parent / "sms_spam_collection" / "SMSSpamCollection"
    csvs = all((folder / f"{s}.csv").exists() for s in SPLITS)
    return csvs or raw.exists() or bool(os.environ.get("SMS_SPAM_URLS"))


def load_datasets(source: str) -> dict[str, SpamDataset]:
    """Train/validation/test datasets; validation and test are truncated to the longest training text."""
    if source == "real":
        from helpers.data import load_splits
        from helpers.models.gpt2 import gpt2_tokenizer

        splits, tokenizer = load_splits(), gpt2_tokenizer()
    else:
        splits, tokenizer = synthetic_splits()
    train = SpamDataset(splits["train"], tokenizer)
    return {"train": train, **{s: SpamDataset(splits[s], tokenizer, max_length=train.max_length) for s in SPLITS[1:]}}


def subset(dataset: SpamDataset, fraction: float, seed: int = SEED) -> SpamDataset:
    """A seeded random ``fraction`` of the texts (at least 16), same padding id and max_length."""
    n = min(len(dataset), max(16, round(len(dataset) * fraction)))
    keep = sorted(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False).tolist())
    part = copy.copy(dataset)
    part.encoded, part.labels = [dataset.encoded[i] for i in keep], [dataset.labels[i] for i in keep]
    return part


def describe(datasets: dict[str, SpamDataset]) -> str:
    lengths = np.array([len(ids) for ids in datasets["train"].encoded])
    sizes = "/".join(str(len(d)) for d in datasets.values())
    return (f"{sizes} texts; train tokens mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
            f"max {lengths.max()}")


# --- Measuring one path (in its own process) ----------------------------------------------------------

def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Meter:
    """Time and number of evaluation (no-grad) forward passes."""

    seconds: float = 0.0
    batches: int = 0


def metered(forward: Forward, meter: Meter, device: torch.device) -> Forward:
    """``forward`` that adds its no-grad calls (evaluation, accuracy) to ``meter``; training calls pass through."""
    def wrapped(model: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return forward(model, inputs, lengths)
        start = clock(device)
        out = forward(model, inputs, lengths)
        meter.seconds += clock(device) - start
        meter.batches += 1
        return out
    return wrapped


@dataclass
class Phase:
    """Seconds measured for ``measured`` units; the full recipe needs ``full`` units."""

    seconds: float
    measured: int
    full: int
    unit: str

    @property
    def estimate(self) -> float:
        return self.seconds * self.full / self.measured if self.measured else self.seconds


@dataclass
class PathResult:
    key: str
    quick: bool
    phases: dict[str, Phase]
    accuracy: dict[str, float]
    peak_rss_bytes: int
    trainable_params: int
    threads: int
    process_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(p.estimate for p in self.phases.values())


def warm_up(model: nn.Module, batches: Batches) -> None:
    """One forward/backward/AdamW step (lr 0) and one no-grad forward on two texts: lazy imports and first-call
    costs happen here, not in the timed sample. The weights do not change."""
    params = [p for p in model.parameters() if p.requires_grad]
    batch = tuple(t[:2] for t in next(iter(batches)))
    batch_loss(model, batches.forward, batch).backward()
    torch.optim.AdamW(params, lr=0.0, weight_decay=0.0).step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        batch_loss(model, batches.forward, batch)


def recipe_counts(datasets: dict[str, SpamDataset], cfg: TrainConfig) -> dict[str, int]:
    """Units of work in the full recipe: tokens to cache, steps, evaluation and final-accuracy batches."""
    n_batches = {s: -(-len(d) // cfg.batch_size) for s, d in datasets.items()}
    train_batches = len(datasets["train"]) // cfg.batch_size  # drop_last
    steps = cfg.epochs * train_batches
    per_eval = min(cfg.eval_iter, train_batches) + min(cfg.eval_iter, n_batches["validation"])
    return {
        "tokens": sum(len(ids) for d in datasets.values() for ids in d.encoded),
        "steps": steps,
        "eval_batches": (steps // cfg.eval_freq + cfg.epochs) * per_eval,
        "final_batches": train_batches + n_batches["validation"] + n_batches["test"],
    }


def measure_path(key: str, quick: bool, source: str, preset: str, device: torch.device,
                 steps: int | None = None) -> PathResult:
    """Run (a sample of) the recipe for one path and time each phase."""
    started = time.perf_counter()
    spec = PATHS[key]
    full_data = load_datasets(source)
    full_cfg = TrainConfig()
    counts = recipe_counts(full_data, full_cfg)
    data = {s: subset(d, QUICK_FRACTION) for s, d in full_data.items()} if quick else full_data
    n_steps = steps or spec.quick_steps
    if quick and len(data["train"]) // full_cfg.batch_size < n_steps:
        raise ValueError(f"--quick samples {len(data['train'])} training texts: too few for {n_steps} steps.")
    cfg = TrainConfig(epochs=1, max_steps_per_epoch=n_steps, eval_freq=n_steps, eval_iter=QUICK_EVAL_ITER) \
        if quick else full_cfg

    model = seeded_classifier(preset, spec.lora).to(device)
    meter = Meter()
    if quick:  # the first forward pays one-off costs; keep them out of the sampled cache pass
        with torch.no_grad():
            model.forward_hidden(torch.zeros(2, 16, dtype=torch.long, device=device))

    start = clock(device)  # phase 1: batching (and the frozen-block cache pass of the course path)
    batches = {}
    for s, d in data.items():
        b = path_batches(spec, model, d, train=s == "train")
        batches[s] = Batches(b.loader, metered(b.forward, meter, device), b.cached)
    cache_seconds = clock(device) - start

    if quick:  # one untimed step (lr 0: weights unchanged), so one-off start-up costs are not extrapolated
        warm_up(model, batches["validation"])
        meter.seconds, meter.batches = 0.0, 0

    history = train_classifier(model, batches["train"], batches["validation"], cfg, progress=False)
    eval_seconds, eval_batches = meter.seconds, meter.batches  # phase 3 happened inside phase 2

    start = clock(device)  # phase 4: accuracy on the full train/validation/test sets
    accuracy = {s: calc_accuracy(model, b, QUICK_FINAL_BATCHES if quick else None) for s, b in batches.items()}
    final_seconds = clock(device) - start

    phases = {
        "batching / cache pass": Phase(cache_seconds, sum(len(i) for d in data.values() for i in d.encoded),
                                       counts["tokens"], "tokens"),
        "training": Phase(history.seconds - eval_seconds, history.steps, counts["steps"], "steps"),
        "evaluation (during training)": Phase(eval_seconds, eval_batches, counts["eval_batches"], "batches"),
        "final accuracy (train/val/test)": Phase(final_seconds, meter.batches - eval_batches,
                                                 counts["final_batches"], "batches"),
    }
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return PathResult(
        key=key, quick=quick, phases=phases, accuracy=accuracy,
        peak_rss_bytes=ru if sys.platform == "darwin" else ru * 1024,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        threads=torch.get_num_threads(), process_seconds=time.perf_counter() - started,
        notes=[] if batches["train"].cached or spec.style == "reference" else ["no frozen-block cache possible"],
    )


def result_from_json(raw: dict) -> PathResult:
    raw["phases"] = {name: Phase(**p) for name, p in raw["phases"].items()}
    return PathResult(**raw)


def run_child(key: str, args: argparse.Namespace) -> PathResult:
    """Measure one path in a fresh Python process (its own peak RSS), echoing its stderr."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", key, "--data", args.data,
               "--preset", args.preset, "--device", args.device]
    if args.quick:
        command.append("--quick")
    if args.steps:
        command += ["--steps", str(args.steps)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    if done.returncode:
        raise SystemExit(f"path {key} failed (exit {done.returncode}); its error is printed above.")
    return result_from_json(json.loads(done.stdout.strip().splitlines()[-1]))


# --- Report -------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gib(n_bytes: int) -> float:
    return n_bytes / 2**30


def print_path(result: PathResult) -> None:
    spec = PATHS[result.key]
    quick = result.quick
    print(f"\n[{result.key}] {spec.title}")
    print(f"    trainable parameters {result.trainable_params:,}; torch threads {result.threads}"
          + "".join(f"; {n}" for n in result.notes))
    if quick:
        print(f"    {'phase':34s} {'sampled':>22s} {'full recipe':>16s} {'ESTIMATE':>10s}")
    for name, p in result.phases.items():
        if quick:
            sample = f"{p.seconds:7.2f} s / {p.measured} {p.unit}"
            print(f"    {name:34s} {sample:>22s} {p.full:>9} {p.unit:6s} {p.estimate:9.1f} s")
        else:
            print(f"    {name:34s} {p.seconds:9.1f} s   ({p.measured} {p.unit})")
    print(f"    {'wall time' + (' (ESTIMATE)' if quick else ''):34s} {'':>{39 if quick else 0}}{result.total:9.1f} s")
    print(f"    peak RSS {gib(result.peak_rss_bytes):.2f} GiB (this path's process; whole run "
          f"{result.process_seconds:.0f} s incl. model set-up)")
    acc = ", ".join(f"{s} {a * 100:.1f}%" for s, a in result.accuracy.items())
    print(f"    accuracy{' (after the sampled steps only, not the recipe)' if quick else ''}: {acc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="time samples of every phase and extrapolate (< 5 min)")
    parser.add_argument("--lora", action="store_true", help="also compare reference-style LoRA (c) vs course LoRA (d)")
    parser.add_argument("--paths", default=None, help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto")
    parser.add_argument("--steps", type=int, default=None, help="--quick: training steps per path (default per path)")
    parser.add_argument("--preset", default="gpt2", choices=[*PRESETS, "tiny"], help="tiny: checks the script only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own); 1 is steadier on a machine that is busy")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--child", choices=list(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child:  # one path, result as one JSON line on stdout
        result = measure_path(args.child, args.quick, args.data, args.preset, device, args.steps)
        print(json.dumps(asdict(result)))
        return 0

    if args.data == "auto":
        args.data = "real" if real_data_available() else "synthetic"
    keys = args.paths.split(",") if args.paths else ["a", "b", *(["c", "d"] if args.lora else [])]
    unknown = [k for k in keys if k not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {list(PATHS)}")

    print("Fine-tuning speed: reference-style vs course paths, GPT-2 classifier, classic recipe")
    print(f"  model {args.preset} (random weights, seed {SEED}); 5 epochs, AdamW lr 5e-5 wd 0.1, batch 8, "
          "eval every 50 steps on 5 batches")
    print(f"  CPU {cpu_model()} ({os.cpu_count()} cores); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; device {device}; Python {platform.python_version()}")
    print(f"  data: {args.data}: {describe(load_datasets(args.data))}")
    if args.quick:
        print(f"  QUICK MODE: phases are sampled ({QUICK_FRACTION:.0%} of every split, a few training steps, "
              f"{QUICK_EVAL_ITER}-batch evaluations) and extrapolated.\n"
              "  All times below marked ESTIMATE are ESTIMATES of the full recipe, not measurements.")
    sys.stdout.flush()

    results = {}
    for key in keys:
        print(f"\nrunning path {key} in a fresh process ...", file=sys.stderr, flush=True)
        results[key] = run_child(key, args)
        print_path(results[key])
        sys.stdout.flush()

    print()
    ratios = {name: results[slow].total / results[fast].total
              for name, slow, fast in COMPARISONS if slow in results and fast in results}
    missed = []
    if "b" in results and gib(results["b"].peak_rss_bytes) > TARGETS["rss_gib_b"]:
        missed.append(f"peak RSS of (b) {gib(results['b'].peak_rss_bytes):.2f} GiB > {TARGETS['rss_gib_b']} GiB")
    if ratios.get("speedup", TARGETS["speedup"]) < TARGETS["speedup"]:
        missed.append(f"speedup {ratios['speedup']:.2f} < {TARGETS['speedup']}")
    print(f"targets (speedup >= {TARGETS['speedup']}, peak RSS of b <= {TARGETS['rss_gib_b']} GiB): "
          + ("; ".join(missed) if missed else "met") + (" [ESTIMATES]" if args.quick else ""))
    print("wall time " + ", ".join(f"{k} {r.total:.1f} s" for k, r in results.items())
          + (" (ESTIMATES)" if args.quick else ""))
    for name, ratio in ratios.items():  # "speedup" last: the final line
        print(f"{name}: {ratio:.2f}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
