"""Helpers for the course, one module per stage of the pipeline:

``download`` (verified, cached files) -> ``data`` (parse, balance, split, datasets)
-> ``model`` (GPT-2, SmolLM2, a classification head) -> ``train`` -> ``evaluate`` -> ``lora``.

The names below are imported lazily, so ``import helpers`` is instant and a notebook
that only handles data never loads PyTorch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "download_file": "download",
    "DownloadError": "download",
    "record_metrics": "config",
    "load_gpt2": "model",
    "load_model": "model",
    "classify": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")
