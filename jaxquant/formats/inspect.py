"""``jaxquant inspect``: what is inside a GGUF file, a safetensors file, or an HF checkpoint folder.

For every tensor: name, storage type, logical shape (numpy order), bytes and bits per weight; then totals.
GGUF files also list their main metadata. In safetensors checkpoints the GPTQ/AWQ tensor groups of a layer
(``qweight``/``qzeros``/``scales``/``g_idx``) are shown as one quantized weight with its logical shape and real
bits per weight (scales and zeros included); the format is taken from ``config.json``'s
``quantization_config`` when present, else guessed from the tensor names (``g_idx`` -> GPTQ, else AWQ).
Headers are validated before anything is read: corrupt files give a one-line error, not a crash.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

__all__ = ["FileReport", "TensorRow", "inspect_path"]


@dataclasses.dataclass(frozen=True)
class TensorRow:
    """One tensor (or one GPTQ/AWQ quantized weight) of a file."""

    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def n_weights(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.n_weights, 1)


@dataclasses.dataclass(frozen=True)
class FileReport:
    """Everything ``jaxquant inspect`` prints."""

    path: str
    format: str
    rows: tuple[TensorRow, ...]
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @property
    def n_weights(self) -> int:
        return sum(r.n_weights for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "metadata": dict(self.metadata),
            "tensors": [
                {"name": r.name, "type": r.type, "shape": list(r.shape), "bytes": r.nbytes, "bpw": r.bits_per_weight}
                for r in self.rows
            ],
            "total_bytes": self.total_bytes,
            "n_weights": self.n_weights,
        }

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.format}"]
        for k, v in self.metadata:
            lines.append(f"  {k} = {v}")
        w = max([len(r.name) for r in self.rows] + [6])
        head = f"{'tensor':<{w}} {'type':<14} {'shape':<20} {'bytes':>12} {'bpw':>7}"
        lines += [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name:<{w}} {r.type:<14} {r.shape!s:<20} {r.nbytes:>12,} {r.bits_per_weight:>7.3f}")
        lines.append("-" * len(head))
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.type] = counts.get(r.type, 0) + 1
        bpw = 8.0 * self.total_bytes / max(self.n_weights, 1)
        lines.append(
            f"{len(self.rows)} tensors, {self.n_weights:,} weights, {self.total_bytes:,} bytes "
            f"({self.total_bytes / 2**20:.1f} MiB), {bpw:.3f} bits/weight; types: "
            + ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
        )
        return "\n".join(lines)


def _inspect_gguf(path: str) -> FileReport:
    from jaxquant.formats.gguf_reader import _open
    from jaxquant.models._gguf import get_field

    reader = _open(path)
    rows = []
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(list(t.shape)))
        rows.append(TensorRow(t.name, t.tensor_type.name, shape, int(t.n_bytes)))
    meta = []
    for key in (
        "general.architecture",
        "general.name",
        "general.file_type",
        "general.quantization_version",
    ):
        v = get_field(reader, key, None, path=path)
        if v is not None:
            meta.append((key, str(v)))
    arch = get_field(reader, "general.architecture", None, path=path)
    if arch:
        for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
            v = get_field(reader, f"{arch}.{k}", None, path=path)
            if v is not None:
                meta.append((f"{arch}.{k}", str(v)))
    tok = get_field(reader, "tokenizer.ggml.model", None, path=path)
    if tok is not None:
        n = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
        meta.append(("tokenizer", f"{tok} ({n} tokens)"))
    version = get_field(reader, "GGUF.version", None, path=path)
    return FileReport(path, f"GGUF v{version}", tuple(rows), tuple(meta))


_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ST_BYTES |= {"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _inspect_safetensors(files: list[str], qconfig: dict[str, Any] | None, label: str) -> FileReport:
    from jaxquant.formats._hf_common import check_safetensors

    entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for f in files:
        header = check_safetensors(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            entries[name] = (info["dtype"], tuple(int(s) for s in info["shape"]), int(b - a))
    method = (qconfig or {}).get("quant_method")
    bits = int((qconfig or {}).get("bits", 4))
    rows: list[TensorRow] = []
    used: set[str] = set()
    for name in sorted(entries):
        if not name.endswith(".qweight"):
            continue
        mod = name[: -len(".qweight")]
        parts = {k: entries.get(f"{mod}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        if parts["scales"] is None:
            continue
        kind = method or ("gptq" if parts["g_idx"] is not None else "awq")
        qshape = parts["qweight"][1]
        if len(qshape) != 2:
            continue
        if kind == "gptq":
            k, n = qshape[0] * 32 // bits, qshape[1]
            label_t = f"GPTQ int{bits}"
        else:
            k, n = qshape[0], qshape[1] * 32 // bits
            label_t = f"AWQ int{bits}"
        nbytes = sum(p[2] for p in parts.values() if p is not None)
        rows.append(TensorRow(f"{mod}.weight", label_t, (n, k), nbytes))
        used |= {f"{mod}.{k_}" for k_, p in parts.items() if p is not None}
    for name in sorted(entries):
        if name in used:
            continue
        dt, shape, nb = entries[name]
        rows.append(TensorRow(name, dt, shape, nb))
    rows.sort(key=lambda r: r.name)
    meta = (("quantization", json.dumps(qconfig, sort_keys=True)),) if qconfig else ()
    return FileReport(label, "safetensors" + (f" ({method})" if method else ""), tuple(rows), meta)


def inspect_path(path: str | os.PathLike[str]) -> FileReport:
    """A :class:`FileReport` for a ``.gguf`` file, a ``.safetensors`` file or an HF checkpoint folder.

    Raises:
      FileNotFoundError: nothing at ``path``.
      ValueError: not a GGUF/safetensors file or folder, or a corrupt one (the message says what is wrong).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{path} has no .safetensors files (and is not a GGUF file)")
        qconfig = None
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as f:
                    qconfig = json.load(f).get("quantization_config")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{cfg} is not a valid config.json: {e}") from None
        return _inspect_safetensors(files, qconfig, path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _inspect_gguf(path)
    if path.endswith(".safetensors"):
        qconfig = None
        cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as f:
                    qconfig = json.load(f).get("quantization_config")
            except (json.JSONDecodeError, AttributeError):
                qconfig = None
        return _inspect_safetensors([path], qconfig, path)
    raise ValueError(
        f"{path}: not a GGUF file (magic {magic!r}) nor a .safetensors file; inspect takes a .gguf, a "
        ".safetensors or an HF checkpoint folder"
    )
