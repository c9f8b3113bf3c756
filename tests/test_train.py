"""helpers.fastpath, helpers.train, helpers.evaluate: the cached fast path is exact and never stale; training
learns; metrics; ``classify``."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from agreement import assert_paths_agree
from helpers import data, evaluate, fastpath, train
from helpers.models.base import add_classifier_head, last_token_logits, set_seed
from helpers.models.gpt2 import GPT2Config, GPT2Model, gpt2_tokenizer

pytestmark = pytest.mark.needs_tokenizer


def tiny_gpt2(n_layers: int = 3, seed: int = 0) -> GPT2Model:
    set_seed(seed)
    model = GPT2Model(GPT2Config(vocab_size=50257, context_length=256, emb_dim=32, n_heads=2, n_layers=n_layers))
    model.tokenizer = gpt2_tokenizer()
    return add_classifier_head(model, trainable_blocks=1).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def dataset(tiny_model):
    texts = ["Free entry to win cash now!!! txt WIN to 80082", "ok see you at home later", "Hi", "",
             "URGENT! Your mobile number has won a £2000 prize. Call 09061701461", "sorry, I'll call later",
             "Café? naïve 😀 text", "Lunch?"]
    df = pd.DataFrame({"Label": [1, 0, 0, 0, 1, 0, 0, 0], "Text": texts})
    return data.SpamDataset(df, tiny_model.tokenizer)


def test_cached_path_equals_token_path(tiny_model, dataset):
    assert_paths_agree(tiny_model, dataset, atol=1e-5)


def test_token_path_equals_full_forward_with_fixed_padding(tiny_model, dataset):
    ids, lengths, _ = data.collate([dataset[i] for i in range(len(dataset))], dataset.pad_id, pad_to=40)
    full = tiny_model(ids)[torch.arange(len(ids)), lengths - 1]  # whole model, fixed padding
    torch.testing.assert_close(last_token_logits(tiny_model, ids, lengths), full, atol=1e-5, rtol=0)


def test_no_cache_when_dropout_or_early_blocks_train(tiny_model, dataset):
    assert fastpath.frozen_prefix(tiny_model) == 2
    for p in tiny_model.blocks[0].parameters():
        p.requires_grad_(True)
    try:
        assert fastpath.frozen_prefix(tiny_model) == 0
        assert not fastpath.make_batches(tiny_model, dataset, progress=False).cached
    finally:
        for p in tiny_model.blocks[0].parameters():
            p.requires_grad_(False)


def test_a_block_unfrozen_after_caching_is_an_error(dataset):
    model = tiny_gpt2()
    batches = fastpath.make_batches(model, dataset, batch_size=4, progress=False)
    assert batches.cached and train.calc_loss(model, batches) > 0  # the cache holds: no error
    model.blocks[1].requires_grad_(True)  # would get no gradient: its output is cached
    for run in (lambda: train.calc_loss(model, batches), lambda: train.calc_accuracy(model, batches),
                lambda: train.train_classifier(model, batches, batches, train.TrainConfig(epochs=1), progress=False),
                lambda: evaluate.predict(model, batches)):
        with pytest.raises(fastpath.StaleCacheError, match=r"blocks\.1\..* was unfrozen after the batches cached"):
            run()


def test_a_frozen_weight_changed_after_caching_is_an_error(dataset):
    model = tiny_gpt2()
    batches = fastpath.make_batches(model, dataset, batch_size=4, progress=False)
    with torch.no_grad():
        model.tok_emb.weight[0] += 1.0  # e.g. loading other weights into the same model
    with pytest.raises(fastpath.StaleCacheError, match="tok_emb.weight changed after the batches cached"):
        train.calc_accuracy(model, batches)
    with pytest.raises(fastpath.StaleCacheError, match="not the parameter the cached batches were computed with"):
        train.calc_loss(tiny_gpt2(seed=1), batches)  # another model
    fresh = fastpath.make_batches(model, dataset, batch_size=4, progress=False)
    assert train.calc_loss(model, fresh) > 0  # rebuilt: fine again


def test_training_learns_and_both_paths_agree(dataset):
    def run(cache: bool):
        model = tiny_gpt2(n_layers=2, seed=1)
        batches = fastpath.make_batches(model, dataset, batch_size=4, shuffle=True, drop_last=True, cache=cache,
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


@torch.no_grad()
def test_classify_reads_the_last_real_token_and_truncates(tiny_model):
    tok = tiny_model.tokenizer
    text = "Ça va? 今晚吃饭吗 😀 <|endoftext|>"
    ids = tok.encode(text)
    result = evaluate.classify(tiny_model, text)
    probs = torch.softmax(last_token_logits(tiny_model, torch.tensor([ids]), [len(ids)])[0], -1)
    assert result.tokens_used == len(ids) and not result.truncated
    assert result.spam_probability == pytest.approx(float(probs[1]), abs=1e-6)
    assert result.label == ("spam" if probs[1] > probs[0] else "ham")
    assert result.probabilities == pytest.approx({"ham": float(probs[0]), "spam": float(probs[1])}, abs=1e-6)
    empty = evaluate.classify(tiny_model, "")
    assert empty.tokens_used == 1 and empty.spam_probability == pytest.approx(
        float(torch.softmax(last_token_logits(tiny_model, torch.tensor([[tok.pad_id]]), [1])[0], -1)[1]), abs=1e-6)
    long = evaluate.classify(tiny_model, "win cash " * 1000)
    assert long.truncated and long.tokens_used == tiny_model.cfg.context_length  # no trained length known
    short = evaluate.classify(tiny_model, "win cash " * 1000, max_length=7)
    assert short.truncated and short.tokens_used == 7
    with pytest.raises(TypeError):
        evaluate.classify(tiny_model, None)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_classify_rejects_a_bad_max_length(tiny_model, bad):
    with pytest.raises(ValueError, match="max_length must be a whole number of tokens >= 1"):
        evaluate.classify(tiny_model, "hello", max_length=bad)


def test_classify_rejects_broken_text(tiny_model):
    with pytest.raises(ValueError, match="lone surrogate"):
        evaluate.classify(tiny_model, "cut emoji \ud83d here")


def test_metrics_and_baseline(dataset):
    preds, labels = torch.tensor([1, 0, 1, 1, 0]), torch.tensor([1, 0, 0, 1, 1])
    matrix = evaluate.confusion_matrix(preds, labels)
    assert matrix.tolist() == [[1, 1], [1, 2]]
    scores = evaluate.precision_recall_f1(matrix)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(0.6)
    baseline = evaluate.train_bag_of_tokens(dataset, epochs=100)
    assert evaluate.bag_of_tokens_accuracy(baseline, dataset) >= 0.75


def test_rebatch_repeats_the_seeded_order_and_restore_restarts_training(dataset):
    model = tiny_gpt2(n_layers=2, seed=2)
    batches = fastpath.make_batches(model, dataset, batch_size=4, shuffle=True, drop_last=True, progress=False)
    tokens = data.make_loader(dataset, batch_size=4, shuffle=True, drop_last=True)
    first = [labels.tolist() for _, _, labels in fastpath.rebatch(batches, shuffle=True, drop_last=True)]
    assert first == [labels.tolist() for _, _, labels in tokens]  # the token loader's order
    assert first == [labels.tolist() for _, _, labels in fastpath.rebatch(batches, shuffle=True, drop_last=True)]
    fold = fastpath.rebatch(batches, [1, 4, 6])
    assert fold.cached and [labels.tolist() for _, _, labels in fold] == [[0, 1, 0]]

    start = train.trainable_state(model)
    assert set(start) == {n for n, p in model.named_parameters() if p.requires_grad}
    cfg = train.TrainConfig(epochs=2, lr=1e-2, eval_freq=100)
    train.train_classifier(model, fastpath.rebatch(batches, shuffle=True, drop_last=True), batches, cfg, progress=False)
    after = train.trainable_state(model)
    assert not torch.equal(after["out_head.weight"], start["out_head.weight"])
    train.restore_trainable(model, start)
    assert train.calc_loss(model, batches) > 0  # restoring trainable weights keeps the cache valid
    train.train_classifier(model, fastpath.rebatch(batches, shuffle=True, drop_last=True), batches, cfg, progress=False)
    for name, value in train.trainable_state(model).items():
        torch.testing.assert_close(value, after[name], atol=0, rtol=0)  # the same run again, exactly


def test_accuracy_summary_with_and_without_texts_seen_in_training():
    test = pd.DataFrame({"Label": [1, 0, 1, 0], "Text": ["WIN now", "hi", "FREE cash", "lunch?"]})
    seen = data.texts_also_in(test, pd.DataFrame({"Label": [1, 1], "Text": ["WIN now", "FREE cash"]}))
    assert seen.tolist() == [True, False, True, False]
    summary = evaluate.accuracy_summary(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 0, 1, 0]), seen)
    assert summary["accuracy"] == 0.75 and summary["n"] == 4
    assert summary["standard_error"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    assert summary["accuracy_unseen"] == 0.5 and summary["n_unseen"] == 2
    with pytest.raises(ValueError, match="3 entries for 4 predictions"):
        evaluate.accuracy_summary(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 0, 1, 0]), [True, False, True])
