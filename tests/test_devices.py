"""One device decision and one precision policy for every helper (issue 13, "Devices"), tested on the CPU.

* ``pick_device`` / COURSE_DEVICE and ``precision_for`` with CUDA / MPS availability faked;
* the autocast and GradScaler code paths, run for real on the CPU (PyTorch has CPU autocast and a CPU GradScaler);
* every helper on a second device: ``tests/second_device.py`` makes the CPU look like two devices, so a batch
  a helper forgets to move fails here as it would on a GPU, while every value stays comparable with the CPU's;
* ``load_classifier`` of a checkpoint saved on a GPU machine, on a machine without one (``map_location``);
* ``scripts/gpu_check.py --dry-run``, on a copy of this environment without the libraries it claims not to need.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from helpers import distributed, fastpath, train
from helpers.checkpoints import load_adapters, load_classifier, save_adapters, save_classifier
from helpers.data import SpamDataset
from helpers.evaluate import classify, predict
from helpers.fastpath import cache_device, make_batches, split_batches
from helpers.lora import LoRALinear, apply_lora, apply_qlora
from helpers.models import base
from helpers.models.base import (
    AUTOCAST_RTOL, Precision, add_classifier_head, clock, generate_greedy, last_token_logits, pick_device,
    precision_for,
)
from helpers.models.gpt2 import GPT2Config, GPT2Model
from helpers.nf4 import NF4Linear
from helpers.train import TrainConfig, accuracies, batch_loss, optimizer_step, train_classifier
from second_device import OTHER, Elsewhere, SecondDevice

ROOT = Path(__file__).resolve().parents[1]
TINY = GPT2Config(vocab_size=256, context_length=64, emb_dim=16, n_heads=2, n_layers=3)


class ByteTokenizer:
    """UTF-8 bytes as token ids: enough for ``classify`` and ``generate_greedy``, no tokenizer files needed."""

    name, pad_id, vocab_size = "bytes", 0, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())[:48]

    def decode(self, ids) -> str:
        return bytes(ids).decode(errors="replace")


def tiny_model(seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    model = GPT2Model(TINY)
    model.tokenizer = ByteTokenizer()
    return model


@pytest.fixture(scope="module")
def datasets() -> dict[str, SpamDataset]:
    texts = [f"message {i} " + "ab" * (i % 11) for i in range(40)]
    df = pd.DataFrame({"Text": texts, "Label": [i % 2 for i in range(40)]})
    tok = ByteTokenizer()
    return {"train": SpamDataset(df[:24], tok), "validation": SpamDataset(df[24:32], tok),
            "test": SpamDataset(df[32:], tok)}


# --- The device decision -------------------------------------------------------------------------------

@pytest.fixture
def machine(monkeypatch):
    """Fake what this machine has: ``machine(cuda=2, mps=True)``; COURSE_DEVICE unset."""
    monkeypatch.delenv("COURSE_DEVICE", raising=False)

    def fake(cuda: int = 0, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return fake


@pytest.mark.parametrize("cuda, mps, expected", [(1, True, "cuda"), (0, True, "mps"), (0, False, "cpu")])
def test_default_device_is_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert pick_device() == torch.device(expected)


def test_course_device_overrides_the_default_and_an_argument_overrides_both(machine, monkeypatch):
    machine(cuda=2, mps=True)
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", " cuda:1 ")
    assert pick_device() == torch.device("cuda", 1)
    assert pick_device("mps") == torch.device("mps")


@pytest.mark.parametrize("value, error, message", [
    ("gpu", ValueError, r"COURSE_DEVICE='gpu' is not a device: use cpu, cuda, cuda:1 .* unset COURSE_DEVICE"),
    ("cuda:x", ValueError, "is not a device"),
    ("cuda:2", RuntimeError, r"'cuda:2' was asked for, but this machine has 2 CUDA GPU\(s\), numbered from 0"),
    ("mps", RuntimeError, "MPS .* is not available; use 'cpu', or unset COURSE_DEVICE"),
])
def test_course_device_errors_say_what_to_do(machine, monkeypatch, value, error, message):
    machine(cuda=2)
    monkeypatch.setenv("COURSE_DEVICE", value)
    with pytest.raises(error, match=message):
        pick_device()


def test_cuda_asked_for_without_cuda(machine):
    machine(cuda=0)
    with pytest.raises(RuntimeError, match=r"device='cuda' was asked for, but CUDA is not available.*leave it out"):
        pick_device("cuda")


def test_single_process_engine_uses_the_same_decision(machine, monkeypatch):
    machine(cuda=0)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert distributed.init_distributed().device == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", "mps")
    with pytest.raises(RuntimeError, match="MPS"):
        distributed.init_distributed()


# --- The precision policy ------------------------------------------------------------------------------

@pytest.fixture
def gpu(monkeypatch):
    """Fake a CUDA GPU of a compute capability: ``gpu((8, 0))``; bf16 is native from 8.0, emulated below."""

    def fake(capability: tuple[int, int], old_torch: bool = False) -> None:
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            return capability >= (8, 0) or including_emulation

        def old_is_bf16_supported() -> bool:  # an older PyTorch: no keyword (and its answer is not used)
            return True

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", old_is_bf16_supported if old_torch else is_bf16_supported)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return fake


@pytest.mark.parametrize("capability, old_torch, expected", [
    ((9, 0), False, torch.bfloat16),  # H100
    ((8, 0), True, torch.bfloat16),  # A100 with an older PyTorch
    ((7, 5), False, torch.float16),  # T4 (Colab's free GPU): bf16 only emulated, so fp16
    ((7, 0), True, torch.float16),  # V100
    ((6, 1), False, torch.float32),  # GTX 10xx: no tensor cores, mixed precision would not help
])
def test_precision_for_cuda(gpu, capability, old_torch, expected):
    gpu(capability, old_torch)
    precision = precision_for("cuda:0")
    assert (precision.device_type, precision.dtype) == ("cuda", expected)
    assert precision.needs_scaler == (expected == torch.float16)  # the GradScaler for fp16 only


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_no_autocast_on_cpu_or_mps(device):
    precision = precision_for(device)
    assert precision == Precision(device, torch.float32) and precision.name == "fp32"
    assert not precision.needs_scaler and not precision.grad_scaler().is_enabled()
    with precision.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_autocast_context_and_scaler():
    bf16, fp16 = Precision("cpu", torch.bfloat16), Precision("cpu", torch.float16)
    with bf16.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not bf16.grad_scaler().is_enabled() and fp16.grad_scaler().is_enabled()
    assert distributed.mixed_precision(torch.device("cpu")).__class__.__name__ == "nullcontext"


def test_grad_scaler_step_equals_a_plain_step_and_skips_overflow():
    """What fp16 training relies on, checked in float32: the scaled step is the plain step; inf is skipped."""
    torch.manual_seed(0)
    plain = nn.Linear(4, 2)
    scaled = copy.deepcopy(plain)
    x = torch.randn(8, 4)
    for model, scaler in ((plain, torch.amp.GradScaler("cpu", enabled=False)),
                          (scaled, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer_step(model(x).square().mean(), optimizer, scaler)
    torch.testing.assert_close(scaled.weight, plain.weight)
    before = scaled.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    optimizer = torch.optim.SGD(scaled.parameters(), lr=0.1)
    optimizer.zero_grad()
    optimizer_step(scaled(x).sum() * float("inf"), optimizer, scaler)
    assert torch.equal(scaled.weight, before) and scaler.get_scale() == 2.0 ** 9  # skipped, scale halved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_under_autocast_stays_close_to_float32(datasets, dtype, monkeypatch):
    """The training loop's autocast + scaler path, run for real on the CPU."""
    scalers = []
    real_step = train.optimizer_step
    monkeypatch.setattr(train, "optimizer_step", lambda loss, opt, scaler: scalers.append(scaler.is_enabled())
                        or real_step(loss, opt, scaler))
    mixed = Precision("cpu", dtype)
    model = add_classifier_head(tiny_model())
    batches = make_batches(model, datasets["test"], cache=False, progress=False)  # packed token batches
    ids, lengths, _ = next(iter(batches))
    with torch.no_grad():
        fp32_logits = batches.forward(model, ids, lengths)
        with mixed.autocast():
            mixed_logits = batches.forward(model, ids, lengths)
    assert mixed_logits.dtype == dtype  # autocast did act
    relative = float((mixed_logits.float() - fp32_logits).abs().max() / fp32_logits.abs().max())
    assert 0 < relative <= AUTOCAST_RTOL[mixed.name]

    losses = {}
    for precision in (Precision("cpu"), mixed):
        model = add_classifier_head(tiny_model())
        batches = split_batches(model, datasets, batch_size=4, progress=False)
        history = train_classifier(model, batches["train"], batches["validation"],
                                   TrainConfig(epochs=1, eval_freq=2, eval_iter=2), progress=False, precision=precision)
        assert (history.precision, history.device, history.steps) == (precision.name, "cpu", 6)
        losses[precision.name] = history.train_losses
    assert scalers == [False] * 6 + [dtype == torch.float16] * 6  # the scaler acts under fp16 only
    torch.testing.assert_close(torch.tensor(losses[mixed.name]), torch.tensor(losses["fp32"]), atol=0.05, rtol=0)


