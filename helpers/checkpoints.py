"""Saving and loading what the course trains: whole classifiers (notebooks 05-06) and LoRA adapters (notebook 07).

Every file is written atomically (``helpers.config.atomic_path``: a unique temporary file, renamed over the
target when complete), so an interrupted save or two saves at once never leave half a file. Every load checks
the file completely — format, names, shapes, sizes, finite values — *before* it builds or changes a model,
and every problem is one ``CheckpointError`` (``helpers.models.base``) whose message says what to do.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from helpers.config import atomic_path
from helpers.data import LABELS
from helpers.lora import apply_lora, apply_qlora, lora_layers, lora_shapes
from helpers.models import build_model
from helpers.models.base import (
    CheckpointError, add_classifier_head, check_finite, check_shapes, parameter_shapes, pick_device,
)

CLASSIFIER_FORMAT = "course-classifier-v2"
CLASSIFIER_KEYS = {"architecture": str, "config": dict, "labels": dict, "num_classes": int, "max_length": int,
                   "state_dict": dict}
ADAPTER_FORMAT = "course-lora-v1"
ADAPTER_KEYS = ("rank", "alpha", "targets", "quantization", "num_classes", "base_model", "emb_dim", "n_layers")


# ----------------------------------------------------------------------------- whole classifiers
def save_classifier(model: nn.Module, path: str | os.PathLike, *, max_length: int | None = None,
                    labels: dict[str, int] | None = None) -> Path:
    """Save weights + architecture + config + label map + ``max_length`` (tensors and plain values only).

    ``labels``: name -> class id for every class of the head (default: what ``load_classifier`` attached,
    else ham/spam); ``classify`` answers with these names.

    ``max_length``: the token length the classifier was trained with (``datasets["train"].max_length``);
    ``classify`` reads that many tokens by default. Both default to what ``load_classifier`` attached.
    """
    max_length = max_length or getattr(model, "max_length", None)
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError("save_classifier needs max_length=<the length of the training texts in tokens>, "
                         "e.g. max_length=datasets['train'].max_length")
    labels = dict(labels or getattr(model, "labels", None) or LABELS)
    num_classes = model.out_head.out_features
    if sorted(labels.values()) != list(range(num_classes)):
        raise ValueError(f"labels {labels} do not name the {num_classes} classes 0..{num_classes - 1} of the "
                         "classifier's head; pass labels=<the label map of its data> (e.g. from "
                         "helpers.own_data.load_labelled).")
    checkpoint = {
        "format": CLASSIFIER_FORMAT,
        "architecture": type(model).__name__,
        "config": asdict(model.cfg),
        "labels": labels,
        "num_classes": num_classes,
        "max_length": max_length,
        "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def _read_classifier(path: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint dict, with every key present and of the right type."""
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}. Train and save one first (notebook 05), or fix the path.")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)  # weights_only: no code runs
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint ({type(exc).__name__}); "
                              "it is damaged or not a checkpoint: save it again.") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CLASSIFIER_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a course classifier checkpoint (format {found!r}, expected "
                              f"{CLASSIFIER_FORMAT!r}): train and save it again with notebook 05.")
    missing = [key for key in CLASSIFIER_KEYS if key not in checkpoint]
    wrong = [key for key, kind in CLASSIFIER_KEYS.items() if key in checkpoint and not isinstance(checkpoint[key], kind)]
    if missing or wrong:
        raise CheckpointError(f"{path} is incomplete (missing {missing}, wrong type {wrong}): it was not written "
                              "by save_classifier, or was edited. Save it again.")
    labels, n = checkpoint["labels"], checkpoint["num_classes"]
    if sorted(labels.values()) != list(range(n)) or not all(isinstance(k, str) for k in labels):
        raise CheckpointError(f"{path}: labels {labels} do not name the {n} classes 0..{n - 1}. Save it again.")
    return checkpoint


def load_classifier(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """A saved classifier in eval mode on ``device`` (default: ``pick_device()``, i.e. COURSE_DEVICE or the best
    available), with ``model.labels`` and ``model.max_length`` from the checkpoint.

    The file is checked before a model is built: the config must describe a course model of reasonable size,
    and the tensors must have exactly its names and shapes, with finite values.
    """
    path, device = Path(path), pick_device(device)
    checkpoint = _read_classifier(path, device)
    architecture, cfg, state = checkpoint["architecture"], checkpoint["config"], checkpoint["state_dict"]
    with torch.device("meta"):  # shapes only: nothing allocated until the file is known to fit
        skeleton = add_classifier_head(build_model(architecture, cfg, tokenizer=False),
                                       num_classes=checkpoint["num_classes"], trainable_blocks=0)
    check_shapes(parameter_shapes(skeleton), state, path.name, "Save the classifier again (notebook 05).")
    check_finite(state, path.name)
    with torch.device(device):
        model = add_classifier_head(build_model(architecture, cfg), num_classes=checkpoint["num_classes"],
                                    trainable_blocks=0)
    model.load_state_dict(state, strict=True)
    model.labels, model.max_length = dict(checkpoint["labels"]), checkpoint["max_length"]
    return model.eval()


# ----------------------------------------------------------------------------- LoRA adapters
def _base_model_name(model: nn.Module) -> str:
    for value in (getattr(model, "name", None), getattr(model.cfg, "name", None),
                  getattr(getattr(model, "tokenizer", None), "name", None)):
        if isinstance(value, str) and value:
            return value
    return "unknown"


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of a LoRA model: every ``A`` and ``B``, and the classification head."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.A"], tensors[f"{name}.B"] = layer.A, layer.B
    tensors["out_head.weight"] = model.out_head.weight
    if model.out_head.bias is not None:
        tensors["out_head.bias"] = model.out_head.bias
    return tensors


