"""The notebooks' plumbing: profile-sized training configs and the tables notebook 07 reads back."""
from __future__ import annotations

import math

from helpers import plumbing
from helpers.train import TrainConfig


def test_sized_for_profile_keeps_the_recipe_in_full_and_shortens_it_in_smoke(monkeypatch):
    recipe = TrainConfig(lr=8e-4, epochs=5)
    monkeypatch.setenv("COURSE_PROFILE", "full")
    assert plumbing.sized_for_profile(recipe) is recipe
    monkeypatch.setenv("COURSE_PROFILE", "smoke")
    smoke = plumbing.sized_for_profile(recipe)
    assert (smoke.epochs, smoke.max_steps_per_epoch, smoke.eval_freq) == (1, 6, 2)
    assert smoke.lr == 8e-4 and smoke.weight_decay == recipe.weight_decay  # the same recipe, fewer steps
    assert recipe.epochs == 5  # the original is not changed


def test_peaks_table_in_gib_relative_to_lora():
    table = plumbing.peaks_table({"lora": 2 * 2**30, "qlora": 3 * 2**29})
    assert table.loc["lora", "training peak RSS (GiB)"] == 2.0
    assert table.loc["qlora", "training peak RSS (GiB)"] == 1.5
    assert table.loc["qlora", "vs LoRA"] == 0.75
    unmeasured = plumbing.peaks_table({"lora": None, "qlora": None})  # macOS, Windows
    assert math.isnan(unmeasured.loc["qlora", "vs LoRA"])


def _metrics(classifier_model: str | None) -> dict:
    classifier = {"trainable_params": 7_090_946, "accuracy": {"train": 0.97, "validation": 0.97, "test": 0.95},
                  "train_seconds": 90.0}
    if classifier_model:
        classifier["model"] = classifier_model
    lora = {"model": "gpt2", "trainable_params": 2_655_746, "epochs": 5, "train_seconds": 300.0,
            "accuracy": {"train": 1.0, "validation": 0.96, "test": 0.97}, "weight_bytes": 339_738_624,
            "adapter_file_bytes": 10_600_000, "train_peak_rss_bytes": 2**31}
    return {"classifier": classifier, "lora": lora, "qlora": {"model": "gpt2", "epochs": 1},  # qlora: no accuracy
            "data": {"rows": 5574}}


def test_methods_table_rows_and_the_last_block_row_of_the_same_model():
    table = plumbing.methods_table(_metrics("gpt2"), "gpt2", fp32_weight_bytes=339_738_624,
                                   whole_model_bytes=500_000_000)
    assert list(table.index) == ["last block + head (05)", "LoRA"]  # QLoRA recorded no accuracy yet: no row
    last_block, lora = table.loc["last block + head (05)"], table.loc["LoRA"]
    assert last_block["block weights (MB)"] == lora["block weights (MB)"] == 339.738624  # the same fp32 weights
    assert last_block["saved file (MB)"] == 500.0 and lora["saved file (MB)"] == 10.6
    assert lora["training peak RSS (GiB)"] == 2.0 and math.isnan(last_block["training peak RSS (GiB)"])
    assert table["trainable params"].tolist() == [7_090_946, 2_655_746]
    assert lora["test acc"] == 0.97


def test_methods_table_does_not_lend_sizes_to_another_model():
    table = plumbing.methods_table(_metrics("smollm2-135m"), "gpt2", 339_738_624, 500_000_000)
    assert table.loc["last block + head (05)", "model"] == "smollm2-135m"
    assert math.isnan(table.loc["last block + head (05)", "block weights (MB)"])
    unrecorded = plumbing.methods_table(_metrics(None), "gpt2", 339_738_624, 500_000_000)
    assert unrecorded.loc["last block + head (05)", "model"] == "(not recorded)"
    assert unrecorded.loc["last block + head (05)", "saved file (MB)"] == 500.0  # assumed to be this run's model
