"""Sequence packing (helpers.models.base.Packing, helpers.data.collate_packed): a packed row gives every text the
outputs and gradients it gets alone (right-padded), for both model families, at the last token (classification)
and at every position (instruction tuning's next-token loss)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agreement import assert_close, assert_packed_equals_padded, lora_classifier
from helpers.data import collate_packed
from helpers.instruct_data import IGNORE_INDEX, collate_instructions, instruction_loader, prompt_and_targets
from helpers.models import gpt2, smollm2
from helpers.models.base import (Packing, add_classifier_head, attend, evaluating, packed_hidden,
                                 packed_last_token_logits)
from helpers.train import packed_next_token_loss

TINY_GPT2 = gpt2.GPT2Config(vocab_size=300, context_length=64, emb_dim=32, n_heads=2, n_layers=3)
TINY_SMOLLM2 = smollm2.SmolLM2Config(emb_dim=32, n_layers=3, n_heads=4, n_kv_heads=2, context_length=64,
                                     vocab_size=300, rope_theta=10000.0, norm_eps=1e-5, hidden_dim=64)
TEXTS = [[5, 6, 7, 8], [1], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11], [2, 2], [250, 3, 17]]


def tiny(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (gpt2.GPT2Model(TINY_GPT2) if kind == "gpt2" else smollm2.SmolLM2(TINY_SMOLLM2)).eval()


def test_packing_layout():
    packing = Packing.of([2, 3, 1])
    assert packing.positions.tolist() == [[0, 1, 0, 1, 2, 0]]
    assert packing.ends.tolist() == [1, 4, 5]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert packing.mask.shape == (1, 1, 6, 6) and torch.equal(packing.mask[0, 0], expected)
    assert torch.equal(packing.rows(packing.ends), expected[packing.ends][None, None])
    q, k, v = torch.randn(3, 1, 2, 6, 4).unbind()  # one row, 2 heads, 6 positions
    torch.testing.assert_close(attend(q, k, v, packing), attend(q, k, v, packing.mask))  # per text = dense mask
    with pytest.raises(ValueError, match="one length >= 1 per text"):
        Packing.of([2, 0])


def test_evaluating_restores_the_mode_even_after_an_error():
    model = tiny("gpt2").train()
    with pytest.raises(RuntimeError, match="inside"):
        with evaluating(model):
            assert not model.training and not model.blocks[0].training
            raise RuntimeError("inside")
    assert model.training and model.blocks[0].training
    with evaluating(model.eval()):
        pass
    assert not model.training


def test_collate_packed_for_labels_and_for_token_targets():
    ids, lengths, labels = collate_packed([([4, 5], 1), ([6], 0), ([7, 8, 9], 1)])
    assert ids.tolist() == [[4, 5, 6, 7, 8, 9]] and lengths.tolist() == [2, 1, 3] and labels.tolist() == [1, 0, 1]
    ids, lengths, targets = collate_packed([([4, 5], [5, -100]), ([6, 7, 8], [-100, 8, 9])])
    assert ids.tolist() == [[4, 5, 6, 7, 8]] and lengths.tolist() == [2, 3]
    assert targets.tolist() == [5, -100, -100, 8, 9]


def test_a_packed_batch_of_the_wrong_shape_is_refused():
    model = add_classifier_head(tiny("gpt2"))
    with pytest.raises(ValueError, match="one row of sum\\(lengths\\) = 5 tokens"):
        packed_last_token_logits(model, torch.zeros(2, 5, dtype=torch.long), torch.tensor([2, 3]))


@pytest.mark.parametrize("kind", ["gpt2", "smollm2"])
def test_packed_lora_classifier_equals_padded(kind):
    assert_packed_equals_padded(lora_classifier(tiny(kind)), TEXTS)


@pytest.mark.parametrize("kind", ["gpt2", "smollm2"])
def test_packed_hidden_states_equal_each_text_alone(kind):
    model = tiny(kind)
    ids, lengths, _ = collate_packed([(t, 0) for t in TEXTS])
    with torch.no_grad():
        packed = packed_hidden(model, ids, lengths)[0]  # [N, D]
        alone = torch.cat([model.forward_hidden(torch.tensor([t]))[0] for t in TEXTS])
    assert_close(packed, alone, "hidden states")
    packing = Packing.of(lengths)
    with torch.no_grad():  # from the output of block 0 (a frozen-prefix cache) on
        x = model.blocks[0](model.embed(ids, packing.positions), packing.positions, packing.mask)
        assert_close(packed_hidden(model, x, lengths, first_block=1)[0], alone, "hidden states from block 1")
    with pytest.raises(ValueError, match="Token ids enter at block 0, not 1"):
        packed_hidden(model, ids, lengths, first_block=1)  # ids where block 1's input belongs


@pytest.mark.parametrize("kind", ["gpt2", "smollm2"])
def test_packed_next_token_loss_equals_padded(kind):
    """Instruction tuning: masked next-token loss over every response token, packed vs right-padded, and the
    gradients of the trained block."""
    model = tiny(kind)
    model.blocks[-1].requires_grad_(True)
    examples = [prompt_and_targets(t[:2], t[2:] + [299]) for t in TEXTS if len(t) >= 2]
    assert any(IGNORE_INDEX in targets for _, targets in examples)
    losses, grads = {}, {}
    for name in ("padded", "packed"):
        model.zero_grad()
        if name == "padded":
            ids, _, targets = collate_instructions(examples, pad_id=0)
            logits = model(ids)  # [B, T, V]
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        else:  # the head only at the scored positions
            loss = packed_next_token_loss(model, collate_packed(examples))
        loss.backward()
        losses[name] = loss.detach()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert_close(losses["packed"], losses["padded"], "loss")
    for n, g in grads["padded"].items():
        assert g.abs().max() > 0
        assert_close(grads["packed"][n], g, f"gradient of {n}")


def test_packed_instruction_loader_holds_the_padded_batches_without_padding():
    """``instruction_loader(pack=True)``: the same length-grouped batches as the padded loader, packed."""
    items = [prompt_and_targets(t[:1], t[1:] + [299]) for t in TEXTS * 3]
    padded = list(instruction_loader(items, pad_id=0, batch_size=4, seed=5))
    packed = list(instruction_loader(items, pad_id=0, batch_size=4, seed=5, pack=True))
    assert len(packed) == len(padded) == 4
    for (ids, lengths, targets), (pids, plengths, ptargets) in zip(padded, packed):
        assert torch.equal(plengths, lengths) and pids.shape == (1, int(lengths.sum()))
        real = torch.arange(ids.shape[1])[None] < lengths[:, None]  # [B, T]
        assert torch.equal(pids[0], ids[real]) and torch.equal(ptargets, targets[real])
