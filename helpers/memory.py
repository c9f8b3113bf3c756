"""Peak memory of a few training steps, measured in a fresh process (plumbing for notebook 07).

``training_peak_rss("lora")`` and ``training_peak_rss("qlora")`` each start a new Python process that builds a
GPT-2 with random weights (124M shapes by default: the sizes, not the values, decide the memory), wraps it with
LoRA or QLoRA, and then trains ``steps`` steps on a fixed batch of ``batch_size`` x ``seq_len`` tokens. The
result is the process's peak resident memory (RSS) *during training only*: once the model is built, the
high-water mark is reset (Linux: write ``5`` to ``/proc/self/clear_refs``), and ``VmHWM`` from
``/proc/self/status`` is read after the last step. One process per method, so one method's peak cannot hide
in another's. Where the operating system cannot reset the mark (macOS, Windows) the result is ``None``.

    python -m helpers.memory qlora --steps 20      # prints one JSON line

``training_peaks()`` measures both methods as notebook 07 does (``quick=True``: a tiny model, for the smoke profile).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from helpers.config import REPO_ROOT
from helpers.lora import apply_lora, apply_qlora
from helpers.models.base import add_classifier_head, last_token_logits, set_seed
from helpers.models.gpt2 import PRESETS, GPT2Config, GPT2Model
from helpers.train import batch_loss

METHODS = {"lora": apply_lora, "qlora": apply_qlora}
#: A tiny GPT-2 for ``quick`` runs (the smoke profile): the plumbing runs in seconds, the figures mean nothing.
QUICK = {"cfg": {"emb_dim": 64, "n_heads": 2, "n_layers": 2}, "steps": 2, "seq_len": 16}
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def training_peak_rss(method: str, *, cfg: dict[str, Any] | None = None, steps: int = 20, batch_size: int = 8,
                      seq_len: int = 120, rank: int = 16, seed: int = 123, timeout: float | None = None) -> int | None:
    """Peak RSS in bytes of ``steps`` training steps of ``method`` (``lora`` or ``qlora``), in a subprocess.

    ``cfg``: GPT2Config fields (default: GPT-2 124M). ``None`` where the OS cannot measure it (not Linux).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if not CLEAR_REFS.exists():
        return None
    command = [sys.executable, "-m", "helpers.memory", method, "--steps", str(steps), "--batch-size", str(batch_size),
               "--seq-len", str(seq_len), "--rank", str(rank), "--seed", str(seed)]
    if cfg is not None:
        command += ["--config", json.dumps(cfg)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {method} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def training_peaks(methods: Sequence[str] = ("lora", "qlora"), quick: bool = False) -> dict[str, int | None]:
    """``training_peak_rss`` of each method (GPT-2 124M shapes, 20 steps of 8 x 120 tokens), one process each.

    ``quick``: the tiny ``QUICK`` model instead (seconds; its figures say nothing about the 124M model).
    ``None`` for every method where the OS cannot measure it (not Linux).
    """
    options = QUICK if quick else {}
    return {method: training_peak_rss(method, **options) for method in methods}


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``: now; ``VmHWM``: the high-water mark) in bytes."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{STATUS} has no {field}")


def _release_freed_memory() -> None:
    """Hand memory freed while building the model back to the OS, so it does not count as training memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def measure(method: str, cfg: GPT2Config, steps: int, batch_size: int, seq_len: int, rank: int,
            seed: int) -> dict[str, Any]:
    """Build, reset the high-water mark, train ``steps`` steps; runs in the measuring process."""
    set_seed(seed)
    model = add_classifier_head(GPT2Model(cfg), num_classes=2, trainable_blocks=0, seed=seed)
    METHODS[method](model, rank=rank, alpha=rank, seed=seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    batch = (torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=generator),  # ids [B, T]
             torch.full((batch_size,), seq_len),  # lengths [B]
             torch.randint(0, 2, (batch_size,), generator=generator))  # labels [B]
    _release_freed_memory()
    rss_after_load = _status_bytes("VmRSS")
    CLEAR_REFS.write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        optimizer.zero_grad()
        batch_loss(model, last_token_logits, batch).backward()
        optimizer.step()
    return {"method": method, "peak_rss_bytes": _status_bytes("VmHWM"), "rss_after_load_bytes": rss_after_load,
            "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "rank": rank, "config": asdict(cfg)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--config", help="GPT2Config fields as JSON (default: GPT-2 124M)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=120)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    cfg = GPT2Config(**json.loads(args.config)) if args.config else PRESETS["gpt2"]
    print(json.dumps(measure(args.method, cfg, args.steps, args.batch_size, args.seq_len, args.rank, args.seed)))


if __name__ == "__main__":
    main()
