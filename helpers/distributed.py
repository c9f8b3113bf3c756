"""Scale-out stage: the same fine-tuning on N processes with ``DistributedDataParallel`` (DDP), under torchrun.

Pipeline position: after ``train``. No notebook defines it (a notebook is one process); it is the engine under
``python -m helpers.finetune`` and README section "Beyond one machine". It imports only PyTorch, ``config`` and
the device tools of ``models.base`` (one device and precision policy for the whole course).

Data parallelism in four lines:

1. ``torchrun --nproc_per_node=N script.py`` starts N copies of the script; each reads RANK, LOCAL_RANK and
   WORLD_SIZE (``init_distributed``) and joins one process group (gloo on CPU, nccl on CUDA GPUs).
2. Every process holds a whole copy of the model; wrapping it (``wrap_model``) copies rank 0's weights to all.
3. Every global batch is cut into N slices, one per process (``sharded_loader``).
4. During ``backward`` DDP averages the gradients over the processes, so every process takes the same optimizer
   step and the copies stay bit-identical.

One training step, as ``helpers.finetune`` runs it (without torchrun the same lines run as one plain process)::

    ctx = init_distributed()                        # no-op without torchrun
    # ... build the model, choose what trains (requires_grad), THEN wrap:
    step = wrap_model(LossModule(model, forward, token_loss_sum), ctx)
    loader = sharded_loader(train_set, batch_size, collate_fn=collate, seed=seed)
    optimizer = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=lr)
    precision = precision_for(ctx.device)           # bf16 / fp16 autocast on CUDA GPUs, float32 elsewhere
    scaler = precision.grad_scaler()                # scales the loss under fp16 only
    for epoch in range(epochs):
        set_epoch(loader, epoch)                    # a new shuffle each epoch, the same on every process
        for inputs, lengths, targets in loader:
            optimizer.zero_grad()
            with precision.autocast():
                loss_sum, count = step(inputs, lengths, targets)   # through the wrapper, never step.module
            loss, mean = global_mean_loss(loss_sum, count)
            optimizer_step(loss, optimizer, scaler) # helpers.train: backward (gradients averaged here) + step
            print_main(f"loss {mean:.3f}")          # rank 0 only
    save_on_main(step, path)                        # the unwrapped model's weights, no ``module.`` prefix
    shutdown_distributed()
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import config
from .models.base import model_device, pick_device, precision_for

IGNORE_INDEX = -100  # targets with this value are not scored (prompt and padding in instruction tuning)
LossInputs = tuple[torch.Tensor, torch.Tensor]  # (sum of the per-item losses, how many items were summed)


class DistributedError(RuntimeError):
    """The processes of a torchrun job could not find each other; the message says what to check."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on this machine, its device.

    ``backend`` is ``gloo`` (CPU) or ``nccl`` (CUDA) under torchrun, None for a plain single process.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --- Set-up and tear-down ---------------------------------------------------------------------------

def _pick_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """CUDA GPU number ``local_rank`` when CUDA is available (or asked for), else the CPU."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise ValueError(f"Several processes need CUDA GPUs (nccl) or the CPU (gloo), not {kind!r}.")
    if not torch.cuda.is_available():
        raise DistributedError("CUDA was asked for but is not available in this process; use device 'cpu'.")
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(f"LOCAL_RANK={local_rank}, but this machine has {torch.cuda.device_count()} GPU(s): "
                               "start at most one process per GPU (torchrun --nproc_per_node=<number of GPUs>).")
    return torch.device("cuda", local_rank)


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """Join the torchrun job this process belongs to, or describe a plain single process.

    Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): one process per device; on
    CUDA the process uses GPU number LOCAL_RANK and the nccl backend, on CPU the gloo backend. Every process
    waits at most COURSE_DIST_TIMEOUT seconds for the others, then fails with a message (never hangs for ever).
    ``device``: ``cpu`` or ``cuda`` (the GPU number comes from LOCAL_RANK); default COURSE_DEVICE's type, else
    CUDA when available.
    Without torchrun nothing is initialised and the context says rank 0 of 1. Calling it twice is harmless.
    """
    env = config.torchrun_env()
    if env is None:  # one plain process: any device (mps included), as pick_device decides
        return DistContext(device=pick_device(device))
    where = _pick_device(device or config.device_name(), env.local_rank)
    backend = "nccl" if where.type == "cuda" else "gloo"
    context = DistContext(env.rank, env.local_rank, env.world_size, where, backend)
    if dist.is_initialized():
        return context
    if where.type == "cuda":
        torch.cuda.set_device(where)
    timeout = config.dist_timeout()
    try:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout),
                                device_id=where if where.type == "cuda" else None)
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise DistributedError(
            f"Process {env.rank} of {env.world_size} could not reach the others at "
            f"{env.master_addr}:{env.master_port} within {timeout:g} s (COURSE_DIST_TIMEOUT). Check that every "
            "machine runs the same torchrun command with the same --nnodes, rendezvous address and port, that "
            "this address is reachable from every machine (firewall), and on one machine with several network "
            f"interfaces set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME. ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return context


def shutdown_distributed() -> None:
    """Leave the process group (at the end of the run, on every process); harmless without one."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str | torch.device | None = None) -> Iterator[DistContext]:
    """``init_distributed`` ... ``shutdown_distributed``, also when the run fails in between."""
    context = init_distributed(device)
    try:
        yield context
    finally:
        shutdown_distributed()


