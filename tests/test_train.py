"""helpers.train and helpers.evaluate: the cached fast path is exact; training learns; checkpoints."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers import data, evaluate, train
from helpers.model import GPT2Config, GPT2Model, add_classifier_head, last_token_logits, set_seed

pytestmark = pytest.mark.needs_tokenizer


@pytest.fixture(scope="module")
def tiny_model():
    from helpers.data import gpt2_tokenizer

    set_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=50257, context_length=256, emb_dim=32, n_heads=2, n_layers=3))
    model.tokenizer = gpt2_tokenizer()
    return add_classifier_head(model, trainable_blocks=1).eval()


@pytest.fixture(scope="module")
def dataset(tiny_model):
    texts = ["Free entry to win cash now!!! txt WIN to 80082", "ok see you at home later", "Hi", "",
             "URGENT! Your mobile number has won a £2000 prize. Call 09061701461", "sorry, I'll call later",
             "Café? naïve 😀 text", "Lunch?"]
    df = pd.DataFrame({"Label": [1, 0, 0, 0, 1, 0, 0, 0], "Text": texts})
    return data.SpamDataset(df, tiny_model.tokenizer)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cached_path_equals_token_path(tiny_model, dataset):
    token = train.make_batches(tiny_model, dataset, batch_size=4, cache=False, progress=False)
    cached = train.make_batches(tiny_model, dataset, batch_size=4, cache=True, progress=False)
    assert cached.cached and not token.cached
    for batch_t, batch_c in zip(token, cached, strict=True):
        assert torch.equal(batch_t[1], batch_c[1]) and torch.equal(batch_t[2], batch_c[2])
        logits_t = token.forward(tiny_model, batch_t[0], batch_t[1])
        logits_c = cached.forward(tiny_model, batch_c[0], batch_c[1])
        torch.testing.assert_close(logits_c, logits_t, atol=1e-5, rtol=0)
        tiny_model.zero_grad()
        loss_t = train.batch_loss(tiny_model, token.forward, batch_t)
        loss_t.backward()
        grads_t = grads(tiny_model)
        tiny_model.zero_grad()
        loss_c = train.batch_loss(tiny_model, cached.forward, batch_c)
        loss_c.backward()
        assert abs(loss_c.item() - loss_t.item()) < 1e-5
        for name, g in grads(tiny_model).items():
            torch.testing.assert_close(g, grads_t[name], atol=1e-5, rtol=0, msg=name)


def test_token_path_equals_full_forward_with_fixed_padding(tiny_model, dataset):
    ids, lengths, _ = data.collate([dataset[i] for i in range(len(dataset))], dataset.pad_id, pad_to=40)
    full = tiny_model(ids)[torch.arange(len(ids)), lengths - 1]  # whole model, fixed padding
    torch.testing.assert_close(last_token_logits(tiny_model, ids, lengths), full, atol=1e-5, rtol=0)


def test_no_cache_when_dropout_or_early_blocks_train(tiny_model, dataset):
    assert train.frozen_prefix(tiny_model) == 2
    for p in tiny_model.blocks[0].parameters():
        p.requires_grad_(True)
    try:
        assert train.frozen_prefix(tiny_model) == 0
        assert not train.make_batches(tiny_model, dataset, progress=False).cached
    finally:
        for p in tiny_model.blocks[0].parameters():
            p.requires_grad_(False)


def test_training_learns_and_both_paths_agree(dataset):
    from helpers.data import gpt2_tokenizer

    def run(cache: bool):
        set_seed(1)
        model = GPT2Model(GPT2Config(vocab_size=50257, context_length=256, emb_dim=32, n_heads=2, n_layers=2))
        model.tokenizer = gpt2_tokenizer()
        add_classifier_head(model, trainable_blocks=1)
        batches = train.make_batches(model, dataset, batch_size=4, shuffle=True, drop_last=True, cache=cache,
                                     progress=False)
        cfg = train.TrainConfig(epochs=15, lr=3e-3, eval_freq=5, eval_iter=2)
        return model, train.train_classifier(model, batches, batches, cfg, progress=False), batches

    model_c, hist_c, batches = run(cache=True)
    model_t, hist_t, _ = run(cache=False)
    assert hist_c.fast_path and not hist_t.fast_path
    assert hist_c.steps == 30 and hist_c.examples_seen == 120 and len(hist_c.train_losses) == 6
    assert hist_c.train_losses[-1] < hist_c.train_losses[0]
    assert train.calc_accuracy(model_c, batches) == 1.0  # 8 texts memorised
    for a, b in zip(hist_c.train_losses, hist_t.train_losses, strict=True):
        assert abs(a - b) < 1e-4


def test_checkpoint_roundtrip_and_errors(tiny_model, tmp_path):
    path = tmp_path / "classifier.pt"
    train.save_classifier(tiny_model, path)
    loaded = train.load_classifier(path)
    ids = torch.tensor([[10, 20, 30, 40]])
    torch.testing.assert_close(last_token_logits(loaded, ids, [4]), last_token_logits(tiny_model, ids, [4]),
                               atol=0, rtol=0)
    assert evaluate.classify(loaded, "hello") == evaluate.classify(tiny_model, "hello")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train.CheckpointError, match="cannot be read"):
        train.load_classifier(tmp_path / "bad.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(train.CheckpointError, match="not a course classifier"):
        train.load_classifier(tmp_path / "other.pt")
    with pytest.raises(train.CheckpointError, match="No checkpoint"):
        train.load_classifier(tmp_path / "missing.pt")


def test_classify_edge_cases(tiny_model):
    empty = evaluate.classify(tiny_model, "")
    assert empty.tokens_used == 1 and 0.0 <= empty.spam_probability <= 1.0
    long = evaluate.classify(tiny_model, "win cash " * 1000)
    assert long.truncated and long.tokens_used == tiny_model.cfg.context_length
    unicode = evaluate.classify(tiny_model, "Ça va? 今晚吃饭吗 😀 <|endoftext|>")
    assert unicode.label in evaluate.LABEL_NAMES and not unicode.truncated
    with pytest.raises(TypeError):
        evaluate.classify(tiny_model, None)


def test_metrics_and_baseline(dataset):
    preds, labels = torch.tensor([1, 0, 1, 1, 0]), torch.tensor([1, 0, 0, 1, 1])
    matrix = evaluate.confusion_matrix(preds, labels)
    assert matrix.tolist() == [[1, 1], [1, 2]]
    scores = evaluate.precision_recall_f1(matrix)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(0.6)
    baseline = evaluate.train_bag_of_tokens(dataset, epochs=100)
    assert evaluate.bag_of_tokens_accuracy(baseline, dataset) >= 0.75
