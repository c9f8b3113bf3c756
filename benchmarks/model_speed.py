"""The model-level choices, measured: packed attention, packing vs padding, NF4 dequantization, the KV cache.

    python benchmarks/model_speed.py attention   # a packed row's attention: mask vs per-text loop vs nested tensors
    python benchmarks/model_speed.py steps       # LoRA / QLoRA training step: packed vs padded; dequantization's share
    python benchmarks/model_speed.py generate    # generation with vs without the KV cache
    python benchmarks/model_speed.py lora        # lora_speedup: reference-style LoRA (padded) vs the course's (packed)
    python benchmarks/model_speed.py all

GPT-2 124M shapes with random weights (speed does not depend on the values; ``--preset tiny`` checks the script),
batches of 8 texts from the course's SMS training split (GPT-2 tokens), the same batches for every variant.
Every figure is a median over ``--batches`` batches. Run it on a quiet machine: the load average is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.finetune_speed import (  # noqa: E402
    BATCH, SEED, classifier, lora_paths, model_config, seconds, train_step,
)
from helpers import nf4  # noqa: E402
from helpers.data import collate, collate_packed, load_splits, tokenize_splits  # noqa: E402
from helpers.models.base import (  # noqa: E402
    Packing, attend, generate, last_token_logits, packed_last_token_logits, set_seed,
)
from helpers.models.gpt2 import GPT2Model, gpt2_tokenizer  # noqa: E402


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up, untimed
    return statistics.median(seconds(fn) for _ in range(repeats))


def sms_batches(n: int) -> list[list[tuple[list[int], int]]]:
    """``n`` batches of 8 (token ids, label) from the shuffled training split."""
    train = tokenize_splits(load_splits(), gpt2_tokenizer())["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SEED)).tolist()
    return [[train[i] for i in order[b * BATCH:(b + 1) * BATCH]] for b in range(n)]


def attention(args: argparse.Namespace) -> None:
    """One attention layer (12 heads of 64), forward + backward, on each batch's texts."""
    heads, head_dim = 12, 64
    rows = {"padded to the batch's longest text, is_causal": [], "packed, boolean block-diagonal mask": [],
            "packed, additive float mask": [], "packed, one causal call per text (attend)": []}
    for batch in sms_batches(args.batches):
        lengths = [len(ids) for ids, _ in batch]
        packing = Packing.of(lengths)
        q, k, v = (torch.randn(1, heads, sum(lengths), head_dim, requires_grad=True) for _ in range(3))
        qp, kp, vp = (torch.randn(len(lengths), heads, max(lengths), head_dim, requires_grad=True) for _ in range(3))
        additive = torch.zeros(packing.mask.shape).masked_fill(~packing.mask, float("-inf"))

        variants = [lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True),
                    lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=packing.mask),
                    lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
                    lambda: attend(q, k, v, packing)]  # the course's choice
        for times, fn in zip(rows.values(), variants):
            times.append(median_seconds(lambda: fn().sum().backward(), 5))
    try:  # nested (jagged) tensors: the varlen route
        jagged = torch.nested.nested_tensor([torch.randn(n, heads, head_dim) for n in (3, 5)], layout=torch.jagged)
        F.scaled_dot_product_attention(*[jagged.transpose(1, 2)] * 3, is_causal=True)
        nested = "runs (not timed here)"
    except RuntimeError as exc:
        nested = f"causal attention not available here: {str(exc).splitlines()[0]}"
    print(f"\none attention layer, forward + backward (median over {args.batches} batches):")
    for name, times in rows.items():
        print(f"  {name:48s} {statistics.median(times) * 1e3:8.2f} ms")
    print(f"  {'packed, nested (jagged) tensors':48s} {nested}")