# --- Every helper on a second device ------------------------------------------------------------------

def test_the_second_device_catches_a_missing_move():
    """The harness is strict: a CPU batch given to a model on the other device fails, as on a GPU."""
    with SecondDevice():
        model = tiny_model().to(OTHER)
        ids, lengths = torch.randint(0, 256, (2, 5)), torch.tensor([5, 3])
        with pytest.raises(RuntimeError, match="a .to\\(device\\) is missing"):
            last_token_logits(model, ids, lengths)
        assert last_token_logits(model, ids.to(OTHER), lengths.to(OTHER)).device == OTHER


def run_course(datasets: dict[str, SpamDataset], device: torch.device | None) -> dict:
    """Notebooks 04-07 in small: generation, cached training, evaluation, classify, QLoRA. The model is moved
    to ``device`` once; after that only the helpers act."""
    model = tiny_model()
    model = model.to(device) if device is not None else model
    out = {"generated": generate_greedy(model, "hello", 4)}
    add_classifier_head(model)
    batches = split_batches(model, datasets, batch_size=4, progress=False)
    out["cache_devices"] = {h.device for h in batches["train"].loader.dataset.hidden}
    history = train_classifier(model, batches["train"], batches["validation"],
                               TrainConfig(epochs=1, eval_freq=2, eval_iter=2), progress=False)
    out["losses"], out["accuracies"] = history.train_losses, accuracies(model, batches)
    out["probabilities"] = predict(model, batches["test"])[2]
    out["classify"] = classify(model, "hello there").spam_probability

    qlora = add_classifier_head(tiny_model(1), trainable_blocks=0)
    qlora = apply_qlora(qlora.to(device) if device is not None else qlora, rank=2)
    out["new_layer_devices"] = {t.device for m in qlora.modules() if isinstance(m, (LoRALinear, NF4Linear))
                                for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    q_batches = split_batches(qlora, datasets, batch_size=4, progress=False)
    out["qlora_losses"] = train_classifier(qlora, q_batches["train"], q_batches["validation"],
                                           TrainConfig(epochs=1, eval_freq=3, eval_iter=2), progress=False).train_losses
    return out


def test_every_helper_keeps_the_work_on_the_models_device(datasets):
    with SecondDevice():
        there = run_course(datasets, OTHER)
    here = run_course(datasets, None)
    assert there["cache_devices"] == there["new_layer_devices"] == {OTHER}  # cache, LoRA A/B, NF4 buffers
    assert here["cache_devices"] == here["new_layer_devices"] == {torch.device("cpu")}
    assert there["generated"] == here["generated"] and there["accuracies"] == here["accuracies"]
    for key in ("losses", "probabilities", "classify", "qlora_losses"):
        torch.testing.assert_close(torch.as_tensor(there[key]), torch.as_tensor(here[key]), atol=1e-5, rtol=0)


def test_lora_and_adapters_follow_the_model(tmp_path):
    model = apply_lora(add_classifier_head(tiny_model(), trainable_blocks=0), rank=2)
    save_adapters(model, tmp_path / "adapters.safetensors")
    with SecondDevice():
        fresh = tiny_model().to(OTHER)
        load_adapters(fresh, tmp_path / "adapters.safetensors")
        assert {p.device for p in fresh.parameters()} == {OTHER}
        ids = torch.randint(0, 256, (2, 6))
        there = last_token_logits(fresh, ids.to(OTHER), torch.tensor([6, 2]).to(OTHER)).cpu()
    torch.testing.assert_close(there, last_token_logits(model, ids, torch.tensor([6, 2])), atol=1e-5, rtol=0)


def test_cache_stays_on_a_gpu_unless_it_lacks_room(monkeypatch):
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))  # (free, total)
    cuda = torch.device("cuda", 0)
    assert cache_device(cuda, 4 * gib) == cuda
    assert cache_device(cuda, 6 * gib) == torch.device("cpu")  # more than half the free memory
    assert cache_device(torch.device("cpu"), 100 * gib) == torch.device("cpu")
    assert fastpath.CACHE_GPU_FRACTION == 0.5


