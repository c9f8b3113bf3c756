"""How much faster is the course's fine-tuning than the reference-style one? (GPT-2 124M shapes, CPU.)

Four paths on the course's SMS splits (1,045 / 149 / 300 texts, GPT-2 tokens), with the course's own batching,
loss and training code (``helpers``); random weights (seeded: speed does not depend on the values):

* (a) reference-style classifier: every text padded to 120 tokens, logits at the last position
  (``model(ids)[:, -1]``): all 12 blocks at every position, every step. Last block, final norm and head train.
* (b) course classifier: ``fastpath.split_batches``: frozen blocks computed once per text, batches packed,
  the last block at the last real token only. The same parameters train.
* (c) reference-style LoRA (rank 16, every Linear of the blocks): pad to 120, last position, full forward.
* (d) course LoRA: packed batches (no padding is computed), last real token (``forward_last``).

``speedup`` = wall time (a) / wall time (b) of the classic recipe end to end (5 epochs, AdamW lr 5e-5 wd 0.1,
batch 8, evaluation every 50 steps on 5 batches, accuracy each epoch, final accuracy on every split).
(b) is always run end to end (~90 s on 2 cores). (a) is too, unless ``--quick``: then a few of its steps and
evaluation batches are timed and scaled to the recipe's counts, and every such number says "estimate".

``lora_speedup`` = median time of (one training step + one evaluation pass) on a batch, (c) / (d), both measured
on the SAME ``--lora-batches`` (>= 20) training batches, the two paths interleaved batch by batch so that
the machine's load affects both alike.

    python benchmarks/finetune_speed.py --quick                 # (a) estimated, the rest measured: ~5 min
    python benchmarks/finetune_speed.py                         # (a) measured too: ~25 more minutes
    python benchmarks/finetune_speed.py --quick --preset tiny   # checks the script in a minute

Results: printed, and written to ``outputs/benchmark.json`` (``--json PATH``). Run it on a quiet machine; the
load average is printed and recorded, and both paths of a ratio are always measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from course_run.report import cpu_name  # noqa: E402
from helpers import config  # noqa: E402
from helpers.data import collate, collate_packed, load_splits, make_loader, tokenize_splits  # noqa: E402
from helpers.fastpath import Batches, Forward, split_batches  # noqa: E402
from helpers.lora import apply_lora, apply_qlora  # noqa: E402
from helpers.models.base import add_classifier_head, packed_last_token_logits, set_seed  # noqa: E402
from helpers.models.gpt2 import PRESETS, GPT2Config, GPT2Model, gpt2_tokenizer  # noqa: E402
from helpers.train import TrainConfig, accuracies, batch_loss, train_classifier  # noqa: E402

SEED, FIXED_PAD, BATCH = 123, 120, 8


def reference_forward(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The reference's classification logits: the whole model, read at the last (usually padding) position."""
    return model(ids)[:, -1, :]


def model_config(preset: str) -> GPT2Config:
    """A GPT-2 preset's sizes; ``tiny`` only checks the scripts (its timings mean nothing)."""
    return GPT2Config(emb_dim=64, n_heads=2, n_layers=4, context_length=256) if preset == "tiny" else PRESETS[preset]


def classifier(preset: str, lora: bool, quantize: bool = False) -> nn.Module:
    """Seeded random GPT-2 with the 2-class head: last block + final norm train, or LoRA (QLoRA: ``quantize``)
    on every block."""
    set_seed(SEED)
    model = add_classifier_head(GPT2Model(model_config(preset)), num_classes=2, trainable_blocks=1, seed=SEED)
    if not lora:
        return model
    return (apply_qlora if quantize else apply_lora)(model, rank=16, alpha=16, seed=SEED)


