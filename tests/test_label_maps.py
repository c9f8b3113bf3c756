"""Any label set, not just ham/spam: label maps flow through ``encode_labels``, the datasets and loaders, the
classifier checkpoint and ``classify``; the metrics work for k classes (per class and macro-averaged)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers import checkpoints, data, evaluate
from helpers.models.base import CheckpointError, add_classifier_head, last_token_logits, set_seed
from helpers.models.gpt2 import GPT2Config, GPT2Model, gpt2_tokenizer
from helpers.own_data import SUPPORT_CATEGORIES, SUPPORT_REQUESTS, label_names, load_labelled, stratified_split

SUPPORT = {name: i for i, name in enumerate(SUPPORT_CATEGORIES)}


class CharTokenizer:
    """One id per character (the data pipeline needs only ``encode`` and ``pad_id``)."""

    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(ch) % 1000 + 1 for ch in text]


def test_encode_labels_with_any_label_map():
    df = pd.DataFrame({"Text": ["a", "b", "c", "d"], "Label": ["other", "billing", 3, "1"]})
    assert data.encode_labels(df, SUPPORT)["Label"].tolist() == [2, 0, 3, 1]  # names, ids and id strings
    assert data.encode_labels(pd.DataFrame({"Label": ["spam", "ham"]}))["Label"].tolist() == [1, 0]  # default map
    with pytest.raises(ValueError, match=r"Unknown labels \['spam'\]; expected one of \['billing'"):
        data.encode_labels(df.assign(Label=["spam", "other", "other", "other"]), SUPPORT)
    with pytest.raises(ValueError, match="Unknown labels"):
        data.encode_labels(df)  # four-class names are not ham/spam


def test_four_classes_flow_through_datasets_and_loaders():
    df, label_map = load_labelled(SUPPORT_REQUESTS)
    assert label_map == SUPPORT
    splits = stratified_split(df)
    datasets = data.tokenize_splits(splits, CharTokenizer(), context_length=400, labels=label_map)
    for name, dataset in datasets.items():
        assert dataset.label_map == SUPPORT and sorted(set(dataset.labels)) == [0, 1, 2, 3]
        assert dataset.labels == splits[name]["Label"].tolist()
    named = {name: part.assign(Label=[label_names(label_map)[i] for i in part["Label"]])
             for name, part in splits.items()}  # the same splits with the names instead of the ids
    by_name = data.tokenize_splits(named, CharTokenizer(), context_length=400, labels=label_map)
    assert all(by_name[name].labels == datasets[name].labels for name in splits)
    labels = torch.cat([batch[2] for batch in data.make_loader(datasets["train"], batch_size=16)])
    assert labels.tolist() == datasets["train"].labels


@pytest.mark.needs_tokenizer
def test_a_four_class_classifier_keeps_its_label_names(tmp_path):
    set_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2))
    model.tokenizer = gpt2_tokenizer()
    add_classifier_head(model, num_classes=4, trainable_blocks=1).eval()
    path = checkpoints.save_classifier(model, tmp_path / "support.pt", max_length=40, labels=SUPPORT)
    loaded = checkpoints.load_classifier(path, device="cpu")
    assert loaded.labels == SUPPORT and evaluate.label_names(loaded) == SUPPORT_CATEGORIES
    texts = ["I was charged twice this month", "The video player freezes", "Thanks for the course!"]
    for text in texts:
        result = evaluate.classify(loaded, text)
        ids = torch.tensor([model.tokenizer.encode(text)])
        with torch.no_grad():
            probs = torch.softmax(last_token_logits(model, ids, [ids.shape[1]])[0], -1)
        assert result.label == SUPPORT_CATEGORIES[int(probs.argmax())]
        assert list(result.probabilities) == list(SUPPORT_CATEGORIES)
        assert result.probabilities == pytest.approx(dict(zip(SUPPORT_CATEGORIES, probs.tolist())), abs=1e-6)
    with pytest.raises(ValueError, match="do not name the 4 classes 0..3"):
        checkpoints.save_classifier(model, tmp_path / "wrong.pt", max_length=40)  # ham/spam for a 4-class head
    assert not (tmp_path / "wrong.pt").exists()
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["labels"] = {"ham": 0, "spam": 1}
    torch.save(checkpoint, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="do not name the 4 classes"):
        checkpoints.load_classifier(tmp_path / "edited.pt")


def test_confusion_matrix_and_scores_for_three_classes():
    labels = torch.tensor([0] * 6 + [1] * 10 + [2] * 4)
    preds = torch.tensor([0] * 5 + [1] + [0] * 2 + [1] * 6 + [2] * 2 + [2] * 4)
    matrix = evaluate.confusion_matrix(preds, labels, num_classes=3)
    assert matrix.tolist() == [[5, 1, 0], [2, 6, 2], [0, 0, 4]]
    frame = evaluate.confusion_frame(matrix, ["a", "b", "c"])
    assert list(frame.index) == ["true a", "true b", "true c"] and frame.loc["true b", "predicted c"] == 2
    scores = evaluate.per_class_scores(matrix, ["a", "b", "c"])
    expected = {"a": (5 / 7, 5 / 6), "b": (6 / 7, 6 / 10), "c": (4 / 6, 1.0)}
    for name, (precision, recall) in expected.items():
        assert scores.loc[name, "precision"] == pytest.approx(precision)
        assert scores.loc[name, "recall"] == pytest.approx(recall)
        assert scores.loc[name, "f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert scores["support"].tolist() == [6, 10, 4, 20]
    assert scores.loc["macro average", "recall"] == pytest.approx((5 / 6 + 6 / 10 + 1) / 3)
    with pytest.raises(ValueError, match="2 names"):
        evaluate.per_class_scores(matrix, ["a", "b"])
