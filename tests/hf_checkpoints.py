"""Test utilities: random GPT-2 checkpoints written by Hugging Face transformers (the reference implementation).

``make_gpt2_checkpoint(folder)`` writes a tiny model (vocab 50257, so the real tokenizer works; context 1024);
``make_gpt2_124m_checkpoint(folder)`` writes one with the exact shapes of the 124M GPT-2.
Both are randomly initialised under a seed, so they are reproducible and need no download.
"""
from __future__ import annotations

from pathlib import Path

import torch

GPT2_124M = {"n_embd": 768, "n_layer": 12, "n_head": 12}


def make_hf_gpt2(n_embd: int = 32, n_layer: int = 2, n_head: int = 2, seed: int = 0):
    """A random ``transformers.GPT2LMHeadModel`` (eval mode) with GPT-2's vocabulary and context."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=1024, vocab_size=50257)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def make_gpt2_checkpoint(folder: str | Path, n_embd: int = 32, n_layer: int = 2, n_head: int = 2, seed: int = 0) -> Path:
    """Write a random GPT-2 checkpoint (config.json + model.safetensors) into ``folder``; return the folder."""
    folder = Path(folder)
    make_hf_gpt2(n_embd, n_layer, n_head, seed).save_pretrained(folder)
    return folder


def make_gpt2_124m_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """A random checkpoint with the shapes of the 124M GPT-2 (about 500 MB on disk)."""
    return make_gpt2_checkpoint(folder, seed=seed, **GPT2_124M)
