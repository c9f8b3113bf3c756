"""GPT-2 from scratch against Hugging Face transformers, the weight loader's checks, and the model-agnostic tools.

Checkpoints are random (tests/checkpoints.py) and served by a local HTTP server: no network needed.
The 124M-shape tests are marked ``slow`` (about 15 s together).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import models
from helpers.models import base, gpt2
from helpers.download import DownloadError
from hf_checkpoints import GPT2_124M, make_gpt2_checkpoint, make_hf_gpt2

TINY = gpt2.GPT2Config(emb_dim=32, n_heads=2, n_layers=2)
TEXTS = ["Hi", "Free entry in 2 a wkly comp to win FA Cup final tkts!", "Ok lar... Joking wif u oni..."]
ATOL = 1e-5
pytestmark = pytest.mark.needs_tokenizer  # the loader attaches GPT-2's tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_gpt2_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def hf_tiny(tiny_folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_folder).eval()


@pytest.fixture(scope="module")
def tiny(tiny_folder) -> gpt2.GPT2Model:
    return gpt2.load_gpt2(tiny_folder)


@pytest.fixture
def served(server, tmp_path, monkeypatch):
    """The local server (conftest) as GPT2_BASE_URL, a ``tiny-gpt2`` preset, and an empty data folder."""
    monkeypatch.setitem(gpt2.PRESETS, "tiny-gpt2", TINY)
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPT2_BASE_URL", server.url(""))
    return server


def padded(tokenizer, texts: list[str], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, width] (default: the longest text) and the real lengths [B]."""
    rows = [tokenizer.encode(t) for t in texts]
    width = width or max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows])
    return ids, torch.tensor([len(r) for r in rows])


