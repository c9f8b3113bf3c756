"""Generation (helpers.models.base.generate): with the KV cache token for token equal to recomputing everything,
batched prompts of different lengths equal to each prompt alone, stop ids, maximum length, sampling with a seed.
Tiny random models of both families here; the real SmolLM2 in tests/test_smollm2.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.models import gpt2, smollm2
from helpers.models.base import KVCache, generate, generate_greedy

TINY_GPT2 = gpt2.GPT2Config(vocab_size=300, context_length=64, emb_dim=32, n_heads=2, n_layers=3)
TINY_SMOLLM2 = smollm2.SmolLM2Config(emb_dim=32, n_layers=3, n_heads=4, n_kv_heads=2, context_length=64,
                                     vocab_size=300, rope_theta=10000.0, norm_eps=1e-5, hidden_dim=64)
PROMPTS = [[5, 6, 7], [1], [9, 8, 7, 6, 5, 4, 3, 2], [250, 17]]


@pytest.fixture(scope="module", params=["gpt2", "smollm2"])
def model(request) -> nn.Module:
    torch.manual_seed(0)
    model = gpt2.GPT2Model(TINY_GPT2) if request.param == "gpt2" else smollm2.SmolLM2(TINY_SMOLLM2)
    model.out_head = nn.Linear(32, 300, bias=False)  # untied, larger: peaked next-token distributions that
    nn.init.normal_(model.out_head.weight, std=0.5)  # depend on the context (fewer near-ties than the tiny init)
    return model.eval()


def test_kv_cache_equals_recomputing_greedy(model):
    cached = generate(model, PROMPTS, 12)
    assert cached == generate(model, PROMPTS, 12, kv_cache=False)
    assert [len(row) for row in cached] == [12] * len(PROMPTS)
    assert len({tuple(row) for row in cached}) > 1  # the rows really differ


def test_kv_cache_equals_recomputing_sampled_with_a_seed(model):
    kwargs = dict(temperature=0.9, top_k=20, seed=7)
    sampled = generate(model, PROMPTS, 12, **kwargs)
    assert sampled == generate(model, PROMPTS, 12, kv_cache=False, **kwargs)
    assert sampled == generate(model, PROMPTS, 12, **kwargs)  # the seed makes it reproducible
    assert sampled != generate(model, PROMPTS, 12, **{**kwargs, "seed": 8})
    assert sampled != generate(model, PROMPTS, 12)  # not greedy


def test_top_k_1_is_greedy(model):
    assert generate(model, PROMPTS, 8, temperature=1.0, top_k=1, seed=3) == generate(model, PROMPTS, 8)


def test_a_batch_equals_each_prompt_alone(model):
    """Left padding with per-row positions and a padding mask: the padding changes nothing."""
    batched = generate(model, PROMPTS, 10)
    assert batched == [generate(model, prompt, 10) for prompt in PROMPTS]
    assert batched == [generate(model, torch.tensor(prompt), 10) for prompt in PROMPTS]
    padded = torch.zeros(len(PROMPTS), 8, dtype=torch.long)
    for row, prompt in enumerate(PROMPTS):
        padded[row, : len(prompt)] = torch.tensor(prompt)
    assert generate(model, padded, 10, lengths=[len(p) for p in PROMPTS]) == batched  # right-padded input


def test_rows_stop_at_a_stop_id_and_at_max_length(model):
    full = generate(model, PROMPTS, 10)
    stop = full[0][3]  # row 0 stops at its 4th token (or earlier, if that token came before)
    stopped = generate(model, PROMPTS, 10, stop_ids=(stop, 299))
    for row, whole in zip(stopped, full):
        cut = next((i + 1 for i, t in enumerate(whole) if t in (stop, 299)), len(whole))
        assert row == whole[:cut]
    assert stopped[0][-1] == stop and len(stopped[0]) <= 4
    everyone = generate(model, PROMPTS, 10, stop_ids={row[0] for row in full})  # each row stops at once
    assert everyone == [row[:1] for row in full]
    assert generate(model, PROMPTS, 0) == [[] for _ in PROMPTS]


def test_long_prompts_keep_their_last_tokens_and_bad_arguments_are_refused(model):
    long = list(range(1, 100))  # longer than the context of 64
    assert generate(model, long, 4) == generate(model, long[-60:], 4)
    with pytest.raises(ValueError, match="leaves no room for the prompt"):
        generate(model, [1], 64)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="temperature >= 0"):
        generate(model, [1], 3, temperature=-1.0)
    assert not model.training


def test_generate_greedy_is_a_thin_wrapper(model):
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    out = generate_greedy(model, ids, 6)
    assert out.shape == (2, 9) and torch.equal(out[:, :3], ids)
    assert out[:, 3:].tolist() == generate(model, ids, 6)
    first = int(out[0, 3])
    stopped = generate_greedy(model, ids, 6, eos_id=first)
    assert stopped[0, 3:].tolist() == [first] * stopped[0, 3:].numel()  # finished rows are filled with eos


def test_cache_grows_by_one_position_per_step(model):
    cache = [KVCache() for _ in model.blocks]
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        model.forward_hidden(ids, cache=cache)
        assert all(c.keys.shape[2] == ids.shape[1] for c in cache)
        with pytest.raises(ValueError, match="pass attn_mask"):
            model.forward_hidden(ids[:, :1], cache=cache)


@pytest.mark.needs_tokenizer
def test_text_in_text_out(tokenizer):
    torch.manual_seed(0)
    model = gpt2.GPT2Model(gpt2.GPT2Config(emb_dim=32, n_heads=2, n_layers=2)).eval()
    model.tokenizer = tokenizer
    prompt = "Every effort moves you"
    new_ids = generate(model, tokenizer.encode(prompt), 5)
    assert generate(model, prompt, 5) == tokenizer.decode(new_ids)
    assert generate(model, [prompt, "Hi"], 5)[0] == tokenizer.decode(new_ids)
    assert generate_greedy(model, prompt, 5) == prompt + tokenizer.decode(new_ids)
    stop = new_ids[2]
    assert generate(model, prompt, 5, stop_ids=[stop]) == tokenizer.decode(new_ids[: new_ids.index(stop)])
