"""scripts/experiments.py and the reading positions it uses (``helpers.fastpath.read_at``): every option is
documented, a tiny run writes a complete row, impossible combinations are refused, and reading at the first
token or at the last padded position equals the plain full forward pass."""
from __future__ import annotations

import csv
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import data, fastpath
from helpers.models.base import add_classifier_head, set_seed
from helpers.models.gpt2 import GPT2Config, GPT2Model, gpt2_tokenizer
from helpers.own_data import SUPPORT_CATEGORIES, SUPPORT_REQUESTS

pytestmark = pytest.mark.needs_tokenizer
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "experiments.py"
experiments = runpy.run_path(str(SCRIPT))  # the script's functions, without running main()


# --- Reading at the first token / at the last padded position ------------------------------------------------

@pytest.fixture(scope="module")
def model():
    set_seed(0)
    gpt2 = GPT2Model(GPT2Config(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=3))
    gpt2.tokenizer = gpt2_tokenizer()
    return add_classifier_head(gpt2, trainable_blocks=1).eval()


@pytest.fixture(scope="module")
def dataset(model):
    texts = ["Free entry to win cash now!!! txt WIN to 80082", "ok see you later", "Hi", "", "sorry, I'll call",
             "URGENT! Your mobile number has won a prize", "Lunch?", "Café? naïve 😀"]
    return data.SpamDataset(pd.DataFrame({"Label": [1, 0, 0, 0, 0, 1, 0, 0], "Text": texts}), model.tokenizer)


