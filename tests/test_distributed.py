"""``helpers.distributed``: 2 gloo processes under torchrun on the loopback network vs one process.

One torchrun launch (``tests/ddp_worker.py``, about 10-20 s on 2 cores) feeds most tests; the one-process
reference runs here with 1 thread, like each of the 2 processes. Every launch has a start-up timeout
(COURSE_DIST_TIMEOUT) and a subprocess timeout, so a hang fails with a message instead of stalling the suite.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import ddp_worker as worker
from helpers import config
from helpers.distributed import (
    DistContext, LossModule, classification_loss_sum, global_mean_loss, init_distributed, is_main, mixed_precision,
    save_on_main, set_epoch, sharded_loader, unwrap, wrap_model,
)

TESTS = Path(__file__).resolve().parent
LAUNCH_TIMEOUT = 60  # seconds for a whole torchrun launch
STARTUP_TIMEOUT = 20  # COURSE_DIST_TIMEOUT inside it
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(**extra: str) -> dict[str, str]:
    """This environment without torchrun's variables, 1 thread, loopback only, a short start-up timeout."""
    env = {k: v for k, v in os.environ.items() if k not in config.TORCHRUN_VARIABLES}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
                "COURSE_DIST_TIMEOUT": str(STARTUP_TIMEOUT), **extra})
    return env


def run_bounded(cmd: list[str], env: dict[str, str], what: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; kill the whole group and fail clearly after LAUNCH_TIMEOUT s."""
    proc = subprocess.Popen(cmd, env=env, cwd=TESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in {LAUNCH_TIMEOUT} s (a hang: a process waiting for another). "
                    f"Output:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, str]:
    """Launch ``ddp_worker.py`` on 2 gloo processes; its output folder and its printed lines."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max_restarts=0",
           str(TESTS / "ddp_worker.py"), str(out)]
    result = run_bounded(cmd, process_env(), "torchrun with 2 processes")
    assert result.returncode == 0, f"torchrun failed (exit {result.returncode}):\n{result.stdout[-3000:]}"
    return out, result.stdout


