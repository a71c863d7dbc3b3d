"""Save and restore parameter trees with QArrays (orbax), and whole quantized Llama models.

Layout of a checkpoint folder::

    DIR/arrays/            orbax (tensorstore) checkpoint of a flat dict {"path/to/leaf/part": array}
    DIR/manifest.json      the tree: for each leaf path, a plain array or a QArray (scheme class + fields,
                           logical shape, dtype, which parts exist)
    DIR/config.json        (models only) the LlamaConfig
    DIR/tokenizer.json     (models only) the tokenizer

The manifest makes a checkpoint self-describing: restoring needs no template model. Writes are atomic: a new
checkpoint is written to a sibling temporary folder and swapped in with renames, so an interrupted save leaves
the previous checkpoint at ``DIR`` readable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxquant.core.qarray import QArray, Scheme, scheme_class

__all__ = ["CheckpointError", "is_checkpoint", "load_model", "load_params", "save_model", "save_params"]

FORMAT = "jaxquant-checkpoint-1"


class CheckpointError(ValueError):
    """A missing, incomplete or unreadable checkpoint folder."""


def _scheme_to_json(s: Scheme) -> dict[str, Any]:
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    return {"class": type(s).__name__, "fields": fields}


def _scheme_from_json(d: dict[str, Any]) -> Scheme:
    cls = scheme_class(d["class"])
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d["fields"].items()}
    return cls(**kw)


def _flatten(params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arrays, manifest)`` of a nested-dict params tree with array and QArray leaves."""
    arrays: dict[str, Any] = {}
    manifest: dict[str, Any] = {}
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]
    for path, leaf in leaves:
        keys = []
        for k in path:
            if not isinstance(k, jax.tree_util.DictKey):
                raise TypeError(f"save_params supports nested dicts only; got key {k!r}")
            keys.append(k.key)
        name = "/".join(str(k) for k in keys)
        int_keys = [isinstance(k, int) for k in keys]
        if isinstance(leaf, QArray):
            parts = {"data": leaf.data, "scale": leaf.scale, "zero": leaf.zero}
            parts.update({f"aux/{k}": v for k, v in leaf.aux.items()})
            present = [p for p, v in parts.items() if v is not None]
            for p in present:
                arrays[f"{name}/{p}"] = np.asarray(parts[p])
            manifest[name] = {
                "type": "qarray",
                "int_keys": int_keys,
                "scheme": _scheme_to_json(leaf.scheme),
                "shape": list(leaf.shape),
                "dtype": leaf.dtype,
                "parts": present,
            }
        else:
            arrays[name] = np.asarray(leaf)
            manifest[name] = {"type": "array", "int_keys": int_keys}
    return arrays, manifest


def _unflatten(arrays: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    out: dict[Any, Any] = {}
    for name, info in manifest.items():
        parts = name.split("/")
        keys = [int(p) if is_int else p for p, is_int in zip(parts, info["int_keys"])]
        if info["type"] == "qarray":
            got = {p: jax.numpy.asarray(arrays[f"{name}/{p}"]) for p in info["parts"]}
            aux = {p[4:]: v for p, v in got.items() if p.startswith("aux/")}
            leaf = QArray(
                data=got["data"],
                scale=got.get("scale"),
                zero=got.get("zero"),
                aux=aux,
                scheme=_scheme_from_json(info["scheme"]),
                shape=tuple(info["shape"]),
                dtype=info["dtype"],
            )
        else:
            leaf = jax.numpy.asarray(arrays[name])
        d = out
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = leaf
    return out


def _swap_in(tmp: Path, dest: Path) -> None:
    """Atomically (as far as the file system allows) replace ``dest`` by ``tmp``."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _write_checkpoint(dest: str | os.PathLike[str], params: Any, extra_json: dict[str, Any], write_more=None) -> Path:
    import orbax.checkpoint as ocp

    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        arrays, manifest = _flatten(params)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "arrays", arrays)
        ckptr.wait_until_finished()
        _write_json(tmp / "manifest.json", {"format": FORMAT, "leaves": manifest, **extra_json})
        if write_more is not None:
            write_more(tmp)
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _read_manifest(folder: Path) -> dict[str, Any]:
    mpath = folder / "manifest.json"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (does not exist or is not a directory)")
    if not mpath.is_file() or not (folder / "arrays").is_dir():
        raise CheckpointError(f"{folder}: not a jaxquant checkpoint (manifest.json or arrays/ missing)")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: corrupt manifest ({e})") from None
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: unknown checkpoint format {m.get('format')!r} (expected {FORMAT})")
    return m


def save_params(params: Any, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
    """Save a nested-dict params tree (arrays and QArrays) to the folder ``path``, atomically.

    ``metadata`` (JSON-serializable) is stored in the manifest under ``"metadata"``. Returns the folder.
    """
    return _write_checkpoint(path, params, {"metadata": metadata or {}})


def load_params(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, metadata)`` from a folder written by :func:`save_params` or :func:`save_model`.

    Raises:
      CheckpointError: the folder is missing, incomplete or not a jaxquant checkpoint.
    """
    import orbax.checkpoint as ocp

    folder = Path(path).absolute()
    m = _read_manifest(folder)
    try:
        arrays = ocp.StandardCheckpointer().restore(folder / "arrays")
    except Exception as e:  # orbax raises many kinds
        raise CheckpointError(f"{folder}: could not read the arrays ({type(e).__name__}: {e})") from None
    return _unflatten(arrays, m["leaves"]), m.get("metadata", {})


def save_model(
    model: Any, path: str | os.PathLike[str], *, tokenizer: Any = None, metadata: dict | None = None
) -> Path:
    """Save a (quantized) :class:`~jaxquant.models.Llama` with its config and tokenizer, atomically.

    ``jaxquant eval --model PATH`` and :func:`load_model` read it back without re-quantizing.
    """
    from jaxquant.models import model_params

    config = dataclasses.asdict(model.config)

    def more(tmp: Path) -> None:
        _write_json(tmp / "config.json", {"jaxquant_llama_config": config})
        if tokenizer is not None:
            tokenizer.save(tmp)

    return _write_checkpoint(path, model_params(model), {"metadata": metadata or {}}, more)


def load_model(path: str | os.PathLike[str]) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer or None, metadata)`` from a folder written by :func:`save_model`."""
    from jaxquant.models import Llama, LlamaConfig, TextTokenizer

    folder = Path(path).absolute()
    params, metadata = load_params(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())["jaxquant_llama_config"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: missing or corrupt config.json ({e})") from None
    model = Llama.from_params(LlamaConfig(**cfg), params)
    tok = TextTokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    return model, tok, metadata


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder written by :func:`save_params` / :func:`save_model`."""
    p = Path(path)
    return (p / "manifest.json").is_file() and (p / "arrays").is_dir()
