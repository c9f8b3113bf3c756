"""``python -m helpers.finetune``: the notebooks' results, resume after an interruption, clear errors, and
2 gloo processes under torchrun against one process (the tiny GPT-2 of conftest, the SMS data it serves).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from torch.utils.data import DistributedSampler

from helpers import checkpoints, data, fastpath, finetune, instruct, own_data, train
from helpers.instruct_data import random_split_examples
from helpers.distributed import sharded_loader
from helpers.models import load_model
from helpers.models.base import add_classifier_head
from test_distributed import assert_relative_close, free_port, process_env, run_bounded

pytestmark = pytest.mark.needs_tokenizer
TESTS = Path(__file__).resolve().parent
FEW_STEPS = ["--epochs", "1", "--max-steps-per-epoch", "4", "--eval-freq", "2", "--eval-iter", "2", "--no-progress"]
RESULTS = {"classifier.pt", "metrics.json", "finetune-loss.png", "finetune-accuracy.png"}


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    """A small labelled file of the learner's own (JSONL, other column names): fast runs, whole-split metrics."""
    rows = [(f"order {i} arrived late and broken, please refund", "complaint") for i in range(40)]
    rows += [(f"thanks, item {i} works great", "praise") for i in range(40)]
    path = tmp_path_factory.mktemp("own") / "reviews.jsonl"
    path.write_text("".join(json.dumps({"review": t, "kind": k}) + "\n" for t, k in rows))
    return path


def own_file(path: Path) -> list[str]:
    return ["--data", str(path), "--text-column", "review", "--label-column", "kind"]


def finetune_ok(*argv: str) -> dict:
    """Run the command in this process; it must succeed. Returns its metrics.json."""
    assert finetune.main(list(argv)) == 0
    out = Path(argv[argv.index("--output") + 1])
    return json.loads((out / "metrics.json").read_text())


def reference_classifier(batch_size: int = 8, steps: int = 4, eval_freq: int = 2, eval_iter: int = 2):
    """Notebook 05's helpers with the same settings: head, cached batches, ``train.train_classifier``.

    The one difference is the shuffle: the command draws each epoch's order from a ``DistributedSampler``
    (seed + epoch, the same for 1 or N processes), while the notebook's DataLoader draws it from its generator
    after taking a worker seed from it. So the reference trains on the command's order: its one-process form.
    """
    model = add_classifier_head(load_model(device="cpu"), num_classes=2, trainable_blocks=1, seed=123)
    datasets = data.tokenize_splits(data.load_splits(), model.tokenizer, context_length=model.cfg.context_length)
    batches = {name: fastpath.make_batches(model, ds, batch_size=batch_size, progress=False)
               for name, ds in datasets.items()}
    cached = batches["train"]
    order = sharded_loader(cached.loader.dataset, batch_size, seed=123, rank=0, world_size=1,
                           collate_fn=cached.loader.collate_fn)
    cfg = train.TrainConfig(epochs=1, max_steps_per_epoch=steps, eval_freq=eval_freq, eval_iter=eval_iter)
    history = train.train_classifier(model, fastpath.Batches(order, cached.forward, cached.cached),
                                     batches["validation"], cfg, progress=False)
    return model, batches, history


@pytest.mark.slow
def test_classify_equals_the_notebook_helpers(tmp_path):
    out = tmp_path / "run"
    metrics = finetune_ok("--task", "classify", "--method", "last-block", "--output", str(out), "--device", "cpu",
                          *FEW_STEPS)
    assert {p.name for p in out.iterdir()} == RESULTS  # one checkpoint, no resume.pt left behind
    model, batches, history = reference_classifier()
    saved = checkpoints.load_classifier(out / "classifier.pt", device="cpu")
    initial = add_classifier_head(load_model(device="cpu"), num_classes=2, trainable_blocks=1, seed=123)
    trained = 0
    for name, expected in model.state_dict().items():
        assert_relative_close(saved.state_dict()[name], expected, name)
        trained += not torch.equal(expected, initial.state_dict()[name])
    assert trained >= 10, "the last block, final norm and head should have trained"
    assert metrics["history"]["steps"] == history.steps == 4
    # validation: the same batches (the training figures differ: the command evaluates the training split
    # in order, so that a resumed run evaluates on the same batches as an uninterrupted one)
    assert metrics["history"]["val_losses"] == pytest.approx(history.val_losses, rel=1e-5)
    assert metrics["history"]["val_accs"] == pytest.approx(history.val_accs, abs=1e-9)
    assert metrics["accuracy"]["validation"] == pytest.approx(train.calc_accuracy(model, batches["validation"]),
                                                              abs=1e-9)
    assert metrics["fast_path"] and metrics["labels"] == {"ham": 0, "spam": 1}


