"""``helpers.finetune`` as ``tests/test_finetune.py`` runs it under torchrun (2 gloo processes) and alone (the
reference), saving each process's final weights beside the command's own output:

    torchrun --nproc_per_node=2 tests/finetune_worker.py STATES_DIR --output OUT [finetune options]

Every process writes ``STATES_DIR/rank<r>.pt``. The attention *key* biases are frozen: their true gradient is
exactly zero (adding one number to every score of a query leaves the softmax unchanged), so what they get is
rounding noise whose sign depends on the order of the sums, and AdamW turns it into a step of about ``lr``;
two runs that sum in another order (2 processes vs 1) would then differ there by ``lr`` per step, while every
other weight agrees to ~1e-7 (see ``tests/ddp_worker.py``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from helpers import finetune
from helpers.distributed import distributed, unwrap

KEY_BIAS = ".attn.W_key.bias"


def freeze_key_bias(choose):
    """``choose`` (what the method trains), then the key biases frozen (before DDP wraps the model)."""
    def choose_without_key_bias(model, *args, **kwargs):
        choose(model, *args, **kwargs)
        for name, p in model.named_parameters():
            if name.endswith(KEY_BIAS):
                p.requires_grad_(False)
        return model
    return choose_without_key_bias


def main(states: Path, argv: list[str]) -> None:
    finetune.choose_trainable = freeze_key_bias(finetune.choose_trainable)  # classify
    finetune.choose_trainable_blocks = freeze_key_bias(finetune.choose_trainable_blocks)  # instruct
    args = finetune.parse_args(argv)
    with distributed(args.device) as context:
        step, history, _ = finetune.run(args, context)
        model = unwrap(step)
        torch.save({"rank": context.rank, "world_size": context.world_size, "backend": context.backend,
                    "threads": torch.get_num_threads(), "steps": history.steps, "state": model.state_dict(),
                    "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)},
                   states / f"rank{context.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
