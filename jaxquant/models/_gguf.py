"""Opening GGUF files with clear errors, and reading their metadata (internal helpers)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["GGUFError", "get_field", "open_gguf"]

_MAGIC = b"GGUF"
_HEADER_BYTES = 24  # magic u32, version u32, tensor count u64, kv count u64
_MISSING = object()


class GGUFError(ValueError):
    """A GGUF file is missing pieces, corrupt, truncated, or describes something unsupported."""


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """Open ``path`` with ``gguf.GGUFReader`` after checking it is a complete GGUF file.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      GGUFError (a ``ValueError``): ``path`` is a directory, is not a GGUF file, or is corrupt/truncated.
    """
    import gguf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not os.path.isfile(path):
        raise GGUFError(f"{path} is not a file (expected a .gguf model file)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < 4 or head[:4] != _MAGIC:
        raise GGUFError(
            f"{path} is not a GGUF file: it starts with {head[:4]!r}, expected the magic {_MAGIC!r} ({size} bytes)"
        )
    if len(head) < _HEADER_BYTES:
        raise GGUFError(f"{path} is truncated: {size} bytes, shorter than the {_HEADER_BYTES}-byte GGUF header")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises IndexError/ValueError/... on damaged files
        raise GGUFError(
            f"{path} is a corrupt or truncated GGUF file ({size} bytes); gguf-py could not parse it: "
            f"{type(e).__name__}: {e}"
        ) from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise GGUFError(f"{path} is truncated: tensor {t.name!r} needs bytes up to {end} but the file has {size}")
    return reader


def _field_value(field: Any) -> Any:
    contents = getattr(field, "contents", None)
    if contents is not None:
        return contents()
    # older gguf-py: decode from parts/data
    import gguf

    types = list(field.types)
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def get_field(reader: Any, key: str, default: Any = _MISSING, *, path: str = "") -> Any:
    """Value of metadata ``key`` (str, number, bool or list); ``default`` if absent, else ``GGUFError``."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            where = f"{path}: " if path else ""
            raise GGUFError(f"{where}GGUF metadata key {key!r} is missing")
        return default
    try:
        value = _field_value(field)
    except Exception as e:
        raise GGUFError(f"{path}: cannot decode GGUF metadata key {key!r}: {e}") from None
    if isinstance(value, np.generic):
        value = value.item()
    return value