def rewrite(src: Path, dst: Path, edit: Callable[[dict], dict]) -> Path:
    """Copy checkpoint folder ``src`` to ``dst`` with its tensors changed by ``edit``."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors")
    return dst


def cached_files(data: Path) -> list[Path]:
    return [p for p in (data / "models").rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------- equal to transformers
@torch.no_grad()
def test_logits_equal_transformers(tiny, hf_tiny):
    torch.manual_seed(0)
    for ids in (torch.tensor([[50256]]), torch.randint(0, 50257, (2, 37)), torch.randint(0, 50257, (1, 1024))):
        torch.testing.assert_close(tiny(ids), hf_tiny(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_right_padded_batch_equals_each_text_alone(tiny, hf_tiny):
    ids, lengths = padded(tiny.tokenizer, TEXTS)
    logits = tiny(ids)
    for row, n in enumerate(lengths.tolist()):
        alone = hf_tiny(ids[row : row + 1, :n]).logits[0]
        torch.testing.assert_close(logits[row, :n], alone, atol=ATOL, rtol=0)


def test_greedy_generation_equals_transformers(tiny, hf_tiny):
    prompt = torch.tensor([tiny.tokenizer.encode("Every effort moves you")])
    ours = base.generate_greedy(tiny, prompt, max_new_tokens=12)
    theirs = hf_tiny.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                              do_sample=False, pad_token_id=50256)
    assert torch.equal(ours, theirs)
    text = base.generate_greedy(tiny, "Every effort moves you", max_new_tokens=12)
    assert text == tiny.tokenizer.decode(ours[0].tolist())


def test_generation_stops_at_eos(tiny):
    prompt = torch.tensor([tiny.tokenizer.encode("Every effort moves you")])
    first = int(base.generate_greedy(tiny, prompt, max_new_tokens=1)[0, -1])
    assert base.generate_greedy(tiny, prompt, max_new_tokens=10, eos_id=first).shape == (1, prompt.shape[1] + 1)


def test_generation_crops_to_the_context(tiny):
    long = torch.randint(0, 50257, (1, tiny.cfg.context_length + 5))
    out = base.generate_greedy(tiny, long, max_new_tokens=2)
    assert out.shape == (1, tiny.cfg.context_length + 7)
    assert not tiny.training


# ----------------------------------------------------------------------------- the last-token trick
@torch.no_grad()
def test_forward_last_equals_full_block_output(tiny):
    torch.manual_seed(1)
    x = torch.randn(4, 20, tiny.cfg.emb_dim)
    index = torch.tensor([0, 7, 19, 12])
    for block in tiny.blocks:
        torch.testing.assert_close(block.forward_last(x, index), block(x)[torch.arange(4), index], atol=ATOL, rtol=0)


@torch.no_grad()
def test_last_token_logits_equal_gathered_hidden_states(tiny):
    ids, lengths = padded(tiny.tokenizer, TEXTS)
    rows = torch.arange(len(TEXTS))
    expected = tiny.out_head(tiny.forward_hidden(ids)[rows, lengths - 1])
    torch.testing.assert_close(base.last_token_logits(tiny, ids, lengths), expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_padding_width_does_not_change_the_last_token(tiny):
    short, lengths = padded(tiny.tokenizer, TEXTS)
    wide, _ = padded(tiny.tokenizer, TEXTS, width=120)
    torch.testing.assert_close(base.last_token_logits(tiny, short, lengths), base.last_token_logits(tiny, wide, lengths),
                               atol=ATOL, rtol=0)
    rows = torch.arange(len(TEXTS))
    torch.testing.assert_close(tiny(short)[rows, lengths - 1], tiny(wide)[rows, lengths - 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("bad", [0, 6])
def test_last_token_logits_rejects_lengths_outside_the_batch(tiny, bad):
    with pytest.raises(ValueError, match=r"lengths must be in 1\.\.5"):
        base.last_token_logits(tiny, torch.zeros(2, 5, dtype=torch.long), [3, bad])


def test_classifier_head_on_tiny_model(tiny_folder):
    model = base.add_classifier_head(gpt2.load_gpt2(tiny_folder), num_classes=2, trainable_blocks=1, seed=123)
    ids, lengths = padded(model.tokenizer, TEXTS)
    assert base.last_token_logits(model, ids, lengths).shape == (3, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("blocks.1.", "final_norm.", "out_head."))}
    again = base.add_classifier_head(gpt2.load_gpt2(tiny_folder), seed=123)
    assert torch.equal(model.out_head.weight, again.out_head.weight)


def test_count_params_of_presets_from_the_tensor_table():
    counts = {name: sum(torch.Size(s).numel() for s in gpt2.expected_tensors(cfg).values()) for name, cfg in gpt2.PRESETS.items()}
    assert counts == {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


# ----------------------------------------------------------------------------- downloading presets
def test_preset_downloads_verifies_and_caches(served, tiny_folder, tiny, monkeypatch, tmp_path):
    served.add_tree("/tiny-gpt2/resolve/main", tiny_folder)
    model = gpt2.load_gpt2("tiny-gpt2")
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), tiny(ids), atol=0, rtol=0)
    assert not model.training and model.tokenizer.pad_id == 50256
    assert sorted(p.name for p in cached_files(tmp_path / "data")) == ["config.json", "model.safetensors"]
    monkeypatch.setenv("COURSE_MODEL", "tiny-gpt2")
    models.load_model()  # from the cache: no second download
    assert served.hits["/tiny-gpt2/resolve/main/model.safetensors"] == 1


def test_pinned_sha256_rejects_other_weights_and_caches_nothing(served, tiny_folder, tmp_path):
    served.add_tree("/gpt2/resolve/main", tiny_folder)
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        gpt2.load_gpt2("gpt2")
    assert cached_files(tmp_path / "data") == []


def test_wrong_shapes_fail_the_download_and_cache_nothing(served, tmp_path):
    other = make_gpt2_checkpoint(tmp_path / "wide", n_embd=64)
    served.add_tree("/tiny-gpt2/resolve/main", other)
    with pytest.raises(DownloadError, match=r"'wte.weight' has shape \(50257, 64\), expected \(50257, 32\)"):
        gpt2.load_gpt2("tiny-gpt2")
    assert cached_files(tmp_path / "data") == []


def test_corrupt_download_and_http_error_cache_nothing(served, tiny_folder, tmp_path):
    served.add("/tiny-gpt2/resolve/main/model.safetensors", b"\x00" * 4096)
    with pytest.raises(DownloadError, match="not a readable safetensors file"):
        gpt2.load_gpt2("tiny-gpt2")
    served.add("/tiny-gpt2/resolve/main/model.safetensors", tiny_folder / "model.safetensors", status=404)
    with pytest.raises(DownloadError, match="HTTP 404"):
        gpt2.load_gpt2("tiny-gpt2")
    assert cached_files(tmp_path / "data") == []


def test_config_must_describe_the_preset(served, tiny_folder, tmp_path):
    served.add_tree("/tiny-gpt2/resolve/main", tiny_folder)
    hf = json.loads((tiny_folder / "config.json").read_text()) | {"n_layer": 3}
    served.add("/tiny-gpt2/resolve/main/config.json", json.dumps(hf).encode())
    with pytest.raises(DownloadError, match="config.json does not describe tiny-gpt2"):
        gpt2.load_gpt2("tiny-gpt2")


# ----------------------------------------------------------------------------- checkpoint folders
def test_official_layout_loads(tiny_folder, tiny, tmp_path):
    """The official file: no ``transformer.`` prefix, HF's mask buffers present, a tied lm_head."""

    def official(t: dict) -> dict:
        t = {k.removeprefix("transformer."): v for k, v in t.items()}
        for i in range(2):
            t[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1024, 1024)).view(1, 1, 1024, 1024)
            t[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        return t | {"lm_head.weight": t["wte.weight"].clone()}

    model = gpt2.load_gpt2(rewrite(tiny_folder, tmp_path / "official", official))
    for ours, reference in zip(model.state_dict().values(), tiny.state_dict().values()):
        assert torch.equal(ours, reference)


def drop(name: str) -> Callable[[dict], dict]:
    return lambda t: {k: v for k, v in t.items() if k != name}


BROKEN = {
    "missing": (drop("transformer.h.1.mlp.c_proj.bias"), r"has no tensor 'h.1.mlp.c_proj.bias' \(expected shape \(32,\)\)"),
    "wrong shape": (lambda t: t | {"transformer.h.0.attn.c_attn.weight": torch.zeros(32, 64)},
                    r"'h.0.attn.c_attn.weight' has shape \(32, 64\), expected \(32, 96\)"),
    "wrong dtype": (lambda t: t | {"transformer.ln_f.bias": t["transformer.ln_f.bias"].half()}, "is F16, expected F32"),
    "extra": (lambda t: t | {"transformer.h.2.ln_1.weight": torch.zeros(32)}, "unexpected tensor 'h.2.ln_1.weight'"),
    "untied head": (lambda t: t | {"lm_head.weight": torch.zeros(50257, 32)}, "lm_head.weight differs from wte.weight"),
    "nan": (lambda t: t | {"transformer.h.0.ln_1.weight": torch.full((32,), float("nan"))},
            r"hold NaN or inf values, e.g. \['h.0.ln_1.weight'\]"),
    "inf": (lambda t: t | {"transformer.wte.weight": t["transformer.wte.weight"].index_fill(0, torch.tensor([7]), float("inf"))},
            r"hold NaN or inf values, e.g. \['wte.weight'\]"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoints_name_the_tensor(tiny_folder, tmp_path, case):
    edit, message = BROKEN[case]
    with pytest.raises(base.CheckpointError, match=message):
        gpt2.load_gpt2(rewrite(tiny_folder, tmp_path / "broken", edit))


@pytest.mark.parametrize("cut", ["truncated", "header only", "not safetensors"])
def test_corrupt_files_give_a_clear_error(tiny_folder, tmp_path, cut):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[:-1000], "header only": data[:40], "not safetensors": b"PK\x03\x04" * 64}[cut])
    with pytest.raises(base.CheckpointError, match="not a readable safetensors file.*corrupt or truncated"):
        gpt2.load_gpt2(folder)


def test_unusable_folders_and_names(tiny_folder, tmp_path):
    with pytest.raises(base.CheckpointError, match="neither a GPT-2 preset"):
        gpt2.load_gpt2(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(base.CheckpointError, match="has no config.json"):
        gpt2.load_gpt2(tmp_path / "empty")
    folder = shutil.copytree(tiny_folder, tmp_path / "relu")
    hf = json.loads((folder / "config.json").read_text()) | {"activation_function": "relu"}
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(base.CheckpointError, match="activation_function='relu'"):
        gpt2.load_gpt2(folder)


# ----------------------------------------------------------------------------- small tools
def test_pick_device_and_seed(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert base.pick_device() == torch.device("cpu")
    assert base.pick_device("meta") == torch.device("meta")
    monkeypatch.delenv("COURSE_DEVICE")
    assert base.pick_device().type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            base.pick_device("cuda")
    base.set_seed(5)
    a = torch.rand(3)
    base.set_seed(5)
    assert torch.equal(a, torch.rand(3))


def test_load_model_dispatches(monkeypatch, tiny_folder):
    smollm2 = torch.nn.Linear(1, 1)  # stands for the real model: load_model moves it to the device
    monkeypatch.setattr(models, "load_smollm2", lambda: smollm2)
    assert models.load_model("SmolLM2-135M", device="cpu") is smollm2
    assert isinstance(models.load_model(tiny_folder), gpt2.GPT2Model)


def test_tokenizer_keeps_special_strings_as_text_and_rejects_lone_surrogates(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("hi <|endoftext|>")
    assert tok.pad_id not in ids and tok.decode(ids) == "hi <|endoftext|>"
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud83d' at position 3"):
        tok.encode("hi \ud83d!")


def test_build_model_checks_the_config_before_allocating():
    model = models.build_model("GPT2Model", {"emb_dim": 32, "n_heads": 2, "n_layers": 2})
    assert isinstance(model, gpt2.GPT2Model) and model.tokenizer.name == "gpt2" and model.cfg == TINY
    with pytest.raises(base.CheckpointError, match="Unknown architecture 'Llama'"):
        models.build_model("Llama", {})
    with pytest.raises(base.CheckpointError, match="not valid"):
        models.build_model("GPT2Model", {"emb_dim": 32, "n_heads": 2})  # n_layers missing
    huge = {"emb_dim": 1_000_000, "n_heads": 1, "n_layers": 1000}  # ~1e16 parameters: 40 PB of float32
    with pytest.raises(base.CheckpointError, match="more than any course model"):
        models.build_model("GPT2Model", huge)


def test_model_from_scratch_has_the_shared_interface():
    model = gpt2.GPT2Model(TINY)
    assert model.out_head.weight is model.tok_emb.weight
    ids = torch.randint(0, 50257, (2, 6))
    assert model.embed(ids).shape == (2, 6, 32) and model.forward_hidden(ids).shape == (2, 6, 32)
    assert model(ids).shape == (2, 6, 50257)
    assert all(isinstance(m, torch.nn.Linear) for b in model.blocks for m in
               (b.attn.W_query, b.attn.W_key, b.attn.W_value, b.attn.out_proj, b.ff.fc, b.ff.proj))
    with pytest.raises(ValueError, match="do not fit the context"):
        model(torch.zeros(1, 1025, dtype=torch.long))


# ----------------------------------------------------------------------------- the 124M shapes
@pytest.fixture(scope="module")
def gpt2_124m(tmp_path_factory):
    """Our 124M-shape model and the transformers model it was saved from."""
    hf = make_hf_gpt2(**GPT2_124M)
    folder = tmp_path_factory.mktemp("gpt2-124m")
    hf.save_pretrained(folder)
    return gpt2.load_gpt2(folder), hf


@pytest.mark.slow
def test_124m_counts_and_matches_transformers(gpt2_124m):
    model, hf = gpt2_124m
    assert model.cfg == gpt2.PRESETS["gpt2"]
    assert base.count_params(model) == 124_439_808
    ids, lengths = padded(model.tokenizer, TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:1, : lengths[0]]), hf(ids[:1, : lengths[0]]).logits, atol=ATOL, rtol=0)
        expected = hf(ids).logits[torch.arange(3), lengths - 1]
        torch.testing.assert_close(base.last_token_logits(model, ids, lengths), expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_124m_classifier_head_trainable_params(gpt2_124m):
    model = base.add_classifier_head(gpt2_124m[0], num_classes=2, trainable_blocks=1)
    assert base.count_params(model, trainable_only=True) == 7_090_946
    assert base.count_params(model) == 124_439_808 + 768 * 2 + 2
