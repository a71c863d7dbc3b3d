"""Atomic file writes: the one way jaxquant (CLI, model saving, caches, benchmarks) writes a result file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, data: bytes | str, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The data goes to a temporary file in the same folder (created with its parents if missing), which is then
    renamed over ``path`` with :func:`os.replace`; on any error the temporary file is removed and ``path`` is left
    as it was.

    Args:
      path: destination file.
      data: bytes, or text (written as UTF-8).
      mode: permission bits set before the rename (e.g. ``0o644``); ``None`` keeps the temporary file's ``0o600``.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"atomic_write: data must be bytes or str, got {type(data).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