def get_rank() -> int:
    """This process's number among all processes (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """How many processes train together (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the process that logs, plots and saves (always True without torchrun)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every process gets here (e.g. until rank 0 has written a file); a no-op for one process."""
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (a download, files prepared in a cache), then the others run it and find the
    files ready: no two processes write the same file at once. Without torchrun it just runs the block."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# --- The model: what trains, and a forward that DDP can see ------------------------------------------

def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> LossInputs:
    """Summed cross-entropy of ``logits [B, classes]`` against ``labels [B]``, and ``B``."""
    return F.cross_entropy(logits, labels, reduction="sum"), torch.tensor(labels.numel(), device=labels.device)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> LossInputs:
    """Summed next-token cross-entropy of ``logits [B, T, vocab]`` over the targets that are not -100
    (the response tokens in instruction tuning), and how many there are."""
    flat = targets.reshape(-1)
    loss_sum = F.cross_entropy(logits.reshape(flat.numel(), -1), flat, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (flat != IGNORE_INDEX).sum()


class LossModule(nn.Module):
    """The model plus how a batch becomes loss inputs, as ONE module, so DDP can wrap the whole forward.

    ``forward(model, inputs, lengths) -> logits`` is the course's way to run the model (e.g. the last real
    token's logits, or the cached fast path); ``loss(logits, targets) -> (loss_sum, count)`` is
    ``classification_loss_sum`` or ``token_loss_sum``.

    Why a module: DDP synchronises gradients only for a forward that goes through the *wrapped* module. Its
    ``forward`` tells the reducer a backward is coming and which outputs it will start from; the hooks on the
    parameters then all-reduce each gradient bucket as it becomes ready. The course's training code calls
    submodules directly (``model.embed``, ``model.blocks[i]``, ``model.out_head``); called that way on a wrapped
    model, the backward computes *local* gradients only, every process steps with different gradients, and the
    copies drift apart silently (``tests/test_distributed.py`` shows it). Putting the whole computation, down to
    the loss inputs, inside this module's ``forward`` makes ``wrapped(inputs, lengths, targets)`` the one call.
    """

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                 loss: Callable[[torch.Tensor, torch.Tensor], LossInputs] = classification_loss_sum) -> None:
        super().__init__()
        self.model, self.logits_of, self.loss_of = model, forward, loss

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> LossInputs:
        device = model_device(self.model)
        logits = self.logits_of(self.model, inputs.to(device), lengths.to(device))
        return self.loss_of(logits, targets.to(device))


def wrap_model(module: nn.Module, context: DistContext, *, static_graph: bool = True) -> nn.Module:
    """``module`` on this process's device, wrapped in ``DistributedDataParallel`` under torchrun.

    Choose what trains (``requires_grad``) BEFORE wrapping: DDP builds its gradient buckets and hooks from the
    parameters that require a gradient at this moment; one unfrozen later is never synchronised, one frozen
    later makes DDP wait for a gradient that never comes.

    Unused parameters: DDP expects every trainable parameter to get a gradient in every backward, or it waits
    for the missing ones (an error at the next step). ``find_unused_parameters=True`` fixes that by walking the
    autograd graph after every forward, which costs time each step. The course's graph is the same at every
    step (the same trainable set, the same forward), so we pass ``static_graph=True`` instead: DDP records in
    the first step which parameters went unused (e.g. a language-model head next to a classification head) and
    skips them from then on, with no per-step search. Pass ``static_graph=False`` only for a model whose forward
    changes from step to step; then give it ``find_unused_parameters=True`` yourself.

    Without torchrun the module comes back unwrapped (on ``context.device``): the same code runs everywhere.
    """
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError("Nothing trains: set requires_grad on the parts to train (add the head, pick the blocks, "
                         "apply LoRA) before wrap_model, because DDP only synchronises what trains when it wraps.")
    module = module.to(context.device)
    if not dist.is_initialized():
        return module
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, static_graph=static_graph)


def unwrap(module: nn.Module) -> nn.Module:
    """The course model inside ``DistributedDataParallel`` and ``LossModule`` (its state has no ``module.``)."""
    if isinstance(module, DistributedDataParallel):
        module = module.module
    return module.model if isinstance(module, LossModule) else module


# --- Data: one slice of every global batch per process ----------------------------------------------

def sharded_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 123,
                   drop_last: bool = True, collate_fn: Callable | None = None, rank: int | None = None,
                   world_size: int | None = None) -> DataLoader:
    """This process's batches of ``batch_size`` items, from a ``DistributedSampler``.

    The global batch is ``batch_size x world_size``: at step ``s`` the processes together see items
    ``s*B*N ... (s+1)*B*N - 1`` of the epoch's permutation (process ``r`` takes every N-th item from ``r``).
    The permutation depends only on ``seed + epoch`` (call ``set_epoch`` before each epoch), so one process
    reproduces the same global batches with ``sharded_loader(dataset, batch_size * N, rank=0, world_size=1)``.
    ``drop_last`` (the default, for training) gives every process the same number of full batches; without it
    the sampler pads the epoch with repeated items (counted twice) and the last global batch is short.
    ``rank`` / ``world_size`` default to the current process group's (0 and 1 without torchrun).
    For validation and test, shard nothing: rank 0 evaluates the whole split with the ordinary loader (a sampler
    without ``drop_last`` pads the split with repeated items, which would bias the accuracy).
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size or get_world_size(),
                                 rank=get_rank() if rank is None else rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_fn)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's ``DistributedSampler`` which epoch starts (else every epoch repeats epoch 0's order)."""
    if not isinstance(loader.sampler, DistributedSampler):
        raise TypeError("set_epoch needs a loader from sharded_loader (a DistributedSampler).")
    loader.sampler.set_epoch(epoch)


# --- The loss: a mean over the GLOBAL batch ----------------------------------------------------------

def global_mean_loss(loss_sum: torch.Tensor, count: torch.Tensor | int) -> tuple[torch.Tensor, float]:
    """``(loss to call backward on, the global batch's mean loss to log)`` from this process's loss inputs.

    Process ``r`` holds ``S_r`` (its summed loss) and ``n_r`` (its items: examples, or response tokens).
    One process with the whole global batch would minimise ``S / n`` with ``S = sum_r S_r``, ``n = sum_r n_r``,
    so its gradient is ``sum_r grad(S_r) / n``. DDP *averages* gradients over the N processes, so if each
    process backpropagates ``L_r`` the result is ``(1/N) sum_r grad(L_r)``. Choosing
    ``L_r = S_r * N / n`` (``n`` from an all-reduce, a constant for autograd) gives
    ``(1/N) sum_r N grad(S_r) / n = sum_r grad(S_r) / n``: exactly the one-process gradient.
    The usual per-process mean ``L_r = S_r / n_r`` gives ``(1/N) sum_r grad(S_r) / n_r`` instead, which
    is different whenever the ``n_r`` differ, as they do in instruction tuning: the number of response tokens
    varies from batch to batch. One all-reduce per step carries both ``n`` and ``S`` (for the logged mean).
    A global batch with nothing to score (``n = 0``) gives a zero loss.
    """
    count = torch.as_tensor(count, device=loss_sum.device, dtype=loss_sum.dtype)
    totals = torch.stack([loss_sum.detach(), count])
    if dist.is_initialized():
        dist.all_reduce(totals)
    n = totals[1].clamp(min=1)
    return loss_sum * (get_world_size() / n), float(totals[0] / n)


def mixed_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """``precision_for(device).autocast()``: bf16 (or fp16) autocast on CUDA GPUs, nothing elsewhere. Under fp16
    the step needs ``precision_for(device).grad_scaler()`` too (``train.optimizer_step``)."""
    return precision_for(device).autocast()


# --- Rank 0 logs and saves ----------------------------------------------------------------------------

def print_main(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (N processes would print every line N times)."""
    if is_main():
        print(*args, **kwargs)


def save_state_dict(model: nn.Module, path: Path) -> None:
    """The model's weights as a plain state dict on the CPU (the default of ``save_on_main``)."""
    torch.save({name: t.detach().cpu() for name, t in model.state_dict().items()}, path)


def save_on_main(module: nn.Module, path: str | Path,
                 save: Callable[[nn.Module, Path], Any] = save_state_dict) -> Path | None:
    """Rank 0 saves the UNWRAPPED model with ``save(model, path)``; every process then waits for it.

    Unwrapped: the state of a ``DistributedDataParallel`` has every name prefixed with ``module.``, which a
    plain model cannot load. The file appears atomically (written under a temporary name, then renamed), so
    a run killed while saving leaves the previous checkpoint intact. Returns the path on rank 0, None elsewhere.
    """
    path = Path(path)
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save(unwrap(module), tmp)
        tmp.replace(path)
    barrier()
    return path if is_main() else None
