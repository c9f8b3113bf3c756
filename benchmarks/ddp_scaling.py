"""Examples per second with 1 process vs N processes (torchrun, gloo, DDP) on this CPU.

The workload is instruction-style fine-tuning of a small GPT-2-like model, as ``helpers.finetune`` would run it
through ``helpers.distributed``: token + position embeddings and the tied output head frozen, the blocks
trained with AdamW, next-token loss on the response half of every sequence (the prompt half is masked with -100).
Random weights and random tokens (speed does not depend on the values).

Each configuration ``PxT`` (P processes with T threads each) runs in fresh processes: ``1xT`` as a plain
``python`` process (no torchrun, no DDP), ``PxT`` with P > 1 under ``torch.distributed.run`` on 127.0.0.1.
After ``--warmup`` untimed steps, ``--steps`` steps are timed between two barriers; the figure is
examples per second of the whole job (``steps x batch x P / seconds``).

    python benchmarks/ddp_scaling.py                             # 1x1, 1x2, 2x1: 2 layers, width 256, batch 8, seq 64
    python benchmarks/ddp_scaling.py --configs 1x1,2x1 --steps 20
    python benchmarks/ddp_scaling.py --fixed-global-batch        # strong scaling: batch 8 split over the processes
    python benchmarks/ddp_scaling.py --layers 1 --width 64 --vocab 1000 --steps 2 --warmup 1   # checks the script

By default ``--batch`` is per process (weak scaling, the usual way to use DDP: N processes take a global batch
N times larger). ``1x2`` is the fair one-process baseline on a 2-core machine: one process using both cores
through intra-op threads. The report prints the load average before and after: figures taken on a busy machine
are "measured under contention".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from helpers.distributed import (  # noqa: E402
    IGNORE_INDEX, LossModule, barrier, distributed, global_mean_loss, print_main, set_epoch, sharded_loader,
    token_loss_sum, wrap_model,
)


class TinyGPT(nn.Module):
    """GPT-2's shape in miniature: embeddings, pre-norm causal blocks (GELU MLP x4), final norm, tied head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                               activation="gelu", batch_first=True, norm_first=True)
                                    for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(seq))  # [B, T, width]
        mask = nn.Transformer.generate_square_subsequent_mask(seq)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.final_norm(x) @ self.tok_emb.weight.T  # [B, T, vocab]


def all_logits(model: TinyGPT, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return model(ids)


def parse_config(text: str) -> tuple[int, int]:
    try:
        processes, threads = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not PxT, e.g. 2x1 (2 processes, 1 thread each)") from None
    if processes < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: processes and threads must be at least 1")
    return processes, threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="1x1,1x2,2x1",
                   help="comma-separated PxT: P processes with T threads each (default 1x1,1x2,2x1)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--width", type=int, default=256, help="embedding width (default 256)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary size (default 50257, GPT-2's)")
    p.add_argument("--seq", type=int, default=64, help="tokens per example (default 64)")
    p.add_argument("--batch", type=int, default=8, help="examples per process and step (default 8)")
    p.add_argument("--fixed-global-batch", action="store_true",
                   help="--batch is the global batch, split over the processes (strong scaling)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--seed", type=int, default=123, help="weights, data and shuffle seed (default 123)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a configuration is killed (default 600)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one process of one configuration
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if args.fixed_global_batch and any(args.batch % processes for processes, _ in args.configs):
        p.error(f"--fixed-global-batch: --batch {args.batch} must divide evenly over every configuration's processes")
    return args


def worker(args: argparse.Namespace) -> None:
    """Train ``warmup + steps`` steps in this process (one of P under torchrun); rank 0 prints a JSON line."""
    torch.set_num_threads(args.threads)
    with distributed("cpu") as context:
        torch.manual_seed(args.seed)
        model = TinyGPT(args.vocab, args.width, args.layers, args.heads, args.seq)
        model.tok_emb.requires_grad_(False)  # the tied embedding / output head stays frozen
        model.pos_emb.requires_grad_(False)
        step = wrap_model(LossModule(model, all_logits, token_loss_sum), context)
        optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-4)
        batch = args.batch // context.world_size if args.fixed_global_batch else args.batch
        n = (args.warmup + args.steps) * batch * context.world_size
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, args.vocab, (n, args.seq + 1), generator=g)
        targets = ids[:, 1:].clone()
        targets[:, : args.seq // 2] = IGNORE_INDEX  # the "prompt" half is not scored
        loader = sharded_loader(TensorDataset(ids[:, :-1], torch.full((n,), args.seq), targets), batch,
                                seed=args.seed)
        set_epoch(loader, 0)
        for i, (inputs, lengths, labels) in enumerate(loader):
            if i == args.warmup:
                barrier()
                start = time.perf_counter()
            optimizer.zero_grad()
            loss, _ = global_mean_loss(*step(inputs, lengths, labels))
            loss.backward()
            optimizer.step()
        barrier()
        seconds = time.perf_counter() - start
        examples = args.steps * batch * context.world_size
        print_main(json.dumps({"processes": context.world_size, "threads": args.threads, "batch_per_process": batch,
                               "seconds": seconds, "examples_per_s": examples / seconds}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(processes: int, threads: int, argv: list[str], timeout: float) -> dict:
    """One configuration in fresh processes; its JSON result."""
    script = [str(Path(__file__).resolve()), *argv, "--worker", f"--threads={threads}"]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max_restarts=0", *script]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise SystemExit(f"{processes}x{threads} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    passed = [f"--{name}={getattr(args, name)}" for name in ("layers", "width", "heads", "vocab", "seq", "batch",
                                                            "steps", "warmup", "seed")]
    passed += ["--fixed-global-batch"] if args.fixed_global_batch else []
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"model: {args.layers} layers, width {args.width}, vocab {args.vocab}; seq {args.seq}; "
          f"batch {args.batch} {'global' if args.fixed_global_batch else 'per process'}; "
          f"{args.steps} timed steps after {args.warmup}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    results = [run_config(p, t, passed, args.timeout) for p, t in args.configs]
    print(f"load average after:  {os.getloadavg()[0]:.2f}")
    base = results[0]["examples_per_s"]
    print(f"{'config':>8} {'batch/proc':>10} {'seconds':>8} {'examples/s':>11} {'vs first':>9}")
    for r in results:
        print(f"{r['processes']}x{r['threads']:<6} {r['batch_per_process']:>10} {r['seconds']:>8.2f} "
              f"{r['examples_per_s']:>11.1f} {r['examples_per_s'] / base:>8.2f}x")


if __name__ == "__main__":
    main()