def save_adapters(model: nn.Module, path: str | os.PathLike, base_model: str | None = None) -> int:
    """Save only the LoRA A/B tensors and the classification head (+ metadata: rank, alpha, targets,
    quantization, num_classes, ``base_model`` name, sizes) as safetensors, atomically. Returns the file size."""
    lora_config = getattr(model, "lora_config", None)
    if lora_config is None or not lora_layers(model):
        raise ValueError("model has no LoRA layers; call apply_lora or apply_qlora first")
    tensors = {k: v.detach().cpu().contiguous() for k, v in _adapter_tensors(model).items()}
    metadata = {"format": ADAPTER_FORMAT, "rank": str(lora_config["rank"]), "alpha": str(lora_config["alpha"]),
                "targets": json.dumps(lora_config["targets"]), "quantization": lora_config["quantization"],
                "num_classes": str(model.out_head.out_features), "base_model": base_model or _base_model_name(model),
                "emb_dim": str(model.cfg.emb_dim), "n_layers": str(model.cfg.n_layers)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path).stat().st_size


def _read_adapters(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The parsed metadata and the tensors of an adapter file, or ``CheckpointError``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"No adapter file at {path}: save one with save_adapters (notebook 07).") from None
    except Exception as exc:  # safetensors raises its own error types for garbage files
        raise CheckpointError(f"{path} is not a safetensors file ({exc}); pass a file written by "
                              "save_adapters") from exc
    if metadata.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path} is not a LoRA adapter file from save_adapters "
                              f"(metadata format={metadata.get('format')!r}, expected {ADAPTER_FORMAT!r})")
    missing = [k for k in ADAPTER_KEYS if k not in metadata]
    if missing:
        raise CheckpointError(f"{path}: adapter metadata lacks {missing}; re-save it with save_adapters")
    try:
        meta = {"rank": int(metadata["rank"]), "alpha": float(metadata["alpha"]),
                "targets": json.loads(metadata["targets"]), "quantization": metadata["quantization"],
                "num_classes": int(metadata["num_classes"]), "base_model": metadata["base_model"],
                "emb_dim": int(metadata["emb_dim"]), "n_layers": int(metadata["n_layers"])}
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable adapter metadata ({exc}); re-save it with save_adapters") from exc
    if meta["rank"] < 1 or meta["num_classes"] < 1 or meta["quantization"] not in ("none", "nf4"):
        raise CheckpointError(f"{path}: impossible adapter metadata {meta}; re-save it with save_adapters")
    return meta, tensors


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Turn a freshly loaded pretrained ``model`` into the saved fine-tuned one, in place: replace the LM head
    with the saved classification head, apply LoRA/QLoRA with the saved config, load A/B and the head.

    Every name, shape and value is checked first; on any mismatch ``CheckpointError`` is raised and ``model``
    is left exactly as it was (so a retry with the right file works).
    """
    path = Path(path)
    meta, tensors = _read_adapters(path)
    for key in ("emb_dim", "n_layers"):
        if meta[key] != getattr(model.cfg, key):
            raise CheckpointError(
                f"{path} was saved for base model {meta['base_model']!r} with {key}={meta[key]}, but this "
                f"model has {key}={getattr(model.cfg, key)} ({_base_model_name(model)!r}); load the base "
                "model the adapters were trained on")
    if lora_layers(model):
        raise CheckpointError("model already has LoRA layers; pass a freshly loaded model (load_model())")
    try:
        expected = lora_shapes(model, meta["rank"], meta["targets"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    expected["out_head.weight"] = (meta["num_classes"], model.cfg.emb_dim)
    if "out_head.bias" in tensors:
        expected["out_head.bias"] = (meta["num_classes"],)
    check_shapes(expected, tensors, str(path), "Was it saved for another base model? Load that model first.")
    check_finite(tensors, str(path))

    # Everything fits: now change the model.
    device, dtype = model.tok_emb.weight.device, model.tok_emb.weight.dtype
    model.out_head = nn.Linear(model.cfg.emb_dim, meta["num_classes"], bias="out_head.bias" in tensors,
                               device=device, dtype=dtype)
    apply = apply_qlora if meta["quantization"] == "nf4" else apply_lora
    apply(model, rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"])
    with torch.no_grad():
        for name, param in _adapter_tensors(model).items():
            param.copy_(tensors[name])
    return model