@pytest.fixture(scope="module")
def ranks(two_processes) -> list[dict]:
    out, _ = two_processes
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_run() -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, one thread, the same global batches (``BATCH x WORLD``): final weights and losses."""
    loader = sharded_loader(worker.classification_data(), worker.BATCH * WORLD, seed=5, rank=0, world_size=1)
    step, losses = worker.train(loader, DistContext())
    return unwrap(step).state_dict(), losses


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, name: str, rel: float = 1e-5) -> None:
    """``max |actual - expected| <= rel * max |expected|``: relative to the tensor's scale, so an entry that
    crosses zero is not judged by its own (tiny) size."""
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= rel * scale, f"{name}: max difference {error:.3g} > {rel:g} x {scale:.3g}"


def test_ranks_identical_and_equal_to_one_process(ranks, one_thread):
    assert [(r["rank"], r["world_size"], r["backend"], r["threads"]) for r in ranks] == [(0, 2, "gloo", 1),
                                                                                         (1, 2, "gloo", 1)]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), f"{name} differs between the 2 processes"
    reference, losses = reference_run()
    initial = worker.build_model().state_dict()
    assert len(losses) == len(ranks[0]["losses"]) == 4
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-5), "logged losses differ from one process's"
    trained = 0
    for name, expected in reference.items():
        actual = ranks[0]["state"][name]
        if name.startswith(worker.FROZEN) or name.startswith("lm_head"):  # frozen / unused by this loss
            assert torch.equal(actual, initial[name]), f"{name} should not have changed"
        else:
            assert not torch.equal(expected, initial[name]), f"{name} did not train"
            assert_relative_close(actual, expected, name)
            trained += 1
    assert trained >= 5


def test_one_checkpoint_by_rank_0_without_module_prefix(two_processes, ranks):
    out, _ = two_processes
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert files == ["model.pt"], f"expected exactly one checkpoint file, found {files}"
    state = torch.load(out / "checkpoint" / "model.pt", weights_only=True)
    assert list(state) == list(worker.build_model().state_dict()), "checkpoint names differ from the plain model's"
    assert not any(name.startswith("module.") for name in state)
    for name, tensor in state.items():
        assert torch.equal(tensor, ranks[0]["state"][name])
    worker.build_model().load_state_dict(state)  # a plain model loads it


def test_only_rank_0_prints(two_processes):
    _, stdout = two_processes
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1", "2", "3", "4"], stdout[-2000:]


def reference_gradients(kind: str) -> tuple[dict[str, torch.Tensor], float]:
    """One process, the whole global batch, the mean over all its scored items."""
    module = worker.loss_module(kind)
    parts = worker.normalisation_batches(kind)
    batch = [torch.cat(tensors) for tensors in zip(*parts)]
    loss_sum, count = module(*batch)
    loss = loss_sum / count
    loss.backward()
    return worker.grads(module), loss.item()


@pytest.mark.parametrize("kind", ["classify", "tokens"])
def test_loss_divided_by_count_summed_over_processes(ranks, kind, one_thread):
    results = [r["normalisation"][kind] for r in ranks]
    assert results[0]["count"] != results[1]["count"], "the test needs processes with different counts"
    expected, expected_loss = reference_gradients(kind)
    assert set(results[0]["global"]) == set(expected)
    for result in results:
        assert result["mean"] == pytest.approx(expected_loss, rel=1e-5)
        for name, grad in expected.items():
            assert_relative_close(result["global"][name], grad, f"{kind} gradient of {name}")
    # The per-process mean that DDP then averages is NOT the one-process mean: the fix matters.
    naive_error = max(float((results[0]["naive"][n] - g).abs().max() / g.abs().max()) for n, g in expected.items())
    assert naive_error > 1e-2


def test_forward_that_bypasses_the_wrapper_is_not_synchronised(ranks):
    bypassed = [r["bypass"] for r in ranks]
    synced = [r["normalisation"]["classify"]["naive"] for r in ranks]  # same data, through the wrapper
    assert all(torch.equal(synced[0][n], synced[1][n]) for n in synced[0])
    assert any(not torch.equal(bypassed[0][n], bypassed[1][n]) for n in bypassed[0])


def test_startup_timeout_fails_with_a_message():
    """Rank 0 of 2 whose partner never comes: a clear error after COURSE_DIST_TIMEOUT, no hang."""
    env = process_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), COURSE_DIST_TIMEOUT="2")
    start = time.monotonic()
    result = run_bounded([sys.executable, "-c", "from helpers.distributed import init_distributed; "
                          "init_distributed('cpu')"], env, "a process waiting for a missing partner")
    assert result.returncode != 0
    assert "DistributedError" in result.stdout and "COURSE_DIST_TIMEOUT" in result.stdout, result.stdout[-2000:]
    assert time.monotonic() - start < 40


# --- One process, no torchrun ----------------------------------------------------------------------------

def test_single_process_mode(monkeypatch):
    for name in config.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    context = init_distributed("cpu")
    assert (context.rank, context.world_size, context.backend, context.is_main, is_main()) == (0, 1, None, True, True)
    module = LossModule(worker.build_model(), worker.last_token_logits, classification_loss_sum)
    assert wrap_model(module, context) is module and unwrap(module) is module.model
    loss, mean = global_mean_loss(torch.tensor(6.0, requires_grad=True), torch.tensor(4))
    assert loss.item() == mean == 1.5
    assert isinstance(mixed_precision(context.device), contextlib.nullcontext)  # bf16 autocast on CUDA only


def test_wrap_model_needs_something_to_train():
    model = worker.build_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        wrap_model(model, DistContext())


def test_save_on_main_single_process(tmp_path):
    module = LossModule(worker.build_model(), worker.last_token_logits)
    assert save_on_main(module, tmp_path / "m.pt") == tmp_path / "m.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left behind
    assert list(torch.load(tmp_path / "m.pt", weights_only=True)) == list(module.model.state_dict())


def test_sharded_batches_form_the_global_batch():
    """At every step the processes' batches together are the one-process batch of B x WORLD items."""
    data = TensorDataset(torch.arange(23))  # items are their own indices; 23 = 3 global batches of 6 + 5 dropped
    orders = []
    for epoch in range(2):
        single = sharded_loader(data, 3 * WORLD, seed=5, rank=0, world_size=1)
        per_rank = [sharded_loader(data, 3, seed=5, rank=r, world_size=WORLD) for r in range(WORLD)]
        for loader in (single, *per_rank):
            set_epoch(loader, epoch)
        assert len(single) == len(per_rank[0]) == len(per_rank[1]) == 3
        for (whole,), *parts in zip(single, *per_rank):
            assert sorted(whole.tolist()) == sorted(i for (part,) in parts for i in part.tolist())
        orders.append(list(single.sampler))
    assert orders[0] != orders[1], "set_epoch should give each epoch its own order"


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not"),
    ({"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "whole numbers"),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "Inconsistent"),
])
def test_torchrun_variables_are_checked(monkeypatch, env, message):
    for name in config.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        config.torchrun_env()