def test_clock_waits_for_the_device(monkeypatch, datasets):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append(("mps", None)))
    clock("cuda:1"), clock("mps"), clock("cpu"), clock()
    assert waited == [("cuda", torch.device("cuda", 1)), ("mps", None)]
    read = []
    real_clock = train.clock
    monkeypatch.setattr(train, "clock", lambda device=None: read.append(device) or real_clock(device))
    model = add_classifier_head(tiny_model())
    batches = split_batches(model, datasets, batch_size=4, cache=False, progress=False)
    history = train_classifier(model, batches["train"], batches["validation"],
                               TrainConfig(epochs=1, max_steps_per_epoch=1), progress=False)
    assert read == [torch.device("cpu")] * 2 and history.seconds > 0  # History.seconds: two synchronised reads


def test_load_model_puts_the_model_on_the_chosen_device(monkeypatch):
    from helpers import models

    monkeypatch.setattr(models, "load_gpt2", lambda name: tiny_model())
    with SecondDevice():
        model = models.load_model("gpt2", device=OTHER)
        assert {p.device for p in model.parameters()} == {OTHER}
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert {p.device for p in models.load_model("gpt2").parameters()} == {torch.device("cpu")}


# --- Checkpoints saved on a GPU machine ----------------------------------------------------------------

