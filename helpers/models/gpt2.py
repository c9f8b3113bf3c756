"""GPT-2 written out in plain PyTorch, its pretrained weights, and its tokenizer (notebook 04).

GPT-2 is a stack of identical pre-LayerNorm transformer blocks:

    ids -> token embedding + position embedding -> block x n_layers -> final LayerNorm -> out_head -> logits
    block(x) = x + attn(norm1(x));  then  x + mlp(norm2(x))

``load_gpt2`` downloads the official weights (safetensors, verified) or reads a checkpoint folder,
maps every Hugging Face tensor onto this model and checks names, shapes and values on the way.
``gpt2_tokenizer`` is tiktoken's GPT-2 BPE (notebook 03 uses it first).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn

from helpers import config
from helpers.download import download_file
from helpers.models.base import (
    CausalLM, CheckpointError, KVCache, Mask, attend, check_context, check_finite, check_text, default_positions,
    select_last, visible_from_last,
)

DEFAULT_BASE_URL = "https://huggingface.co/openai-community"
CHECKPOINT_FILES = ("config.json", "model.safetensors")


# ----------------------------------------------------------------------------- tokenizer (notebook 03)
@dataclass(frozen=True)
class GPT2Tokenizer:
    """tiktoken's GPT-2 BPE behind the course's small tokenizer interface."""

    encoding: tiktoken.Encoding
    name: str = "gpt2"

    @property
    def pad_id(self) -> int:
        """``<|endoftext|>`` (50256) doubles as the padding token."""
        return self.encoding.eot_token

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in user text stay plain text.

        Text with a lone surrogate (not a character) raises a clear ``ValueError``.
        """
        check_text(text, self.name)
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))


def gpt2_tokenizer() -> GPT2Tokenizer:
    """GPT-2's tokenizer (tiktoken downloads its two files once, or reads TIKTOKEN_CACHE_DIR)."""
    return GPT2Tokenizer(tiktoken.get_encoding("gpt2"))


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """Sizes of a GPT-2 model (the defaults are GPT-2's vocabulary and context)."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int
    n_heads: int
    n_layers: int
    drop_rate: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim={self.emb_dim} must be divisible by n_heads={self.n_heads}")


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(emb_dim=768, n_heads=12, n_layers=12),  # 124M
    "gpt2-medium": GPT2Config(emb_dim=1024, n_heads=16, n_layers=24),  # 355M
    "gpt2-large": GPT2Config(emb_dim=1280, n_heads=20, n_layers=36),  # 774M
    "gpt2-xl": GPT2Config(emb_dim=1600, n_heads=25, n_layers=48),  # 1558M
}

# SHA-256 of the official files (Hugging Face LFS object ids). Presets without an entry are
# checked structurally only: every tensor must have the expected name, shape and dtype.
WEIGHT_SHA256: dict[str, str] = {
    "gpt2": "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",  # 548,105,171 bytes
}


# ----------------------------------------------------------------------------- the model
class MultiHeadAttention(nn.Module):
    """Causal self-attention: separate query/key/value projections, one output projection."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, d // cfg.n_heads, cfg.drop_rate
        self.W_query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(d, d)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, heads, T, head_dim]."""
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        """[B, heads, T, head_dim] -> [B, T, D]."""
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: Mask = None, cache: KVCache | None = None) -> torch.Tensor:
        """x [R, T, D] -> [R, T, D]; causal, or what ``attn_mask`` allows (``helpers.models.base.attend``)."""
        q, k, v = self._heads(self.W_query(x)), self._heads(self.W_key(x)), self._heads(self.W_value(x))
        if cache is not None:  # generation: the keys and values of earlier positions come from the cache
            k, v = cache.extend(k, v)
        out = attend(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        return self.out_proj(self._merge(out))

    def forward_last(self, x: torch.Tensor, index: torch.Tensor, attn_mask: Mask = None) -> torch.Tensor:
        """Attention output [B, D] at one position per text only (``select_last``); keys/values from all of ``x``."""
        q = self._heads(self.W_query(select_last(x, index, attn_mask)))  # [B, heads, 1, hd] or [1, heads, B, hd]
        k, v = self._heads(self.W_key(x)), self._heads(self.W_value(x))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible_from_last(index, x.shape[1], attn_mask),
                                             dropout_p=p)
        return self.out_proj(self._merge(out)).reshape(len(index), -1)


class FeedForward(nn.Module):
    """The MLP: expand 4x, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(norm1(x))`` then ``x + ff(norm2(x))``."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.attn = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, attn_mask: Mask = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x [R, T, D] -> [R, T, D] (``positions`` are not needed here: GPT-2 adds them in ``embed``)."""
        x = x + self.drop(self.attn(self.norm1(x), attn_mask, cache))
        return x + self.drop(self.ff(self.norm2(x)))

    def forward_last(self, x: torch.Tensor, index: torch.Tensor, positions: torch.Tensor | None = None,
                     attn_mask: Mask = None) -> torch.Tensor:
        """``self(x, positions, attn_mask)`` at one position per text, [B, D]: the query, MLP etc. run only there.

        One text per row: row b at ``index[b]``. Packed (``attn_mask`` a ``Packing``): columns ``index`` of the row.
        """
        index = torch.as_tensor(index, dtype=torch.long, device=x.device)
        h = select_last(x, index, attn_mask).reshape(len(index), -1)
        h = h + self.drop(self.attn.forward_last(self.norm1(x), index, attn_mask))
        return h + self.drop(self.ff(self.norm2(h)))


