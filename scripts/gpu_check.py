"""Does the course compute the same on this GPU as on the CPU, and how fast is notebook 05 there? (< 3 min)

    python scripts/gpu_check.py                          # COURSE_DEVICE, else cuda -> mps -> cpu
    python scripts/gpu_check.py --device cuda:1 --out gpu_check.json
    python scripts/gpu_check.py --dry-run                # the same code on the CPU, tiny shapes, a few seconds

For GPT-2 (124M shapes) and SmolLM2 (135M shapes), both built with random weights (no download, no file):

1. **logits**: the device's float32 logits equal the CPU's within ``FP32_RTOL`` (1e-4) of the largest |logit|; under
   the device's autocast (``precision_for``: bf16, or fp16 on older GPUs) within ``AUTOCAST_RTOL`` of it;
2. **one training step of each path** on the device — the cached last block, plain token batches, LoRA and
   QLoRA: its float32 loss equals the CPU's (within ``FP32_RTOL``), and one optimizer step under the device's
   precision (``train.optimizer_step``, with the GradScaler under fp16) gives a finite loss, changes the
   trainable parameters and leaves the frozen ones alone;
3. **notebook 05's recipe** timed end to end: random token ids in the real split sizes (1,045 / 149 / 300 texts)
   with SMS-like lengths (mean about 31 tokens, longest training text 120), ``split_batches`` (cached path),
   ``train_classifier`` for 5 epochs, then ``accuracies`` on every split; every clock read waits for the device
   (``clock``). Labels are random, so the accuracies mean nothing; the times do. It runs at the device's
   precision and, for comparison, in float32.

It prints a report and writes it as JSON (``--out``, default ``outputs/gpu_check.json``); the exit status is 1
when a check fails.

A bare GPU machine needs only a CUDA build of PyTorch (any version from 2.3, Python >= 3.10) and the pure-Python
``tqdm`` wheel (about 80 kB), with this folder: the helpers import some libraries at module level that this
script never calls (numpy, pandas, tiktoken, tokenizers, gguf); where one is missing, a stand-in takes its
place while the helpers are imported, and fails loudly if anything does call it.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

UNUSED_LIBRARIES = ("numpy", "pandas", "tiktoken", "tokenizers", "gguf")


class Missing(types.ModuleType):
    """Stands for a library that is not installed and that this script never calls."""

    def __getattr__(self, attr: str) -> "Missing":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self.__name__}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any):
        raise RuntimeError(f"{self.__name__} is not installed; gpu_check does not need it, but this code called it.")


def stand_in_for_missing(names: tuple[str, ...] = UNUSED_LIBRARIES) -> list[str]:
    """Put a ``Missing`` module in place of each library in ``names`` that cannot be imported; returns those."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = Missing(name)
            missing.append(name)
    return missing


STOOD_IN = stand_in_for_missing()

from helpers.data import SpamDataset  # noqa: E402
from helpers.fastpath import make_batches, split_batches  # noqa: E402
from helpers.lora import apply_lora, apply_qlora  # noqa: E402
from helpers.models.base import (  # noqa: E402
    AUTOCAST_RTOL, Precision, add_classifier_head, clock, pick_device, precision_for,
)
from helpers.models.gpt2 import PRESETS, GPT2Config, GPT2Model  # noqa: E402
from helpers.models.smollm2 import SmolLM2, SmolLM2Config  # noqa: E402
from helpers.train import TrainConfig, accuracies, batch_loss, optimizer_step, train_classifier  # noqa: E402

for _name in STOOD_IN:  # the helpers keep their stand-ins; any later import (PyTorch's own) fails as it should
    del sys.modules[_name]

SEED = 123
FP32_RTOL = 1e-4
#: SmolLM2-135M's shapes, as its GGUF file states them (tests/test_devices.py compares).
SMOLLM2_135M = SmolLM2Config(emb_dim=576, n_layers=30, n_heads=9, n_kv_heads=3, context_length=8192,
                             vocab_size=49152, rope_theta=100000.0, norm_eps=9.999999747378752e-06,  # 1e-5 in fp32
                             hidden_dim=1536)
SPLIT_SIZES = {"train": 1045, "validation": 149, "test": 300}  # the course's balanced 70/10/20 split
LONGEST = 120  # tokens in the longest training text (GPT-2's tokenizer)
PATHS = ("cached", "tokens", "lora", "qlora")


class Scale:
    """What one run covers: model shapes, data sizes, epochs."""

    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny
        if tiny:
            self.models: dict[str, Callable[[], nn.Module]] = {
                "gpt2": lambda: GPT2Model(GPT2Config(vocab_size=512, context_length=128, emb_dim=32, n_heads=2,
                                                     n_layers=3)),
                "smollm2": lambda: SmolLM2(SmolLM2Config(emb_dim=32, n_layers=3, n_heads=4, n_kv_heads=2,
                                                         context_length=128, vocab_size=512, rope_theta=1e4,
                                                         norm_eps=1e-5, hidden_dim=64)),
            }
            self.split_sizes, self.longest, self.epochs, self.logits_shape = (
                {"train": 40, "validation": 16, "test": 16}, 24, 1, (2, 16))
        else:
            self.models = {"gpt2": lambda: GPT2Model(PRESETS["gpt2"]), "smollm2": lambda: SmolLM2(SMOLLM2_135M)}
            self.split_sizes, self.longest, self.epochs, self.logits_shape = SPLIT_SIZES, LONGEST, 5, (4, 64)


