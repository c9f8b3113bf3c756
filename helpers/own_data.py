"""Data stage: load *your own* files, with errors that name the row, and split them the course's way.

Two kinds of file, both as CSV, TSV, JSONL or JSON (a list of objects), UTF-8, at most 200 MB:

* a **labelled** file for classification (a text column and a label column, any number of string labels):
  ``load_labelled`` -> a DataFrame with ``Text`` and ``Label`` (int ids) + the label map, then
  ``stratified_split`` (70 / 10 / 20, every label keeps its share in every split). Taught in notebook 09's
  "your own data" section (or the own-data exercise of notebook 06).
* an **instruction** file (``instruction``, optional ``input``, ``output``; names configurable):
  ``load_instructions``, with ``check_context_length`` for examples too long once formatted. Taught in
  notebooks 10 and 11.

How the file is read: CSV follows RFC 4180 (a header line; quotes around fields that hold commas, quotes or
line breaks). TSV is one record per line with *no* quoting — quote characters are kept as text, the way
``SMSSpamCollection`` must be read (see ``helpers.data.read_sms_spam``) — so a tab inside a text is an error.
JSONL is one JSON object per line; blank lines are skipped.

Every problem raises ``DataFileError`` (a ``ValueError``) whose message starts with the file and the place
(``line 12`` of a CSV / TSV / JSONL file, ``record 4`` of a JSON list) and says how to fix it.
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from .config import REPO_ROOT
from .data import SPLIT_NAMES, random_split

MAX_FILE_MB = 200
MAX_FILE_BYTES = MAX_FILE_MB * 1_000_000
MIN_EXAMPLES_PER_LABEL = 10  # 70/10/20 of 10 examples = 7/1/2: every split gets at least one of each label
FILE_TYPES = (".csv", ".tsv", ".jsonl", ".json")

# The course's own example files (written for the course, MIT; see examples/README.md).
EXAMPLES_DIR = REPO_ROOT / "examples"
SUPPORT_REQUESTS = EXAMPLES_DIR / "support_requests.csv"  # text, label
SUPPORT_TICKETS = EXAMPLES_DIR / "support_tickets.jsonl"  # instruction, input, output (a JSON ticket)
SUPPORT_CATEGORIES = ("billing", "course content", "other", "technical problem")  # sorted: label id order


class DataFileError(ValueError):
    """A problem in a data file; the message names the file, the row and what to do."""


@dataclass(frozen=True)
class Record:
    """One row of a file: where it is (``line 12`` / ``record 4``) and its fields by name."""

    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Table:
    """The records of a file, and its header when the file has one (CSV / TSV)."""

    path: Path
    records: list[Record]
    header: list[str] | None


# --- Reading any supported file --------------------------------------------------------------------------

def read_text(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The file's text, after checking its type, its size and that it is UTF-8 (a leading BOM is dropped)."""
    path = Path(path)
    if path.suffix.lower() not in FILE_TYPES:
        raise DataFileError(f"{path.name}: unsupported file type {path.suffix or '(none)'!r}; use one of "
                            f"{', '.join(FILE_TYPES)} (from a spreadsheet: save as 'CSV UTF-8').")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. Check the path (relative paths start at the notebook's "
                                f"folder).")
    size = path.stat().st_size
    if size > max_bytes:
        raise DataFileError(f"{path.name}: the file is {size / 1e6:,.1f} MB, over this loader's limit of "
                            f"{max_bytes / 1e6:,.0f} MB. Fine-tuning needs far less: use a sample of the rows "
                            f"(or raise max_bytes if you really mean it).")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataFileError(f"{path.name}, line {line}: byte 0x{data[exc.start]:02X} at byte offset {exc.start} "
                            f"(column {column}) is not UTF-8. Re-save the file as UTF-8 (in a spreadsheet: "
                            f"'CSV UTF-8'; in Python: open(..., encoding='utf-8')).") from None
    return text.removeprefix("\ufeff")