class GPT2Model(CausalLM):
    """GPT-2: embeddings, ``n_layers`` blocks, final LayerNorm, output head tied to the token embedding."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.out_head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        self.tokenizer: Any = None  # attached by the loader
        self.apply(_init_weights)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token + position embeddings [R, T, D] (everything before block 0); ``positions`` default 0..T-1."""
        check_context(ids, positions, self.cfg.context_length)
        return self.drop_emb(self.tok_emb(ids) + self.pos_emb(default_positions(ids, positions)))


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation for a model trained from scratch: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- checkpoints
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # HF's causal-mask buffers, not weights


def config_from_hf(hf: dict[str, Any]) -> GPT2Config:
    """A ``GPT2Config`` from the fields of a Hugging Face GPT-2 ``config.json``."""
    try:
        cfg = GPT2Config(
            vocab_size=int(hf["vocab_size"]),
            context_length=int(hf["n_positions"]),
            emb_dim=int(hf["n_embd"]),
            n_heads=int(hf["n_head"]),
            n_layers=int(hf["n_layer"]),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as exc:
        raise CheckpointError(f"config.json has no {exc.args[0]!r}: it is not a GPT-2 config.") from exc
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * cfg.emb_dim)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise CheckpointError(f"config.json sets {key}={value!r}; this GPT-2 supports only {allowed}.")
    return cfg


def expected_tensors(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight in a Hugging Face GPT-2 checkpoint (Conv1D weights are [in, out])."""
    d, v = cfg.emb_dim, cfg.vocab_size
    table: dict[str, tuple[int, ...]] = {"wte.weight": (v, d), "wpe.weight": (cfg.context_length, d)}
    for i in range(cfg.n_layers):
        p = f"h.{i}."
        table.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,),
        })
    table.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return table


def _open(path: Path):
    """``safe_open`` with a clear error for corrupt, truncated or non-safetensors files (no pickle involved)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it is corrupt or truncated. "
            f"Delete it and download or save the checkpoint again."
        ) from exc


def _hf_name(name: str) -> str:
    return name.removeprefix("transformer.")