# --- Data: token ids only (no text, no tokenizer) -----------------------------------------------------

class RandomTexts(SpamDataset):
    """A ``SpamDataset`` of random token ids and random labels, with the given lengths."""

    def __init__(self, lengths: list[int], vocab_size: int, generator: torch.Generator) -> None:  # noqa: D107
        self.encoded = [torch.randint(1, vocab_size, (n,), generator=generator).tolist() for n in lengths]
        self.labels = torch.randint(0, 2, (len(lengths),), generator=generator).tolist()
        self.pad_id, self.max_length = 0, max(lengths)


def sms_like_lengths(n: int, longest: int, generator: torch.Generator) -> list[int]:
    """``n`` token counts shaped like SMS texts (log-normal, mean about 31 for GPT-2), the longest = ``longest``."""
    lengths = torch.empty(n).log_normal_(3.25, 0.6, generator=generator).round().clamp(2, longest).long()
    lengths[lengths.argmax()] = longest
    return lengths.tolist()


def random_splits(sizes: dict[str, int], longest: int, vocab_size: int) -> dict[str, RandomTexts]:
    generator = torch.Generator().manual_seed(SEED)
    return {name: RandomTexts(sms_like_lengths(n, longest, generator), vocab_size, generator)
            for name, n in sizes.items()}


# --- Checks ---------------------------------------------------------------------------------------------

def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference| (both moved to the CPU as float32)."""
    value, reference = value.detach().float().cpu(), reference.detach().float().cpu()
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def check(report: list[dict], model: str, name: str, ok: bool, **detail: Any) -> bool:
    """Record and print one check."""
    report.append({"model": model, "check": name, "ok": bool(ok), **detail})
    shown = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in detail.items())
    print(f"[{'ok' if ok else 'FAIL':>4}] {model:8} {name:30} {shown}", flush=True)
    return bool(ok)


@torch.no_grad()
def check_logits(report: list[dict], name: str, base: nn.Module, device: torch.device, precision: Precision,
                 shape: tuple[int, int]) -> None:
    """The device's logits against the CPU's, in float32 and under autocast."""
    ids = torch.randint(0, base.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(SEED))
    reference = base.eval()(ids)  # [B, T, V] on the CPU, float32
    model = copy.deepcopy(base).to(device)
    rel = relative_difference(model(ids.to(device)), reference)
    check(report, name, "logits fp32 vs CPU", rel <= FP32_RTOL, rel=rel, bound=FP32_RTOL)
    if precision.dtype != torch.float32:
        with precision.autocast():
            rel = relative_difference(model(ids.to(device)), reference)
        bound = AUTOCAST_RTOL[precision.name]
        check(report, name, f"logits {precision.name} vs CPU fp32", rel <= bound, rel=rel, bound=bound)
    del model


def prepare(model: nn.Module, path: str) -> nn.Module:
    """The classifier each path trains: the last block (cached / tokens), or LoRA / QLoRA on every block."""
    if path in ("cached", "tokens"):
        return add_classifier_head(model, trainable_blocks=1)
    add_classifier_head(model, trainable_blocks=0)
    return (apply_qlora if path == "qlora" else apply_lora)(model, rank=8, alpha=8)


def first_batch_loss(base: nn.Module, path: str, data: RandomTexts, device: torch.device):
    """``(model, batches, float32 loss of the first batch)`` for ``path`` on ``device``."""
    model = prepare(copy.deepcopy(base).to(device), path)
    batches = make_batches(model, data, batch_size=8, cache=path == "cached", progress=False)
    if batches.cached != (path == "cached"):
        raise AssertionError(f"path {path}: make_batches chose cached={batches.cached}")
    with torch.no_grad():
        loss = batch_loss(model, batches.forward, next(iter(batches)))
    return model, batches, loss


def check_training_step(report: list[dict], name: str, base: nn.Module, path: str, data: RandomTexts,
                        device: torch.device, precision: Precision) -> None:
    """The path's loss on the device vs the CPU (float32), then one optimizer step on the device."""
    _, _, cpu_loss = first_batch_loss(base, path, data, torch.device("cpu"))
    model, batches, loss = first_batch_loss(base, path, data, device)
    rel = relative_difference(loss, cpu_loss)
    check(report, name, f"{path}: loss fp32 vs CPU", rel <= FP32_RTOL, rel=rel, loss=round(cpu_loss.item(), 5))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = precision.grad_scaler()
    model.train()
    for steps in range(1, 6):  # fp16: the scaler skips a step whose gradients overflowed, then retries smaller
        optimizer.zero_grad()
        with precision.autocast():
            step_loss = batch_loss(model, batches.forward, next(iter(batches)))
        optimizer_step(step_loss, optimizer, scaler)
        params = dict(model.named_parameters())
        changed = sum(not torch.equal(params[n].detach(), before) for n, before in trainable.items())
        if changed:
            break
    still = all(torch.equal(params[n].detach(), before) for n, before in frozen.items())
    step_loss = step_loss.item()
    check(report, name, f"{path}: {precision.name} step", math.isfinite(step_loss) and changed > 0 and still,
          loss=round(step_loss, 5), changed=f"{changed}/{len(trainable)}", frozen_kept=still, steps=steps)