def interrupt_at(monkeypatch, call: int) -> None:
    """Make the ``call``-th optimizer step raise, as a killed run stops: nothing else is written."""
    calls = {"n": 0}
    real = finetune.optimizer_step

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "optimizer_step", killed)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch, reviews):
    settings = [*own_file(reviews), "--batch-size", "4", "--epochs", "2", "--max-steps-per-epoch", "3",
                "--eval-freq", "2", "--eval-iter", "1",
                "--save-every", "2", "--method", "last-k", "--k", "2", "--device", "cpu", "--no-progress"]
    whole = finetune_ok(*settings, "--output", str(tmp_path / "whole"))
    interrupt_at(monkeypatch, 6)  # resume.pt holds step 4 (epoch 2, 1 batch done); step 5 is lost
    with pytest.raises(KeyboardInterrupt):
        finetune.main([*settings, "--output", str(tmp_path / "cut")])
    assert {p.name for p in (tmp_path / "cut").iterdir()} == {"resume.pt"}
    state = torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)
    assert (state["epoch"], state["done"], state["history"]["steps"]) == (1, 1, 4)
    monkeypatch.undo()
    resumed = finetune_ok(*settings, "--output", str(tmp_path / "cut"), "--resume")
    assert {p.name for p in (tmp_path / "cut").iterdir()} == RESULTS
    a, b = (torch.load(tmp_path / run / "classifier.pt", weights_only=True)["state_dict"] for run in ("whole", "cut"))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming"
    for key in ("steps", "examples_seen", "epochs", "train_losses", "val_losses", "train_accs", "val_accs"):
        assert resumed["history"][key] == whole["history"][key], key
    assert resumed["accuracy"] == whole["accuracy"]