def check_checkpoint(path: str | os.PathLike, cfg: GPT2Config) -> None:
    """Raise ``CheckpointError`` unless the safetensors file at ``path`` holds exactly GPT-2's tensors for ``cfg``.

    Reads only the header: names (with or without a ``transformer.`` prefix), shapes and dtypes.
    """
    path = Path(path)
    with _open(path) as f:
        found = {_hf_name(k): (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    sizes = f"n_embd={cfg.emb_dim}, n_layer={cfg.n_layers}, n_head={cfg.n_heads}, vocab_size={cfg.vocab_size}"
    fix = f"Check that {path.name} belongs to this config ({sizes}); delete {path.parent} and download or save it again."
    expected = expected_tensors(cfg) | {"lm_head.weight": (cfg.vocab_size, cfg.emb_dim)}
    for name, shape in expected.items():
        if name not in found:
            if name == "lm_head.weight":
                continue  # optional: the head is tied to wte
            raise CheckpointError(f"{path.name} has no tensor {name!r} (expected shape {shape}). {fix}")
        got_shape, dtype = found[name]
        if got_shape != shape:
            raise CheckpointError(f"{path.name}: tensor {name!r} has shape {got_shape}, expected {shape}. {fix}")
        if dtype != "F32":
            raise CheckpointError(f"{path.name}: tensor {name!r} is {dtype}, expected F32 (float32). {fix}")
    extra = [name for name in found if name not in expected and not _IGNORED.fullmatch(name)]
    if extra:
        raise CheckpointError(f"{path.name} has an unexpected tensor {extra[0]!r}: it is not a GPT-2 checkpoint. {fix}")


def _read_config(path: Path) -> GPT2Config:
    try:
        return config_from_hf(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Cannot read {path} ({exc}). Delete it and download or save the checkpoint again.") from exc


def _check_preset_config(path: Path, name: str) -> None:
    """``download_file`` hook: the downloaded config.json must describe the preset."""
    cfg = _read_config(path)
    if cfg != PRESETS[name]:
        raise CheckpointError(f"config.json does not describe {name}: got {asdict(cfg)}, expected {asdict(PRESETS[name])}")


def download_gpt2(name: str) -> Path:
    """Folder ``data_dir()/models/<name>`` with the verified ``config.json`` and ``model.safetensors`` of a preset.

    Downloads from ``$GPT2_BASE_URL/<name>/resolve/main/<file>`` (default: Hugging Face's openai-community);
    a cached copy is reused after it verifies again.
    """
    if name not in PRESETS:
        raise CheckpointError(f"Unknown GPT-2 preset {name!r}; pick one of {sorted(PRESETS)}.")
    base = config.gpt2_base_url(DEFAULT_BASE_URL)
    folder = config.data_dir() / "models" / name
    cfg = PRESETS[name]
    # The weights first: if they fail, nothing of this model is left in the cache.
    download_file(
        f"{base}/{name}/resolve/main/model.safetensors", folder / "model.safetensors",
        sha256=WEIGHT_SHA256.get(name), verify=lambda p: check_checkpoint(p, cfg), desc=f"{name} weights",
    )
    download_file(
        f"{base}/{name}/resolve/main/config.json", folder / "config.json",
        verify=lambda p: _check_preset_config(p, name), desc=f"{name} config",
    )
    return folder


def _to_model_state(hf: dict[str, torch.Tensor], cfg: GPT2Config) -> dict[str, torch.Tensor]:
    """Rename (and transpose/split) Hugging Face GPT-2 tensors into this model's ``state_dict``."""
    state = {"tok_emb.weight": hf["wte.weight"], "pos_emb.weight": hf["wpe.weight"],
             "final_norm.weight": hf["ln_f.weight"], "final_norm.bias": hf["ln_f.bias"]}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        q, k, v = hf[h + "attn.c_attn.weight"].T.chunk(3, dim=0)  # Conv1D [in, 3*out] -> 3 x Linear [out, in]
        qb, kb, vb = hf[h + "attn.c_attn.bias"].chunk(3)
        state.update({
            b + "norm1.weight": hf[h + "ln_1.weight"], b + "norm1.bias": hf[h + "ln_1.bias"],
            b + "attn.W_query.weight": q, b + "attn.W_key.weight": k, b + "attn.W_value.weight": v,
            b + "attn.W_query.bias": qb, b + "attn.W_key.bias": kb, b + "attn.W_value.bias": vb,
            b + "attn.out_proj.weight": hf[h + "attn.c_proj.weight"].T, b + "attn.out_proj.bias": hf[h + "attn.c_proj.bias"],
            b + "norm2.weight": hf[h + "ln_2.weight"], b + "norm2.bias": hf[h + "ln_2.bias"],
            b + "ff.fc.weight": hf[h + "mlp.c_fc.weight"].T, b + "ff.fc.bias": hf[h + "mlp.c_fc.bias"],
            b + "ff.proj.weight": hf[h + "mlp.c_proj.weight"].T, b + "ff.proj.bias": hf[h + "mlp.c_proj.bias"],
        })
    state["out_head.weight"] = state["tok_emb.weight"]  # tied
    return {name: t.contiguous() for name, t in state.items()}


def load_checkpoint(folder: str | os.PathLike) -> GPT2Model:
    """A ``GPT2Model`` (eval mode, no tokenizer) from a folder with Hugging Face's config.json + model.safetensors."""
    folder = Path(folder)
    for file in CHECKPOINT_FILES:
        if not (folder / file).is_file():
            raise CheckpointError(
                f"{folder} has no {file}. A GPT-2 checkpoint folder holds {' + '.join(CHECKPOINT_FILES)}, "
                f"e.g. written by transformers' GPT2LMHeadModel.save_pretrained(folder)."
            )
    cfg = _read_config(folder / "config.json")
    path = folder / "model.safetensors"
    check_checkpoint(path, cfg)
    with _open(path) as f:
        hf = {_hf_name(k): f.get_tensor(k) for k in f.keys() if not _IGNORED.fullmatch(_hf_name(k))}
    check_finite(hf, str(path))
    head = hf.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, hf["wte.weight"]):
        raise CheckpointError(f"{path}: lm_head.weight differs from wte.weight; this GPT-2 needs a tied output head.")
    model = GPT2Model(cfg)
    model.load_state_dict(_to_model_state(hf, cfg), strict=True)
    return model.eval()


def load_gpt2(name_or_path: str | os.PathLike | None = None) -> GPT2Model:
    """Pretrained GPT-2 in eval mode with ``model.tokenizer`` attached.

    ``name_or_path``: a preset (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``; downloaded and verified
    once) or a checkpoint folder; default ``helpers.config.model_name()`` (env COURSE_MODEL).
    """
    name = str(name_or_path or config.model_name())
    if name in PRESETS:
        folder = download_gpt2(name)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    else:
        raise CheckpointError(f"{name!r} is neither a GPT-2 preset {sorted(PRESETS)} nor an existing checkpoint folder.")
    model = load_checkpoint(folder)
    model.tokenizer = gpt2_tokenizer()
    return model