def logits_of(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([batches.forward(model, ids, lengths) for ids, lengths, _ in batches])


def full_forward(model, dataset, pad_to=None) -> torch.Tensor:
    """Every position of the padded batch through the whole model: [B, T, C]."""
    ids, _, _ = data.collate([dataset[i] for i in range(len(dataset))], dataset.pad_id, pad_to)
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("cache", [False, True])
def test_reading_the_first_token_equals_position_0_of_the_full_forward(model, dataset, cache):
    batches = fastpath.read_at(fastpath.make_batches(model, dataset, batch_size=8, cache=cache, pack=False, progress=False),
                               "first")
    assert batches.cached == cache
    torch.testing.assert_close(logits_of(model, batches), full_forward(model, dataset)[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache", [False, True])
def test_last_position_with_fixed_padding_reads_after_the_padding(model, dataset, cache):
    padded = data.pad_every_text(dataset, 20)
    assert {len(ids) for ids in padded.encoded} == {20} and padded.labels == dataset.labels
    assert dataset.encoded[2] == model.tokenizer.encode("Hi")  # the original is left as it was
    batches = fastpath.read_at(fastpath.make_batches(model, padded, batch_size=3, cache=cache, pack=False, progress=False),
                               "last-position")
    expected = full_forward(model, dataset, pad_to=20)[:, -1]
    torch.testing.assert_close(logits_of(model, batches), expected, atol=1e-5, rtol=0)
    last_real = logits_of(model, fastpath.make_batches(model, dataset, batch_size=3, pack=False, progress=False))
    assert not torch.allclose(logits_of(model, batches), last_real, atol=1e-3)  # the padding does change the answer


def test_last_position_after_batch_max_padding_and_its_limits(model, dataset):
    tokens = fastpath.read_at(fastpath.make_batches(model, dataset, batch_size=8, cache=False, pack=False, progress=False),
                              "last-position")
    torch.testing.assert_close(logits_of(model, tokens), full_forward(model, dataset)[:, -1], atol=1e-5, rtol=0)
    cached = fastpath.read_at(fastpath.make_batches(model, dataset, batch_size=8, pack=False, progress=False), "last-position")
    with pytest.raises(ValueError, match="needs every text padded to one length"):
        logits_of(model, cached)  # the cache pads with zeros, which are not pad tokens
    with pytest.raises(ValueError, match="position must be one of"):
        fastpath.read_at(tokens, "middle")


def test_last_real_token_is_unchanged(model, dataset):
    batches = fastpath.make_batches(model, dataset, batch_size=8, pack=False, progress=False)
    torch.testing.assert_close(logits_of(model, fastpath.read_at(batches, "last-real-token")),
                               logits_of(model, batches), atol=0, rtol=0)


# --- The script --------------------------------------------------------------------------------------------------

def test_help_documents_every_option():
    parser = experiments["build_parser"]()
    text = parser.format_help()
    options = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert {a.dest for a in options} >= {"model", "weights", "trainable", "k", "rank", "alpha", "position", "padding",
                                         "pad_to", "epochs", "lr", "batch_size", "seed", "max_steps", "data",
                                         "text_column", "label_column", "threads", "out", "run_list"}
    for action in options:
        assert action.help and len(action.help) > 20, f"{action.option_strings} has no real help"
        assert action.option_strings[0] in text
        for choice in action.choices or []:
            assert choice in text


@pytest.mark.parametrize("argv, message", [
    (["--padding", "fixed"], "only matters with --position last-position"),
    (["--pad-to", "50"], "--pad-to needs --padding fixed"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--trainable", "everything"], "invalid choice"),
])
def test_meaningless_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiments["main"](argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_tiny_run_appends_a_complete_row(tmp_path):
    """End to end in a fresh process, as a learner runs it (COURSE_MODEL is a tiny random GPT-2 in the tests)."""
    out = tmp_path / "rows.csv"
    argv = ["--model", os.environ["COURSE_MODEL"], "--trainable", "last-k", "--k", "2", "--epochs", "1",
            "--max-steps", "2", "--out", str(out)]
    for _ in range(2):
        done = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=tmp_path, capture_output=True, text=True,
                              timeout=900)  # generous: the machine may be shared
        assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 2 and list(rows[0]) == list(experiments["COLUMNS"])
    row = rows[0]
    empty = [column for column, value in row.items() if value == "" and column != "peak_gpu_mb"]
    assert not empty, f"empty columns {empty}"
    assert row["status"] == "quick check (--max-steps 2)" and row["trainable"] == "last-2-blocks"
    assert row["name"] == f"last 2 blocks, model {os.environ['COURSE_MODEL']}, lr 5e-05, 1 epochs"
    assert int(row["steps"]) == 2 and int(row["classes"]) == 2
    assert 0 < int(row["trainable_params"]) < int(row["total_params"])
    assert all(0 <= float(row[k]) <= 1 for k in ("train_acc", "val_acc", "test_acc"))
    assert float(row["peak_rss_mb"]) >= float(row["rss_after_load_mb"]) > 0
    assert shlex.split(row["command"])[2:] == argv  # the exact command: replaying it reproduces the row
    assert len(row["commit"].split("+")[0]) == 40 and row["torch"] == torch.__version__
    assert rows[1]["val_acc"] == row["val_acc"] and rows[1]["test_acc"] == row["test_acc"]  # seeded: same result


def test_own_labelled_file_with_four_classes(tmp_path):
    out = tmp_path / "rows.csv"
    argv = ["--model", os.environ["COURSE_MODEL"], "--data", str(SUPPORT_REQUESTS), "--trainable", "head",
            "--position", "first", "--epochs", "1", "--max-steps", "1", "--out", str(out)]
    assert experiments["main"](argv) == 0
    row = next(csv.DictReader(out.open(encoding="utf-8")))
    assert int(row["classes"]) == len(SUPPORT_CATEGORIES) == 4 and row["position"] == "first"
    assert "head only, read at the first token" in row["name"] and "data support_requests.csv" in row["name"]
    assert int(row["trainable_params"]) == 4 * 32 + 4  # only the new Linear(32, 4): the tiny model is 32 wide


def test_fixed_padding_row_records_its_length(tmp_path):
    out = tmp_path / "rows.csv"
    argv = ["--model", os.environ["COURSE_MODEL"], "--position", "last-position", "--padding", "fixed",
            "--pad-to", "40", "--weights", "random", "--epochs", "1", "--max-steps", "1", "--out", str(out)]
    assert experiments["main"](argv) == 0
    row = next(csv.DictReader(out.open(encoding="utf-8")))
    assert row["padding"] == "fixed (40 tokens)" and row["weights"] == "random"
    assert row["name"].startswith("last block, read at the last position, every text padded to one length, "
                                  "random weights")


def test_append_refuses_a_csv_with_other_columns(tmp_path):
    out = tmp_path / "old.csv"
    out.write_text("name,accuracy\nx,0.5\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="has other columns"):
        experiments["append_row"](out, {"name": "y"})
    assert out.read_text(encoding="utf-8") == "name,accuracy\nx,0.5\n"


def test_run_list_runs_each_line_once_per_commit(tmp_path, monkeypatch):
    listing = tmp_path / "list.txt"
    listing.write_text("# a comment\n--trainable head\n\n--epochs 1\n", encoding="utf-8")
    out = tmp_path / "rows.csv"
    ran = []
    run_list = experiments["run_list"]
    monkeypatch.setitem(run_list.__globals__, "git_commit", lambda: "c" * 40)
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: ran.append(argv[2:]) or subprocess.CompletedProcess(argv, 0))
    first = ["--trainable", "head", "--threads", "1", "--out", str(out)]
    experiments["append_row"](out, {"name": "head only", "commit": "c" * 40,
                                    "command": experiments["command_line"](first)})
    assert run_list(listing, out, threads=1) == 0
    assert ran == [["--epochs", "1", "--threads", "1", "--out", str(out)]]  # the first row is there
    monkeypatch.setitem(run_list.__globals__, "git_commit", lambda: "d" * 40)  # another commit: run both again
    assert run_list(listing, out, threads=1) == 0 and len(ran) == 3


def names_of(argv: list[str]) -> str:
    return experiments["row_name"](experiments["build_parser"]().parse_args(argv))


def test_a_row_name_says_what_ran():
    """The name is built from the options, never typed, so a row cannot be called what it is not."""
    assert names_of(["--lr", "1e-4"]) == "last block, lr 0.0001, 5 epochs"
    assert names_of(["--trainable", "head"]).startswith("head only,")
    assert names_of(["--trainable", "last-k", "--k", "3"]).startswith("last 3 blocks,")
    assert names_of(["--trainable", "lora", "--rank", "8", "--alpha", "16"]).startswith("LoRA r8 alpha 16,")
    assert "random weights" in names_of(["--weights", "random"])
    assert "seed 7" in names_of(["--seed", "7"]) and "10 epochs" in names_of(["--epochs", "10"])
    assert names_of(["--trainable", "head"]) != names_of(["--trainable", "head", "--position", "first"])


def test_shipped_rows_are_named_after_their_commands():
    """results/experiments.csv and run_it_yourself.csv: each name is what its command would produce."""
    for table in ("experiments.csv", "run_it_yourself.csv"):
        path = ROOT / "results" / table
        if not path.exists():
            continue
        for row in csv.DictReader(path.open(encoding="utf-8")):
            argv = shlex.split(row["command"])[2:]
            assert row["name"] == names_of(argv), f"{table}: {row['name']!r} does not match {row['command']!r}"


def test_reading_elsewhere_refuses_packed_batches(model, dataset):
    packed = fastpath.make_batches(model, dataset, batch_size=8, cache=False, progress=False)  # packed by default
    assert fastpath.read_at(packed, "last-real-token").packed
    with pytest.raises(ValueError, match="pack=False"):
        fastpath.read_at(packed, "first")


def test_readme_experiments_table_is_written_from_the_shipped_csv():
    """README's table is `scripts/experiments_table.py`'s output for the CSV in the repo (rerun it after new rows)."""
    experiments_table = runpy.run_path(str(ROOT / "scripts" / "experiments_table.py"))
    start, end = experiments_table["START"], experiments_table["END"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = readme.split(start, 1)[1].split(end, 1)[0]
    assert shown == experiments_table["section"](ROOT / "results" / "experiments.csv", ROOT / "results" / "experiments.txt"), (
        "README's experiments table is out of date: run python scripts/experiments_table.py")
