"""helpers.data: exact parsing, balancing, labels, split, tokenised datasets and loaders."""
from __future__ import annotations

import io
import zipfile

import pandas as pd
import pytest

from helpers import data


@pytest.fixture(scope="module")
def raw_df() -> pd.DataFrame:
    from conftest import sms_zip_bytes

    zip_bytes, _ = sms_zip_bytes()
    member = zipfile.ZipFile(io.BytesIO(zip_bytes)).read("SMSSpamCollection")
    return data.read_sms_spam(io.BytesIO(member))


def test_exact_parse_counts(raw_df):
    assert len(raw_df) == 5574
    assert raw_df["Label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}


def test_default_quoting_loses_rows():
    from conftest import sms_zip_bytes

    member = zipfile.ZipFile(io.BytesIO(sms_zip_bytes()[0])).read("SMSSpamCollection")
    naive = pd.read_csv(io.BytesIO(member), sep="\t", header=None)
    assert len(naive) < 5574  # the trap the notebook shows


def test_unknown_label_is_a_clear_error():
    with pytest.raises(ValueError, match="unexpected labels"):
        data.read_sms_spam(io.BytesIO(b"maybe\thello\n"))


def test_balance_is_seeded_and_even(raw_df):
    a, b, c = data.balance(raw_df, seed=123), data.balance(raw_df, seed=123), data.balance(raw_df, seed=7)
    assert a["Label"].value_counts().to_dict() == {"ham": 747, "spam": 747}
    assert a.equals(b) and not a.equals(c)


def test_labels_are_idempotent(raw_df):
    once = data.encode_labels(raw_df)
    twice = data.encode_labels(once)
    assert set(once["Label"]) == {0, 1} and once.equals(twice)
    assert (once.loc[raw_df["Label"] == "spam", "Label"] == 1).all()
    with pytest.raises(ValueError, match="Unknown labels"):
        data.encode_labels(pd.DataFrame({"Label": ["ham", "eggs"], "Text": ["a", "b"]}))


def test_split_sizes_and_disjoint(raw_df):
    df = data.encode_labels(data.balance(raw_df)).assign(row=range(1494))
    splits = data.random_split(df, seed=123)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1045, "validation": 149, "test": 300}
    rows = [set(part["row"]) for part in splits.values()]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert set.union(*rows) == set(range(1494))
    assert data.random_split(df, seed=123)["test"].equals(splits["test"])


def test_prepare_and_load_splits_roundtrip(tmp_path):
    splits = data.prepare_splits(folder=tmp_path)
    loaded = data.load_splits(tmp_path)
    for name in data.SPLIT_NAMES:
        pd.testing.assert_frame_equal(splits[name], loaded[name])


class FakeTokenizer:
    pad_id = 99

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def test_dataset_truncates_and_pads():
    df = pd.DataFrame({"Label": ["ham", "spam", "ham"], "Text": ["a bb ccc dddd", "x", ""]})
    ds = data.SpamDataset(df, FakeTokenizer(), max_length=3)
    assert ds.max_length == 3 and ds.encoded[0] == [1, 2, 3]
    assert ds.encoded[2] == [99]  # an empty text still has one position to read
    ids, lengths, labels = data.collate([ds[0], ds[1]], pad_id=99)
    assert ids.tolist() == [[1, 2, 3], [1, 99, 99]] and lengths.tolist() == [3, 1]
    assert labels.tolist() == [0, 1]
    fixed, _, _ = data.collate([ds[1]], pad_id=99, pad_to=5)
    assert fixed.tolist() == [[1, 99, 99, 99, 99]]
    with pytest.raises(ValueError, match="shorter than the longest"):
        data.collate([ds[0]], pad_id=99, pad_to=2)


def test_dataset_never_exceeds_context():
    df = pd.DataFrame({"Label": ["ham"], "Text": ["w " * 50]})
    assert data.SpamDataset(df, FakeTokenizer(), max_length=1000, context_length=16).max_length == 16


@pytest.mark.needs_tokenizer
def test_loader_batches_with_gpt2_tokenizer(tokenizer, tmp_path):
    splits = data.prepare_splits(folder=tmp_path)
    ds = data.SpamDataset(splits["train"], tokenizer)
    loader = data.make_loader(ds, batch_size=8, shuffle=True, drop_last=True)
    assert len(loader) == 1045 // 8
    ids, lengths, labels = next(iter(loader))
    assert ids.shape[0] == 8 and ids.shape[1] == int(lengths.max())
    assert (ids[0, lengths[0]:] == 50256).all()