@pytest.mark.needs_tokenizer  # load_classifier attaches GPT-2's tokenizer
def test_load_classifier_maps_a_gpu_checkpoint_to_the_cpu(tmp_path, monkeypatch):
    """A classifier file whose tensors say ``cuda:0`` (as ``torch.save`` writes them on a GPU) loads on the CPU."""
    model = add_classifier_head(tiny_model())
    path = tmp_path / "gpu-classifier.pt"
    registry = torch.serialization._package_registry
    monkeypatch.setattr(torch.serialization, "_package_registry",
                        [(0, lambda storage: "cuda:0", lambda storage, location: None), *registry])
    save_classifier(model, path, max_length=48)
    monkeypatch.setattr(torch.serialization, "_package_registry", registry)
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does with it here
        torch.load(path, weights_only=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    loaded = load_classifier(path)  # pick_device() -> cpu; map_location moves every tensor there
    assert {p.device for p in loaded.parameters()} == {torch.device("cpu")}
    ids = torch.randint(0, 256, (2, 6))
    torch.testing.assert_close(last_token_logits(loaded, ids, torch.tensor([6, 4])),
                               last_token_logits(model, ids, torch.tensor([6, 4])), atol=0, rtol=0)


# --- scripts/gpu_check.py ------------------------------------------------------------------------------

def bare_site(folder: Path, absent: set[str]) -> Path:
    """A copy (symbolic links) of this environment's installed packages, without those in ``absent``."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if re.split(r"[-.]", entry.name)[0].lower() in absent or entry.suffix == ".pth" or "__editable__" in entry.name:
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


def test_gpu_check_dry_run_on_a_bare_machine(tmp_path):
    """The dry run passes with only torch and tqdm among the course's libraries, as on a bare GPU machine."""
    absent = {"numpy", "pandas", "tiktoken", "tokenizers", "gguf", "safetensors", "matplotlib", "regex"}
    env = {**os.environ, "PYTHONPATH": str(bare_site(tmp_path / "site", absent))}
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, "-S", str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["dry_run"] and report["precision"] == "bf16"
    assert set(report["stand_ins"]) == {"numpy", "pandas", "tiktoken", "tokenizers", "gguf"}
    names = {(c["model"], c["check"]) for c in report["checks"]}
    for model in ("gpt2", "smollm2"):
        assert {(model, "logits fp32 vs CPU"), (model, "logits bf16 vs CPU fp32")} <= names
        for path in ("cached", "tokens", "lora", "qlora"):
            assert {(model, f"{path}: loss fp32 vs CPU"), (model, f"{path}: bf16 step")} <= names
    recipes = {(r["model"], r["precision"]): r for r in report["recipes"]}
    assert set(recipes) == {(m, p) for m in ("gpt2", "smollm2") for p in ("bf16", "fp32")}
    assert all(r["fast_path"] and r["steps"] == 40 // 8 and r["total_seconds"] > 0 for r in recipes.values())
    assert "20/20 checks passed" in done.stdout


def test_gpu_check_uses_smollm2s_real_shapes():
    gguf = pytest.importorskip("gguf")
    from helpers.models.smollm2 import config_from_gguf, find_gguf

    try:
        path = find_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert gpu_check.SMOLLM2_135M == config_from_gguf(gguf.GGUFReader(path))
