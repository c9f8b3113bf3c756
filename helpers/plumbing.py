"""Notebook plumbing kept out of the learner's way: profile-sized training runs and tables read back from
``outputs/metrics.json`` (notebook 07).

    cfg = sized_for_profile(TrainConfig(lr=8e-4, epochs=5))   # unchanged in the full profile, a few steps in smoke
    methods_table(config.read_metrics(), ...)                   # notebook 05's last block vs LoRA vs QLoRA
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import pandas as pd

from helpers import config

Cfg = TypeVar("Cfg")

#: What the smoke profile (the tests) trains: one epoch of a few steps, evaluated every 2 steps on 2 batches.
SMOKE_TRAINING = {"epochs": 1, "max_steps_per_epoch": 6, "eval_freq": 2, "eval_iter": 2}
#: The rows of ``methods_table``: key in metrics.json -> label.
METHODS = {"classifier": "last block + head (05)", "lora": "LoRA", "qlora": "QLoRA"}


def sized_for_profile(cfg: Cfg) -> Cfg:
    """A training config (``helpers.train.TrainConfig``) as given in the full profile; in the smoke profile
    the same recipe for a few steps only (``SMOKE_TRAINING``), so the tests run the notebook in seconds."""
    return dataclasses.replace(cfg, **SMOKE_TRAINING) if config.is_smoke() else cfg


def _mb(n_bytes: float | None) -> float:
    return math.nan if n_bytes is None else n_bytes / 1e6


def _gib(n_bytes: float | None) -> float:
    return math.nan if n_bytes is None else n_bytes / 2**30


def peaks_table(peaks: dict[str, int | None]) -> pd.DataFrame:
    """Training peak RSS per method (``helpers.memory.training_peaks``) in GiB, and each one relative to LoRA's."""
    table = pd.DataFrame({"training peak RSS (GiB)": {method: _gib(b) for method, b in peaks.items()}})
    lora_peak = table["training peak RSS (GiB)"].get("lora", math.nan)
    table["vs LoRA"] = table["training peak RSS (GiB)"] / lora_peak
    return table.round(3)


def methods_table(metrics: dict[str, Any], model_name: str, fp32_weight_bytes: int,
                  whole_model_bytes: int) -> pd.DataFrame:
    """One row per method recorded in ``metrics``: notebook 05's last-block fine-tuning, LoRA, QLoRA.

    Notebook 05 keeps the same frozen fp32 weights as LoRA and saves the whole model, so when it ran the same
    model (or did not record which), its weight memory and file size are ``fp32_weight_bytes`` and
    ``whole_model_bytes``.
    Anything a notebook did not record is NaN.
    """
    rows = {}
    for key, label in METHODS.items():
        m = metrics.get(key)
        if not m or "accuracy" not in m:
            continue
        same_model_05 = key == "classifier" and m.get("model", model_name) == model_name  # unrecorded: this run's
        rows[label] = {
            "model": m.get("model", "(not recorded)"),
            "trainable params": m.get("trainable_params"),
            "block weights (MB)": _mb(fp32_weight_bytes if same_model_05 else m.get("weight_bytes")),
            "saved file (MB)": _mb(whole_model_bytes if same_model_05 else m.get("adapter_file_bytes")),
            "epochs": m.get("epochs"),
            "train time (s)": m.get("train_seconds"),
            "training peak RSS (GiB)": _gib(m.get("train_peak_rss_bytes")),
            **{f"{split} acc": m["accuracy"].get(split) for split in ("train", "validation", "test")},
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    return table.astype({"trainable params": "Int64"}) if "trainable params" in table else table
