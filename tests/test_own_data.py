"""helpers.own_data: the shipped example files load, splits are stratified, and every bad file gets an error
that names the row (each written as a small malformed copy in tmp_path)."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from helpers.data import SpamDataset, make_loader
from helpers.instruct_data import TICKET_FIELDS, TICKET_INSTRUCTION, URGENCIES, is_valid_ticket, ticket_json
from helpers.own_data import (MAX_FILE_BYTES, SUPPORT_CATEGORIES, SUPPORT_REQUESTS, SUPPORT_TICKETS, DataFileError,
                              check_context_length, label_names, load_instructions, load_labelled, stratified_split)


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return path


def labelled_rows(counts: dict[str, int]) -> list[list[str]]:
    """A header and ``n`` distinct texts per label."""
    return [["text", "label"]] + [[f"message {i} about {label}", label]
                                  for label, n in counts.items() for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


class CharTokenizer:
    """A stand-in tokenizer for the data pipeline: one id per character."""

    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(ch) % 1000 + 1 for ch in text]


# --- The shipped files -------------------------------------------------------------------------------------

def test_support_requests_load_with_four_balanced_enough_labels():
    df, label_map = load_labelled(SUPPORT_REQUESTS)
    assert label_map == {name: i for i, name in enumerate(SUPPORT_CATEGORIES)}
    assert list(df.columns) == ["Text", "Label"] and len(df) >= 300
    counts = Counter(label_names(label_map)[i] for i in df["Label"])
    assert min(counts.values()) >= 60, counts
    assert df["Text"].str.strip().str.lower().is_unique
    assert df["Text"].str.contains("\n").any()  # multi-line e-mails survive the CSV quoting


def test_support_tickets_are_valid_and_match_the_requests():
    examples = load_instructions(SUPPORT_TICKETS)
    requests = pd.read_csv(SUPPORT_REQUESTS, dtype=str, keep_default_na=False)
    assert len(examples) == len(requests) >= 300
    assert [ex["input"] for ex in examples] == requests["text"].tolist()
    tickets = [json.loads(ex["output"]) for ex in examples]
    assert {ex["instruction"] for ex in examples} == {TICKET_INSTRUCTION}
    assert all(is_valid_ticket(t) and tuple(t) == TICKET_FIELDS for t in tickets)
    assert [t["category"] for t in tickets] == requests["label"].tolist()
    assert all(ex["output"] == ticket_json(**t) for ex, t in zip(examples, tickets))  # one canonical spelling
    assert all(len(t["summary"].split()) <= 12 and t["summary"].endswith(".") for t in tickets)
    urgency = Counter(t["urgency"] for t in tickets)
    assert set(urgency) == set(URGENCIES) and min(urgency.values()) >= 30, urgency


# --- Stratified split ------------------------------------------------------------------------------------------

def test_stratified_split_keeps_each_labels_share_and_is_seeded():
    df, _ = load_labelled(SUPPORT_REQUESTS)
    splits = stratified_split(df, seed=123)
    for label, n in df["Label"].value_counts().items():
        got = {name: int((part["Label"] == label).sum()) for name, part in splits.items()}
        assert got == {"train": int(n * 0.7), "validation": int(n * 0.1), "test": n - int(n * 0.7) - int(n * 0.1)}
    texts = [set(part["Text"]) for part in splits.values()]
    assert set.union(*texts) == set(df["Text"]) and sum(map(len, texts)) == len(df)  # disjoint, complete
    again = stratified_split(df, seed=123)
    assert all(again[name].equals(splits[name]) for name in splits)
    assert not stratified_split(df, seed=7)["train"].equals(splits["train"])
    assert splits["train"]["Label"].head(20).nunique() > 1  # labels interleave, not one block per label


def test_ten_examples_per_label_give_every_split_each_label(tmp_path):
    df, _ = load_labelled(write_csv(tmp_path / "d.csv", labelled_rows({"a": 10, "b": 10, "c": 10})))
    for part in stratified_split(df).values():
        assert part["Label"].nunique() == 3


def test_binary_own_data_reuses_the_sms_dataset_and_loader(tmp_path):
    df, label_map = load_labelled(write_csv(tmp_path / "d.csv", labelled_rows({"neg": 12, "pos": 12})))
    dataset = SpamDataset(stratified_split(df)["train"], CharTokenizer())
    ids, lengths, labels = next(iter(make_loader(dataset, batch_size=4)))
    assert ids.shape[0] == 4 and set(labels.tolist()) <= set(label_map.values())


# --- The same data in every format ------------------------------------------------------------------------------

def test_csv_tsv_jsonl_and_json_give_the_same_frame(tmp_path):
    rows = labelled_rows({"spam": 10, "ham": 11})
    records = [dict(zip(rows[0], row)) for row in rows[1:]]
    files = [write_csv(tmp_path / "d.csv", rows), write_jsonl(tmp_path / "d.jsonl", records)]
    (tmp_path / "d.tsv").write_text("\n".join("\t".join(row) for row in rows) + "\n", encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    frames = [load_labelled(path) for path in [*files, tmp_path / "d.tsv", tmp_path / "d.json"]]
    for df, label_map in frames:
        assert label_map == {"ham": 0, "spam": 1}
        assert df.equals(frames[0][0])


def test_tsv_keeps_quote_characters_as_text(tmp_path):
    """The SMS trap: with CSV quoting, a line starting with a quote would swallow the following lines."""
    lines = ["text\tlabel", '"Quoted start\ta'] + [f"plain {i}\t{'ab'[i % 2]}" for i in range(20)]
    (tmp_path / "q.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    df, _ = load_labelled(tmp_path / "q.tsv")
    assert len(df) == 21 and df["Text"][0] == '"Quoted start'


def test_column_names_are_configurable_and_labels_are_stripped(tmp_path):
    rows = [["id", "message", "category"]] + [[str(i), f"text {i}", " x " if i % 2 else "y"] for i in range(20)]
    df, label_map = load_labelled(write_csv(tmp_path / "d.csv", rows), text_column="message", label_column="category")
    assert label_map == {"x": 0, "y": 1} and df["Text"][3] == "text 3"


# --- Errors that name the row ------------------------------------------------------------------------------------

def test_missing_column_names_the_header_and_lists_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", [["message", "label"], ["hi", "a"]])
    with pytest.raises(DataFileError, match=r"d\.csv, line 1 \(the header\): no column 'text'.*\['message', 'label'\]"):
        load_labelled(path)


def test_missing_field_in_jsonl_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"},
                                              {"txt": "c", "label": "x"}])
    with pytest.raises(DataFileError, match=r"d\.jsonl, line 3: no field 'text'"):
        load_labelled(path)


def test_empty_text_names_the_line_where_the_row_starts(tmp_path):
    # Row 1 spans lines 2-3 (a quoted line break), so the empty text is on line 5, not the 4th record's "line 4".
    rows = [["text", "label"], ["first\nsecond line", "a"], ["ok", "b"], ["   ", "a"]]
    with pytest.raises(DataFileError, match=r"d\.csv, line 5: field 'text' is empty"):
        load_labelled(write_csv(tmp_path / "d.csv", rows))


def test_rare_label_lists_its_rows(tmp_path):
    rows = labelled_rows({"common": 12, "other": 10}) + [["one", "rare"], ["two", "rare"]]
    with pytest.raises(DataFileError, match=r"at least 10 examples.*stratified.*'rare': 2 \(at line 24, line 25\)"):
        load_labelled(write_csv(tmp_path / "d.csv", rows))


def test_single_label_is_an_error(tmp_path):
    with pytest.raises(DataFileError, match="only one label"):
        load_labelled(write_csv(tmp_path / "d.csv", labelled_rows({"a": 20})))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_bytes_name_the_line_and_byte_offset(tmp_path, suffix):
    lines = ([b"text,label", b"hello,a", b"caf\xe9,b"] if suffix == ".csv" else
             [b'{"instruction": "x", "output": "y"}', b'{"instruction": "caf\xe9", "output": "y"}'])
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    offset = path.read_bytes().index(b"\xe9")
    loader = load_labelled if suffix == ".csv" else load_instructions
    with pytest.raises(DataFileError, match=rf"line {len(lines)}: byte 0xE9 at byte offset {offset} .*not UTF-8"):
        loader(path)


def test_file_over_the_size_limit_is_refused_before_reading(tmp_path):
    assert MAX_FILE_BYTES == 200_000_000
    path = tmp_path / "big.csv"
    with open(path, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # a sparse file: no 200 MB written
    with pytest.raises(DataFileError, match=r"200\.0 MB, over this loader's limit of 200 MB"):
        load_labelled(path)


def test_unknown_extension_lists_the_supported_ones(tmp_path):
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    with pytest.raises(DataFileError, match=r"unsupported file type '\.xlsx'.*\.csv, \.tsv, \.jsonl, \.json"):
        load_labelled(tmp_path / "d.xlsx")


def test_unquoted_comma_names_the_line(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nfine,a\nhello, world,b\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"line 3: 3 comma-separated fields, but the header has 2"):
        load_labelled(tmp_path / "d.csv")


def test_bad_json_names_the_line_or_record(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", label: "y"}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"d\.jsonl, line 2: not valid JSON"):
        load_labelled(tmp_path / "d.jsonl")
    (tmp_path / "d.json").write_text('[{"text": "a", "label": "x"}, ["b", "y"]]', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"d\.json, record 2: expected a JSON object"):
        load_labelled(tmp_path / "d.json")
    (tmp_path / "o.json").write_text('{"text": "a"}', encoding="utf-8")
    with pytest.raises(DataFileError, match="must hold a list of objects"):
        load_labelled(tmp_path / "o.json")


# --- Instruction files ------------------------------------------------------------------------------------------

def test_instructions_from_csv_with_custom_names_and_no_input(tmp_path):
    path = write_csv(tmp_path / "i.csv", [["task", "answer"], ["Say hi.", "Hi!"], ["Count to 3.", "1, 2, 3"]])
    examples = load_instructions(path, instruction_field="task", input_field=None, output_field="answer")
    assert examples == [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
                        {"instruction": "Count to 3.", "input": "", "output": "1, 2, 3"}]


def test_instruction_input_is_optional_per_record(tmp_path):
    (tmp_path / "i.json").write_text(json.dumps([{"instruction": "a", "output": "b"},
                                                 {"instruction": "c", "input": None, "output": "d"},
                                                 {"instruction": "e", "input": "f", "output": "g"}]), encoding="utf-8")
    assert [ex["input"] for ex in load_instructions(tmp_path / "i.json")] == ["", "", "f"]


def test_instruction_errors_name_the_record(tmp_path):
    (tmp_path / "i.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]),
                                     encoding="utf-8")
    with pytest.raises(DataFileError, match=r"i\.json, record 2 \(data\[1\]\): no field 'output'"):
        load_instructions(tmp_path / "i.json")
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": " "}])
    with pytest.raises(DataFileError, match=r"i\.jsonl, line 2: field 'output' is empty"):
        load_instructions(path)


def test_example_longer_than_the_context_names_its_line(tmp_path):
    records = [{"instruction": "short", "output": "ok"}, {"instruction": "short", "output": "ok"},
               {"instruction": "long " * 50, "output": "ok"}]
    path = write_jsonl(tmp_path / "i.jsonl", records)
    words = lambda ex: len(f"{ex['instruction']} {ex['input']} {ex['output']}".split())  # noqa: E731
    with pytest.raises(DataFileError, match=r"1 example\(s\) longer than the context of 20 tokens.*i\.jsonl, line 3: "
                                            r"51 tokens"):
        load_instructions(path, count_tokens=words, context_length=20)
    assert len(load_instructions(path, count_tokens=words, context_length=51)) == 3
    assert check_context_length(records[:2], lambda ex: 7, 7) == [7, 7]
    with pytest.raises(DataFileError, match="example 1: 9 tokens"):
        check_context_length(records[:2], lambda ex: 9 if ex is records[1] else 1, 8)
    with pytest.raises(ValueError, match="needs context_length"):
        load_instructions(path, count_tokens=words)


def test_malformed_copies_of_the_shipped_file_name_the_right_line(tmp_path):
    """The errors on the real file, whose quoted multi-line e-mails make line numbers differ from row numbers."""
    text = SUPPORT_REQUESTS.read_text(encoding="utf-8")
    reader = csv.reader(text.splitlines(keepends=True))
    starts, rows = [], []
    for row in reader:
        starts.append(reader.line_num - row[0].count("\n"))
        rows.append(row)
    target = max(i for i, row in enumerate(rows) if i > 1 and "\n" in rows[i - 1][0])  # after a multi-line row
    emptied = [row if i != target else ["  ", row[1]] for i, row in enumerate(rows)]
    with pytest.raises(DataFileError, match=rf"line {starts[target]}: field 'text' is empty"):
        load_labelled(write_csv(tmp_path / "empty.csv", emptied))
    marked = [row if i != target else ["PLACEHOLDER", row[1]] for i, row in enumerate(rows)]
    data = write_csv(tmp_path / "m.csv", marked).read_bytes().replace(b"PLACEHOLDER", b"caf\xe9 au lait")  # Latin-1
    (tmp_path / "latin1.csv").write_bytes(data)
    with pytest.raises(DataFileError, match=rf"line {starts[target]}: byte 0xE9 at byte offset {data.index(0xE9)} "):
        load_labelled(tmp_path / "latin1.csv")


def test_more_malformed_copies_of_the_shipped_file(tmp_path):
    """A renamed header, a label with too few rows, an unquoted comma, a file over the limit: each names its place."""
    text = SUPPORT_REQUESTS.read_text(encoding="utf-8")
    n_lines = len(text.splitlines())
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(text.replace("text,label", "message,label", 1), encoding="utf-8")
    with pytest.raises(DataFileError, match=r"renamed\.csv, line 1 \(the header\): no column 'text'.*'message'"):
        load_labelled(renamed)
    assert len(load_labelled(renamed, text_column="message")[0]) == 351  # naming the column fixes it
    rare = tmp_path / "rare.csv"
    rare.write_text(text + "Can I pay in bitcoin?,crypto\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"at least 10 examples.*'crypto': 1 \(at line {n_lines + 1}\)"):
        load_labelled(rare)
    comma = tmp_path / "comma.csv"
    comma.write_text(text + "My invoice, the one from May, is wrong,billing\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"comma\.csv, line {n_lines + 1}: 4 comma-separated fields, but the "
                                            r"header has 2.*double quotes"):
        load_labelled(comma)
    with pytest.raises(DataFileError, match=r"over this loader's limit of 0 MB"):
        load_labelled(SUPPORT_REQUESTS, max_bytes=10_000)