def steps(args: argparse.Namespace) -> None:
    """LoRA and QLoRA training steps, padded vs packed; the share of QLoRA's step spent dequantizing."""
    batches = sms_batches(args.batches + 1)  # the first one warms up, untimed
    layouts = {"padded": ([collate(b, pad_id=50256) for b in batches], last_token_logits),
               "packed": ([collate_packed(b) for b in batches], packed_last_token_logits)}
    fast, spent = nf4.dequantize_nf4, [0.0]

    def timed(dequantize: Callable) -> Callable:
        def run(q, pairs=None):  # NF4LinearFunction passes the layer's pair table
            start = time.perf_counter()
            out = dequantize(q, pairs)
            spent[0] += time.perf_counter() - start
            return out
        return run

    print(f"\ntraining step (forward + backward + AdamW), median over {args.batches} batches of 8 SMS texts:")
    for method in ("LoRA", "QLoRA"):
        model = classifier(args.preset, lora=True, quantize=method == "QLoRA")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
        for layout, (prepared, forward) in layouts.items():
            for name, dequantize in {"plain": lambda q, _: nf4.dequantize_nf4_plain(q), "pair table": fast}.items():
                if method == "LoRA" and name == "plain":
                    continue
                nf4.dequantize_nf4 = timed(dequantize)  # NF4LinearFunction looks it up at every call
                try:
                    train_step(model, optimizer, forward, prepared[0])
                    times, shares = [], []
                    for batch in prepared[1:]:
                        spent[0] = 0.0
                        times.append(seconds(lambda: train_step(model, optimizer, forward, batch)))
                        shares.append(spent[0] / times[-1])
                finally:
                    nf4.dequantize_nf4 = fast
                share = f"; dequantization ({name}) {statistics.median(shares):4.0%} of it" if method == "QLoRA" else ""
                tokens = statistics.mean(b[0].numel() for b in prepared[1:])
                print(f"  {method:6s} {layout:7s} {statistics.median(times):7.3f} s  ({tokens:4.0f} positions){share}")


def generation(args: argparse.Namespace) -> None:
    """Batched greedy generation of ``--new-tokens`` tokens for 4 prompts, with and without the KV cache."""
    set_seed(SEED)
    model = GPT2Model(model_config(args.preset)).eval()
    prompts = [ids for ids, _ in sms_batches(1)[0][:4]]
    generate(model, prompts, 2)  # warm-up
    print(f"\ngreedy generation, 4 prompts of {[len(p) for p in prompts]} tokens, {args.new_tokens} new tokens each:")
    tokens, times = {}, {}
    for kv_cache in (True, False):
        start = time.perf_counter()
        tokens[kv_cache] = generate(model, prompts, args.new_tokens, kv_cache=kv_cache)
        times[kv_cache] = time.perf_counter() - start
        print(f"  KV cache {'on ' if kv_cache else 'off'} {times[kv_cache]:7.2f} s  "
              f"({4 * args.new_tokens / times[kv_cache]:6.1f} tokens/s)")
    assert tokens[True] == tokens[False], "the KV cache changed the generated tokens"
    print(f"  speed-up {times[False] / times[True]:.1f}x, the same tokens")


def lora_speedup(args: argparse.Namespace) -> None:
    """``lora_speedup`` of ``finetune_speed.py`` alone: (c) reference-style LoRA, every text padded to 120 tokens,
    all blocks, logits at the last position, vs (d) the course's packed LoRA, on the same batches, interleaved."""
    results = lora_paths(args.preset, tokenize_splits(load_splits(), gpt2_tokenizer()), args.lora_batches)
    c, d = results["c"], results["d"]
    print(f"\nLoRA (rank 16, every block) training step + evaluation pass, median over the same {args.lora_batches}"
          f" batches of 8 SMS texts, the two paths interleaved batch by batch (machine load affects both alike):")
    for name, path in (("(c) reference-style, padded to 120", c), ("(d) course, packed", d)):
        print(f"  {name:34s} {path['median_seconds']:7.3f} s  ({path['positions_per_batch']:4.0f} positions)")
    print(f"lora_speedup: {c['median_seconds'] / d['median_seconds']:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("attention", "steps", "generate", "lora", "all"))
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lora-batches", type=int, default=20, help="lora: batches timed for each path (>= 20)")
    parser.add_argument("--preset", default="gpt2", choices=("gpt2", "tiny"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    for name, run in (("attention", attention), ("steps", steps), ("generate", generation), ("lora", lora_speedup)):
        if args.what in (name, "all"):
            run(args)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