@pytest.mark.slow
def test_resume_after_a_real_kill(tmp_path, reviews):
    """SIGKILL the command once its first resume.pt exists; resuming gives the uninterrupted run's weights."""
    settings = [*own_file(reviews), "--batch-size", "4", "--epochs", "3", "--max-steps-per-epoch", "14",
                "--save-every", "3", "--method", "all", "--device", "cpu", "--no-progress"]
    command = [sys.executable, "-m", "helpers.finetune", *settings, "--output"]
    assert run_bounded([*command, str(tmp_path / "whole")], process_env(), "a whole run").returncode == 0
    proc = subprocess.Popen([*command, str(tmp_path / "cut")], env=process_env(), cwd=TESTS.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (tmp_path / "cut" / "resume.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    assert {p.name for p in (tmp_path / "cut").iterdir()} == {"resume.pt"}
    resumed = run_bounded([*command, str(tmp_path / "cut"), "--resume"], process_env(), "the resumed run")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-2000:]
    a, b = (torch.load(tmp_path / run / "classifier.pt", weights_only=True)["state_dict"] for run in ("whole", "cut"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_lora_writes_adapters_and_the_head(tmp_path, reviews):
    out = tmp_path / "lora"
    metrics = finetune_ok(*own_file(reviews), "--batch-size", "4", "--method", "lora", "--lora-rank", "2",
                          "--output", str(out), "--device", "cpu", *FEW_STEPS)
    assert {p.name for p in out.iterdir()} == RESULTS - {"classifier.pt"} | {"adapters.safetensors"}
    model = checkpoints.load_adapters(load_model(device="cpu"), out / "adapters.safetensors")
    assert metrics["trainable_params"] < metrics["params"] / 10
    df, _ = own_data.load_labelled(reviews, "review", "kind")
    test = data.tokenize_splits(own_data.stratified_split(df), model.tokenizer)["test"]
    assert metrics["accuracy"]["test"] == pytest.approx(
        train.calc_accuracy(model, fastpath.make_batches(model, test, progress=False)), abs=1e-9)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in finetune.build_parser()._actions:
        for option in action.option_strings:
            assert option in text
            assert action.help, f"{option} has no help text"
    for word in ("torchrun", "resume.pt", "adapters.safetensors", "global batch"):
        assert word in text


def test_readme_documents_every_option():
    readme = (TESTS.parent / "README.md").read_text()
    section = readme[readme.index("## Take it home"):readme.index("## Beyond one machine")]
    options = [o for action in finetune.build_parser()._actions for o in action.option_strings if o != "-h"]
    assert [o for o in options if f"`{o}`" not in section and o != "--help"] == []


@pytest.mark.parametrize("argv, message", [
    (["--data", "no_such_file.csv"], "no such file"),
    (["--resume"], "nothing to resume"),
    (["--method", "last-k", "--k", "99"], "--k 99: this model has 2 blocks"),
])
def test_bad_options_stop_with_a_message(tmp_path, capsys, argv, message):
    assert finetune.main([*argv, "--output", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_a_batch_larger_than_the_data_stops_with_a_message(tmp_path, capsys, reviews):
    argv = [*own_file(reviews), "--batch-size", "500", "--output", str(tmp_path / "out"), "--device", "cpu"]
    assert finetune.main(argv) == 2
    assert "do not fill one global batch of 500" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


@pytest.mark.parametrize("argv", [["--lr", "0"], ["--epochs", "-1"], ["--method", "everything"],
                                  ["--task", "translate"], ["--batch-size", "two"]])
def test_malformed_options_are_refused_by_the_parser(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_a_finished_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "classifier.pt").write_bytes(b"the user's result")
    assert finetune.main(["--output", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "classifier.pt").read_bytes() == b"the user's result"


def test_a_bad_data_file_stops_with_a_message(tmp_path, capsys):
    bad = tmp_path / "labels.csv"
    bad.write_text("text,label\n" + "".join(f"message {i},ham\n" for i in range(20)))
    assert finetune.main(["--data", str(bad), "--output", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "only one label" in capsys.readouterr().err


def test_own_labelled_file(tmp_path, reviews):
    metrics = finetune_ok(*own_file(reviews), "--batch-size", "4", "--output", str(tmp_path / "out"), "--device",
                          "cpu", *FEW_STEPS)
    assert metrics["labels"] == {"complaint": 0, "praise": 1}
    assert checkpoints.load_classifier(tmp_path / "out" / "classifier.pt", device="cpu").labels == metrics["labels"]


# --- 2 gloo processes under torchrun --------------------------------------------------------------------------

DDP_STEPS = ["--epochs", "2", "--max-steps-per-epoch", "2", "--eval-freq", "2", "--eval-iter", "1",
             "--method", "last-block", "--device", "cpu", "--no-progress"]


def launch(tmp: Path, task: list[str], name: str, processes: int, batch_size: int) -> tuple[Path, list[dict], str]:
    """``finetune_worker.py`` on ``processes`` gloo processes (torchrun) or as one plain process."""
    out, states = tmp / name, tmp / f"{name}-states"
    states.mkdir()
    worker = [str(TESTS / "finetune_worker.py"), str(states), "--output", str(out), "--batch-size", str(batch_size),
              *task, *DDP_STEPS]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={processes}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max_restarts=0"]
    cmd = [*torchrun, *worker] if processes > 1 else [sys.executable, *worker]
    result = run_bounded(cmd, process_env(), f"helpers.finetune on {processes} process(es)")
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-3000:]}"
    return out, [torch.load(states / f"rank{r}.pt", weights_only=True) for r in range(processes)], result.stdout


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, reviews):
    tmp = tmp_path_factory.mktemp("finetune-ddp")
    return launch(tmp, own_file(reviews), "two", 2, 4), launch(tmp, own_file(reviews), "one", 1, 8)


def test_two_processes_equal_one_process_with_the_global_batch(ddp_runs):
    (out, ranks, stdout), (_, (single,), _) = ddp_runs
    assert [(r["rank"], r["world_size"], r["backend"], r["threads"], r["steps"]) for r in ranks] == [
        (0, 2, "gloo", 1, 4), (1, 2, "gloo", 1, 4)]
    assert (single["world_size"], single["threads"], single["steps"]) == (1, 1, 4)
    initial = add_classifier_head(load_model(device="cpu"), num_classes=2, trainable_blocks=1, seed=123).state_dict()
    assert set(initial) == set(single["state"])
    trainable = set(ranks[0]["trainable"])
    assert trainable and not any(n.endswith(".attn.W_key.bias") for n in trainable)
    for name, expected in single["state"].items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"{name} differs between ranks"
        if name in trainable:
            assert not torch.equal(expected, initial[name]), f"{name} did not train"
            assert_relative_close(ranks[0]["state"][name], expected, name)
        else:
            assert torch.equal(ranks[0]["state"][name], initial[name]), f"frozen {name} changed"
    assert stdout.count("training examples") == 1, "only rank 0 prints"


def test_two_processes_write_one_checkpoint_without_module_prefix(ddp_runs):
    (out, ranks, _), _ = ddp_runs
    assert {p.name for p in out.iterdir()} == RESULTS
    saved = torch.load(out / "classifier.pt", weights_only=True)["state_dict"]
    assert not any(name.startswith(("module.", "model.")) for name in saved)
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(saved[name], tensor)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["backend"], metrics["history"]["examples_seen"]) == (2, "gloo", 32)


# --- Instruction tuning (--task instruct) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    """A small instruction file (JSONL) with answers of different lengths: the ranks score different counts."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rows = [{"instruction": f"Repeat the word {w} {i % 4 + 1} times.", "input": "" if i % 3 else f"case {i}",
             "output": " ".join([w] * (i % 4 + 1))} for i, w in enumerate(words * 6)]
    path = tmp_path_factory.mktemp("own") / "instructions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def instruct_settings(path: Path) -> list[str]:
    return ["--task", "instruct", "--data", str(path), "--model", os.environ["COURSE_MODEL"], "--device", "cpu"]


class CommandOrder(instruct.InstructBatches):
    """The notebook's batches in the command's order (a ``DistributedSampler``'s, seed 123, epoch 0)."""

    def index_batches(self) -> list[list[int]]:
        order = list(DistributedSampler(range(len(self.targets)), num_replicas=1, rank=0, seed=123, drop_last=True))
        return [order[i:i + self.batch_size] for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]


def test_instruct_equals_the_notebook_helpers(tmp_path, instructions):
    out = tmp_path / "run"
    metrics = finetune_ok(*instruct_settings(instructions), "--method", "last-block", "--batch-size", "4",
                          "--lr", "1e-3", "--output", str(out), *FEW_STEPS)
    assert {p.name for p in out.iterdir()} == {"trained.pt", "metrics.json", "finetune-loss.png"}
    model = load_model(os.environ["COURSE_MODEL"], device="cpu")
    fmt = instruct.prompt_format(model)
    splits = random_split_examples(own_data.load_instructions(instructions), seed=123)
    instruct.train_top_blocks(model, 1)
    initial = train.trainable_state(model)
    batches = {name: instruct.make_instruct_batches(model, fmt.encode_all(examples), batch_size=4, progress=False)
               for name, examples in splits.items()}
    ordered = CommandOrder(**{f.name: getattr(batches["train"], f.name) for f in fields(batches["train"]) if f.init})
    cfg = train.TrainConfig(epochs=1, lr=1e-3, max_steps_per_epoch=4, eval_freq=2, eval_iter=2)
    instruct.train_instruct(model, ordered, batches["validation"], cfg, keep_best=False, progress=False)
    saved = torch.load(out / "trained.pt", weights_only=True)
    assert (saved["base_model"], saved["method"]) == (os.environ["COURSE_MODEL"], "last-block")
    expected = train.trainable_state(model)
    assert set(saved["trainable"]) == set(expected) and len(expected) >= 10
    for name, value in expected.items():
        assert not torch.equal(value, initial[name]), f"{name} did not train"
        assert_relative_close(saved["trainable"][name], value, name)
    assert len(metrics["history"]["val_losses"]) == 2  # after steps 2 and 4; the last with the final weights:
    final_val_loss = instruct.response_loss(model, batches["validation"], 2)
    assert metrics["history"]["val_losses"][-1] == pytest.approx(final_val_loss, rel=1e-5)
    assert metrics["prompt_format"] == "alpaca" and metrics["response_loss"]["test"] > 0


def test_instruct_qlora_is_refused_with_a_message(tmp_path, instructions, capsys):
    assert finetune.main([*instruct_settings(instructions), "--method", "qlora", "--output", str(tmp_path)]) == 2
    assert "use --method lora" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ddp_instruct_runs(tmp_path_factory, instructions):
    tmp = tmp_path_factory.mktemp("finetune-ddp-instruct")
    task = [*instruct_settings(instructions), "--lr", "1e-3"]
    return launch(tmp, task, "two", 2, 2), launch(tmp, task, "one", 1, 4)


def test_two_processes_instruct_equal_one_process(ddp_instruct_runs):
    """The masked loss is divided by the response tokens of the GLOBAL batch (the ranks hold different counts)."""
    (out, ranks, _), (_, (single,), _) = ddp_instruct_runs
    assert [(r["world_size"], r["steps"]) for r in ranks] == [(2, 4), (2, 4)] and single["steps"] == 4
    trainable = set(ranks[0]["trainable"])
    assert len(trainable) >= 10
    for name, expected in single["state"].items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"{name} differs between ranks"
        if name in trainable:
            assert_relative_close(ranks[0]["state"][name], expected, name)
    assert {p.name for p in out.iterdir()} == {"trained.pt", "metrics.json", "finetune-loss.png"}
    saved = torch.load(out / "trained.pt", weights_only=True)["trainable"]
    assert set(saved) == trainable and all(torch.equal(saved[n], ranks[0]["state"][n]) for n in saved)