def read_table(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> Table:
    """Every record of a CSV / TSV / JSONL / JSON file, each with its place in the file."""
    path = Path(path)
    text = read_text(path, max_bytes)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        header, records = _delimited_records(path, text, delimiter="," if suffix == ".csv" else "\t")
    elif suffix == ".jsonl":
        header, records = None, _jsonl_records(path, text)
    else:
        header, records = None, _json_records(path, text)
    if not records:
        raise DataFileError(f"{path.name}: the file holds no records.")
    return Table(path, records, header)


def _delimited_records(path: Path, text: str, delimiter: str) -> tuple[list[str], list[Record]]:
    """CSV (RFC 4180 quoting) or TSV (no quoting): the header and one record per data row."""
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    header: list[str] | None = None
    records = []
    while True:
        start = reader.line_num + 1  # a quoted CSV field may span lines: name the line the row starts on
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataFileError(f"{path.name}, line {start}: cannot parse this row ({exc}). Check its quotes: a "
                                f"field holding a quote must be quoted, with the quote doubled (\"\").") from None
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if header is None:
            header = [name.strip() for name in row]
            duplicates = sorted(name for name, n in Counter(header).items() if n > 1)
            if duplicates:
                raise DataFileError(f"{path.name}, line {start} (the header): column names {duplicates} appear "
                                    f"more than once; rename them.")
            continue
        if len(row) != len(header):
            sep = "comma" if delimiter == "," else "tab"
            hint = ("a comma inside a text needs the whole field in double quotes" if delimiter == "," else
                    "a tab inside a text is not allowed in TSV; replace it with a space")
            raise DataFileError(f"{path.name}, line {start}: {len(row)} {sep}-separated fields, but the header has "
                                f"{len(header)} ({header}); {hint}.")
        records.append(Record(f"line {start}", dict(zip(header, row))))
    return header or [], records


def _jsonl_records(path: Path, text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path.name}, {where}: not valid JSON ({exc.msg} at column {exc.colno}). Each "
                                f"line of a .jsonl file must be one complete JSON object.") from None
        records.append(Record(where, _object(path, where, value)))
    return records


def _json_records(path: Path, text: str) -> list[Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path.name}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}).") \
            from None
    if not isinstance(value, list):
        raise DataFileError(f"{path.name}: a .json file must hold a list of objects ([{{...}}, {{...}}]), "
                            f"not a {type(value).__name__}; for one object per line use .jsonl.")
    return [Record(f"record {i} (data[{i - 1}])", _object(path, f"record {i}", item))
            for i, item in enumerate(value, start=1)]