def reference_batches(datasets: dict) -> dict[str, Batches]:
    """(a)/(c): every text padded to 120 tokens, read at the last position (training shuffled, drop_last)."""
    return {name: Batches(make_loader(ds, BATCH, shuffle=name == "train", drop_last=name == "train",
                                      pad_to=FIXED_PAD, seed=SEED), reference_forward, cached=False)
            for name, ds in datasets.items()}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, forward: Forward, batch: tuple) -> None:
    model.train()
    optimizer.zero_grad()
    batch_loss(model, forward, batch).backward()
    optimizer.step()


@torch.no_grad()
def eval_pass(model: nn.Module, forward: Forward, batch: tuple) -> None:
    model.eval()
    batch_loss(model, forward, batch)


def recipe(model: nn.Module, batches: dict[str, Batches], cfg: TrainConfig) -> dict:
    """The classic recipe on ``batches``: training (with its evaluations), then accuracy on every split."""
    history = train_classifier(model, batches["train"], batches["validation"], cfg, progress=False)
    start = time.perf_counter()
    final = accuracies(model, batches)
    return {"train_seconds": history.seconds, "final_accuracy_seconds": time.perf_counter() - start,
            "steps": history.steps, "accuracy": final}


def recipe_counts(batches: dict[str, Batches], cfg: TrainConfig) -> dict[str, int]:
    """Training steps and evaluation batches of the recipe (evaluations, per-epoch accuracy, final accuracy)."""
    steps = cfg.epochs * len(batches["train"])
    per_eval = min(cfg.eval_iter, len(batches["train"])) + min(cfg.eval_iter, len(batches["validation"]))
    return {"steps": steps, "eval_batches": (steps // cfg.eval_freq + cfg.epochs) * per_eval
            + sum(len(b) for b in batches.values())}


def path_b(preset: str, datasets: dict, cfg: TrainConfig) -> dict:
    """(b), measured end to end: batching and the frozen-block cache pass, training, final accuracy."""
    model = classifier(preset, lora=False)
    start = time.perf_counter()
    batches = split_batches(model, datasets, batch_size=BATCH, seed=SEED)
    cache_seconds = time.perf_counter() - start
    result = recipe(model, batches, cfg)
    result["cache_seconds"] = cache_seconds
    result["wall_seconds"] = cache_seconds + result["train_seconds"] + result["final_accuracy_seconds"]
    return result


def path_a(preset: str, datasets: dict, cfg: TrainConfig, quick: bool, samples: int) -> dict:
    """(a): end to end, or (``quick``) ``samples`` timed steps and evaluation batches scaled to the recipe."""
    model = classifier(preset, lora=False)
    batches = reference_batches(datasets)
    if not quick:
        result = recipe(model, batches, cfg)
        return {**result, "wall_seconds": result["train_seconds"] + result["final_accuracy_seconds"], "estimate": False}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    sample = [batch for _, batch in zip(range(samples + 1), batches["train"])]
    train_step(model, optimizer, reference_forward, sample[0])  # warm-up, untimed
    step = statistics.median(seconds(lambda: train_step(model, optimizer, reference_forward, b)) for b in sample[1:])
    evaluation = statistics.median(seconds(lambda: eval_pass(model, reference_forward, b)) for b in sample[1:])
    counts = recipe_counts(batches, cfg)
    return {"step_seconds": step, "eval_batch_seconds": evaluation, **counts, "estimate": True,
            "wall_seconds": counts["steps"] * step + counts["eval_batches"] * evaluation}


def lora_paths(preset: str, datasets: dict, n_batches: int) -> dict:
    """(c) and (d) on the same ``n_batches`` training batches: per batch, one step + one evaluation pass.

    The two paths are interleaved batch by batch (and which of them goes first alternates), so a change in the
    machine's load while they run affects both alike.
    """
    train = datasets["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SEED)).tolist()
    items = [[train[i] for i in order[b * BATCH:(b + 1) * BATCH]] for b in range(n_batches + 1)]
    styles = {"c": (reference_forward, lambda batch: collate(batch, train.pad_id, pad_to=FIXED_PAD)),
              "d": (packed_last_token_logits, collate_packed)}
    runs = {}
    for key, (forward, make) in styles.items():
        model = classifier(preset, lora=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.1)
        batches = [make(batch) for batch in items]
        train_step(model, optimizer, forward, batches[0])  # warm-up, untimed
        runs[key] = (model, optimizer, forward, batches[1:], [])
    for i in range(n_batches):
        for key in (("c", "d") if i % 2 == 0 else ("d", "c")):
            model, optimizer, forward, batches, times = runs[key]
            times.append(seconds(lambda: train_step(model, optimizer, forward, batches[i]))
                         + seconds(lambda: eval_pass(model, forward, batches[i])))
    return {key: {"median_seconds": statistics.median(times), "batches": n_batches, "interleaved": True,
                  "positions_per_batch": statistics.mean(b[0].numel() for b in batches)}
            for key, (_, _, _, batches, times) in runs.items()}


def load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="estimate (a) from a sample instead of running it")
    parser.add_argument("--samples", type=int, default=6, help="--quick: timed steps/evaluations of (a)")
    parser.add_argument("--lora-batches", type=int, default=20, help="batches timed for (c) and (d) (>= 20)")
    parser.add_argument("--preset", default="gpt2", choices=[*PRESETS, "tiny"], help="tiny: checks the script only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (outputs/benchmark.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load()
    print(f"CPU {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads; load average {load_before}; model {args.preset} (random weights, seed {SEED})")
    datasets = tokenize_splits(load_splits(), gpt2_tokenizer())
    cfg = TrainConfig()
    results = {"b": path_b(args.preset, datasets, cfg)}
    results["a"] = path_a(args.preset, datasets, cfg, args.quick, args.samples)
    results.update(lora_paths(args.preset, datasets, args.lora_batches))
    a_note = " (estimate)" if args.quick else ""
    ratios = {
        "speedup": {"value": results["a"]["wall_seconds"] / results["b"]["wall_seconds"], "estimate": args.quick,
                    "what": "wall time of the recipe end to end, (a) / (b)"},
        "lora_speedup": {"value": results["c"]["median_seconds"] / results["d"]["median_seconds"], "estimate": False,
                         "what": f"median (training step + evaluation pass) time, (c) / (d), on the same "
                                 f"{args.lora_batches} batches"},
    }
    b = results["b"]
    print(f"\n{'':44s} {'reference-style':>24s} {'course':>12s} {'ratio':>8s}")
    print(f"{'classifier recipe, wall time (a) vs (b)':44s} {results['a']['wall_seconds']:>10.1f} s{a_note:>12s}"
          f" {b['wall_seconds']:>10.1f} s {ratios['speedup']['value']:>7.2f}x{a_note}")
    print(f"{'LoRA step + evaluation, median (c) vs (d)':44s} {results['c']['median_seconds']:>12.3f} s{'':10s}"
          f" {results['d']['median_seconds']:>10.3f} s {ratios['lora_speedup']['value']:>7.2f}x"
          f"  (medians over the same {args.lora_batches} batches)")
    print(f"(b): cache pass {b['cache_seconds']:.1f} s + training {b['train_seconds']:.1f} s + final accuracy "
          f"{b['final_accuracy_seconds']:.1f} s, measured; positions per LoRA batch: (c) "
          f"{results['c']['positions_per_batch']:.0f}, (d) {results['d']['positions_per_batch']:.0f}")
    report = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "load_before": load_before, "load_after": load()},
              "preset": args.preset, "quick": args.quick, "paths": results, "ratios": ratios}
    path = args.json or config.output_dir() / "benchmark.json"
    config.atomic_write_text(path, json.dumps(report, indent=2))
    print(f"load average after: {report['machine']['load_after']}; results in {path}")
    print(f"lora_speedup: {ratios['lora_speedup']['value']:.2f}")
    print(f"speedup: {ratios['speedup']['value']:.2f}{a_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