def run_recipe(name: str, make: Callable[[], nn.Module], scale: Scale, device: torch.device,
               precision: Precision) -> dict[str, Any]:
    """Notebook 05's recipe on random data of its real sizes: cache, train 5 epochs, accuracy on every split."""
    torch.manual_seed(SEED)
    model = add_classifier_head(make(), trainable_blocks=1).to(device)
    data = random_splits(scale.split_sizes, scale.longest, model.cfg.vocab_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = clock(device)
    batches = split_batches(model, data, batch_size=8, cache=True, progress=False)
    cached = clock(device)
    history = train_classifier(model, batches["train"], batches["validation"], TrainConfig(epochs=scale.epochs),
                               progress=False, precision=precision)
    trained = clock(device)
    accuracy = accuracies(model, batches, precision)
    done = clock(device)
    result = {"model": name, "precision": precision.name, "cache_seconds": cached - start,
              "train_seconds": history.seconds, "accuracy_seconds": done - trained, "total_seconds": done - start,
              "steps": history.steps, "examples_per_second": history.examples_seen / history.seconds,
              "accuracy_random_labels": accuracy, "fast_path": history.fast_path}
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(f"recipe {name:8} {precision.name}: cache {result['cache_seconds']:.1f} s + train {history.seconds:.1f} s "
          f"({history.steps} steps, {result['examples_per_second']:,.0f} examples/s) + accuracy "
          f"{result['accuracy_seconds']:.1f} s = {result['total_seconds']:.1f} s"
          + (f", peak {result['peak_gpu_mib']:,.0f} MiB" if "peak_gpu_mib" in result else ""), flush=True)
    return result


# --- The whole check ------------------------------------------------------------------------------------

def describe(device: torch.device, precision: Precision) -> dict[str, Any]:
    info = {"device": str(device), "precision": precision.name, "torch": torch.__version__,
            "python": platform.python_version(), "stand_ins": STOOD_IN}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    gpu_memory_gib=props.total_memory / 2**30, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


def run(device: torch.device, precision: Precision, scale: Scale) -> dict[str, Any]:
    """Every check and the recipe; returns the report (``ok``: every check passed)."""
    start = time.perf_counter()
    info = describe(device, precision)
    print("gpu_check:", ", ".join(f"{k} {v}" for k, v in info.items() if k != "stand_ins"),
          f"(stand-ins for {', '.join(STOOD_IN)})" if STOOD_IN else "", flush=True)
    checks: list[dict] = []
    recipes = []
    for name, make in scale.models.items():
        torch.manual_seed(SEED)
        base = make()
        check_logits(checks, name, base, device, precision, scale.logits_shape)
        data = random_splits({"step": 16}, scale.longest, base.cfg.vocab_size)["step"]
        for path in PATHS:
            check_training_step(checks, name, base, path, data, device, precision)
        del base
        for recipe_precision in dict.fromkeys([precision, Precision(device.type)]):  # the device's, then fp32
            recipes.append(run_recipe(name, make, scale, device, recipe_precision))
    ok = all(c["ok"] for c in checks)
    seconds = time.perf_counter() - start
    print(f"gpu_check: {sum(c['ok'] for c in checks)}/{len(checks)} checks passed in {seconds:.0f} s", flush=True)
    return {**info, "dry_run": scale.tiny, "ok": ok, "seconds": seconds, "checks": checks, "recipes": recipes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cuda, cuda:1, mps, cpu (default: COURSE_DEVICE, else the best available)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                        help="autocast dtype (default: precision_for(device); bf16 with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny shapes")
    parser.add_argument("--out", type=Path, help="JSON report (default: outputs/gpu_check.json)")
    args = parser.parse_args(argv)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and lose much on a busy machine
    device = torch.device("cpu") if args.dry_run and not args.device else pick_device(args.device)
    choice = args.precision or ("bf16" if args.dry_run else "auto")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    precision = precision_for(device) if choice == "auto" else Precision(device.type, dtypes[choice])
    report = run(device, precision, Scale(tiny=args.dry_run))
    out = args.out
    if out is None:
        from helpers.config import output_dir

        out = output_dir() / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"gpu_check: report written to {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