def _object(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataFileError(f"{path.name}, {where}: expected a JSON object with named fields, "
                            f"got a {type(value).__name__}.")
    return value


def require_columns(table: Table, names: Sequence[str]) -> None:
    """For a file with a header: every column in ``names`` must be in it (checked once, on line 1)."""
    missing = [name for name in names if name not in (table.header or names)]
    if missing:
        raise DataFileError(f"{table.path.name}, line 1 (the header): no column {missing[0]!r}; the columns are "
                            f"{table.header}. Pass the name your file uses (e.g. text_column=..., label_column=...).")


def field_text(table: Table, record: Record, name: str, *, required: bool = True) -> str:
    """The field ``name`` of a record as text; a missing or empty field is an error when ``required``."""
    where = f"{table.path.name}, {record.where}"
    if name not in record.fields:
        if not required:
            return ""
        raise DataFileError(f"{where}: no field {name!r} (this record has {sorted(record.fields)}). Add it, or pass "
                            f"the name your file uses.")
    value = record.fields[name]
    if isinstance(value, (dict, list)):
        raise DataFileError(f"{where}: field {name!r} must be text, got a JSON {type(value).__name__}.")
    text = "" if value is None else str(value)
    if required and not text.strip():
        raise DataFileError(f"{where}: field {name!r} is empty. Fill it in or delete the row.")
    return text


# --- A labelled file for classification (notebook 09 / exercise of notebook 06) ----------------------------

def load_labelled(path: str | Path, text_column: str = "text", label_column: str = "label", *,
                  min_per_label: int = MIN_EXAMPLES_PER_LABEL, max_bytes: int = MAX_FILE_BYTES
                  ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Read a labelled file -> (DataFrame with ``Text`` and ``Label`` (int id), label map name -> id).

    Labels are any strings (surrounding spaces dropped); ids follow the sorted names, so the same file always
    gives the same map. Every label needs ``min_per_label`` examples, because ``stratified_split`` puts
    some of each label into validation and test. The columns match the SMS pipeline's (``helpers.data``).
    """
    table = read_table(path, max_bytes)
    require_columns(table, [text_column, label_column])
    texts, labels, rows = [], [], defaultdict(list)
    for record in table.records:
        texts.append(field_text(table, record, text_column))
        labels.append(field_text(table, record, label_column).strip())
        rows[labels[-1]].append(record.where)
    check_label_counts(table.path.name, rows, min_per_label)
    label_map = {name: i for i, name in enumerate(sorted(rows))}
    return pd.DataFrame({"Text": texts, "Label": [label_map[name] for name in labels]}), label_map


def check_label_counts(source: str, rows: dict[str, list[str]], min_per_label: int) -> None:
    """At least two labels, each with ``min_per_label`` examples; the error lists the rows of the rare ones."""
    if len(rows) < 2:
        raise DataFileError(f"{source}: only one label ({sorted(rows)}); a classifier needs at least two.")
    rare = {name: where for name, where in sorted(rows.items()) if len(where) < min_per_label}
    if rare:
        details = "; ".join(f"{name!r}: {len(where)} (at {', '.join(where[:5])}{', ...' if len(where) > 5 else ''})"
                            for name, where in rare.items())
        raise DataFileError(f"{source}: every label needs at least {min_per_label} examples, because the split is "
                            f"stratified (each of train / validation / test gets its share of every label). Too "
                            f"few: {details}. Add examples, merge the label into another, or remove those rows.")


def label_names(label_map: dict[str, int]) -> list[str]:
    """Label names in id order (``label_names(m)[i]`` is the name of id ``i``)."""
    return sorted(label_map, key=label_map.get)


def stratified_split(df: pd.DataFrame, train_frac: float = 0.7, validation_frac: float = 0.1,
                     seed: int = 123) -> dict[str, pd.DataFrame]:
    """Train / validation / test with the course's 70 / 10 / 20 fractions *within each label*.

    Each label is cut with ``helpers.data.random_split`` (same seed, same rounding as the SMS split), then
    each split is shuffled so the labels interleave.
    """
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SPLIT_NAMES}
    for _, group in df.groupby("Label", sort=True):
        for name, part in random_split(group, train_frac, validation_frac, seed).items():
            parts[name].append(part)
    return {name: pd.concat(chunks).sample(frac=1, random_state=seed).reset_index(drop=True)
            for name, chunks in parts.items()}


# --- An instruction file (notebooks 10 and 11) ------------------------------------------------------------

def load_instructions(path: str | Path, instruction_field: str = "instruction", input_field: str | None = "input",
                      output_field: str = "output", *, count_tokens: Callable[[dict], int] | None = None,
                      context_length: int | None = None, max_bytes: int = MAX_FILE_BYTES) -> list[dict[str, str]]:
    """Read instruction data -> a list of ``{"instruction", "input", "output"}`` dicts (file order).

    ``input`` is optional (missing or empty -> ``""``; ``input_field=None`` ignores it). ``instruction`` and
    ``output`` must be non-empty. With ``count_tokens`` (an example -> its token count once formatted) and
    ``context_length``, an example that would not fit the model is an error naming its row.
    """
    table = read_table(path, max_bytes)
    require_columns(table, [instruction_field, output_field])
    examples = [{"instruction": field_text(table, record, instruction_field),
                 "input": field_text(table, record, input_field, required=False) if input_field else "",
                 "output": field_text(table, record, output_field)} for record in table.records]
    if count_tokens is not None:
        if context_length is None:
            raise ValueError("count_tokens needs context_length (the model's, e.g. 1024 for GPT-2).")
        check_context_length(examples, count_tokens, context_length,
                             where=[f"{table.path.name}, {r.where}" for r in table.records])
    return examples


def check_context_length(examples: Sequence[dict], count_tokens: Callable[[dict], int], context_length: int,
                         where: Sequence[str] | None = None) -> list[int]:
    """Token count of every example (``count_tokens(example)``); an error naming each one over ``context_length``.

    ``count_tokens`` measures what the model will see, e.g. ``lambda ex: len(format_chatml(ex, tok)[0])``.
    ``where`` names the examples in the message (default ``example i``, 0-based).
    """
    lengths = [count_tokens(example) for example in examples]
    too_long = [i for i, n in enumerate(lengths) if n > context_length]
    if too_long:
        names = where or [f"example {i}" for i in range(len(examples))]
        listed = "; ".join(f"{names[i]}: {lengths[i]} tokens" for i in too_long[:10])
        more = f" (and {len(too_long) - 10} more)" if len(too_long) > 10 else ""
        raise DataFileError(f"{len(too_long)} example(s) longer than the context of {context_length} tokens once "
                            f"formatted: {listed}{more}. Shorten or split them, or remove them.")
    return lengths
