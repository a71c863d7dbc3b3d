"""Save and restore parameter trees with QArrays (orbax), quantized NNX models and whole quantized Llama models.

Layout of a checkpoint folder::

    DIR/arrays/            orbax (tensorstore) checkpoint of a flat dict {"path/to/leaf/part": array}
    DIR/manifest.json      the tree: for each leaf path, a plain array or a QArray (scheme class + fields,
                           logical shape, dtype, which parts exist); for models also the swapped layers
                           ("modules": path, layer class, layer config) and the user's metadata
    DIR/config.json        (Llama models only) the LlamaConfig
    DIR/tokenizer.json     (Llama models only) the tokenizer

The manifest makes a checkpoint self-describing: restoring a parameter tree needs no template, and restoring
a model needs only its float skeleton (for our Llama, the config): :mod:`jaxquant.nn` layers are rebuilt from
the manifest and their stored values, without re-quantizing. Values round-trip bit-exactly (every dtype,
fp8 and bfloat16 included).

Writes are atomic: a new checkpoint is written and fsynced in a sibling temporary folder
``.DIR.tmp-PID-XXXX`` and then swapped in. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` system
call, so ``DIR`` is at every instant either the complete old or the complete new checkpoint. Elsewhere it is
two renames (``DIR`` -> ``.DIR.old-PID``, temporary -> ``DIR``); if a crash falls between them, loading
``DIR`` finds the previous checkpoint in ``.DIR.old-PID`` and reads that. A save interrupted at any point
leaves the previous checkpoint readable; leftovers of dead writers are removed by the next save.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import importlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxquant.core.qarray import QArray, Scheme, scheme_class

__all__ = [
    "CheckpointError",
    "is_checkpoint",
    "load_model",
    "load_module",
    "load_params",
    "save_model",
    "save_module",
    "save_params",
]

FORMAT = "jaxquant-checkpoint-1"


class CheckpointError(ValueError):
    """A missing, incomplete or unreadable checkpoint folder, or one that does not fit the model."""


# -------------------------------------------------------------------------------------------------
# trees <-> flat arrays + manifest
# -------------------------------------------------------------------------------------------------
def _scheme_to_json(s: Scheme) -> dict[str, Any]:
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    return {"class": type(s).__name__, "module": type(s).__module__, "fields": fields}


def _scheme_from_json(d: dict[str, Any]) -> Scheme:
    mod = d.get("module")
    if isinstance(mod, str) and mod.startswith("jaxquant."):
        try:  # schemes defined outside jaxquant.schemes (e.g. imported GPTQ layouts) register on import
            importlib.import_module(mod)
        except ImportError:
            pass
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
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise TypeError(f"save_params: leaf {name} is a {type(leaf).__name__}, not an array or QArray")
            arrays[name] = np.asarray(leaf)
            manifest[name] = {"type": "array", "int_keys": int_keys}
    return arrays, manifest


def _unflatten(arrays: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    out: dict[Any, Any] = {}
    for name, info in manifest.items():
        parts = name.split("/")
        keys = [int(p) if is_int else p for p, is_int in zip(parts, info["int_keys"])]
        try:
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
        except KeyError as e:
            raise CheckpointError(f"checkpoint arrays lack {e} (listed in the manifest)") from None
        d = out
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = leaf
    return out


# -------------------------------------------------------------------------------------------------
# atomic folder writes
# -------------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system or kernel cannot exchange
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def _swap_in(tmp: Path, dest: Path) -> None:
    """Replace ``dest`` by ``tmp`` atomically where the OS allows it (see the module docstring)."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    if _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous checkpoint
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk (so a power cut after the swap finds the data)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(dest: Path) -> None:
    """Remove temporary folders of writers that died (their pid is gone); never the only copy of a checkpoint."""
    pat = re.compile(rf"^\.{re.escape(dest.name)}\.(tmp|old)-(\d+)(-.*)?$")
    for p in dest.parent.iterdir():
        m = pat.match(p.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not dest.exists():
            continue  # a crash between the two renames: this is the previous checkpoint, keep it
        shutil.rmtree(p, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _write_checkpoint(dest: str | os.PathLike[str], params: Any, extra_json: dict[str, Any], write_more=None) -> Path:
    import orbax.checkpoint as ocp

    dest = Path(dest).absolute()
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest} is a file; a checkpoint is a folder")
    if dest.is_dir() and any(dest.iterdir()) and not is_checkpoint(dest):
        raise CheckpointError(f"{dest} is a non-empty folder that is not a jaxquant checkpoint; refusing to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(dest)
    arrays, manifest = _flatten(params)  # fails early, before anything is written
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-{os.getpid()}-"))
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(tmp / "arrays", arrays)
        ckptr.wait_until_finished()
        if write_more is not None:
            write_more(tmp)
        # the manifest last: a folder without it is never taken for a checkpoint
        _write_json(tmp / "manifest.json", {"format": FORMAT, "leaves": manifest, **extra_json})
        _fsync_tree(tmp)
        _swap_in(tmp, dest)
    except BaseException:
        with contextlib.suppress(Exception):  # orbax writes in background threads: let them stop first
            ckptr.wait_until_finished()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(Exception):
            ckptr.close()
    return dest


# -------------------------------------------------------------------------------------------------
# reading
# -------------------------------------------------------------------------------------------------
def _recover(folder: Path) -> Path:
    """``folder``, or the previous checkpoint left by a save that crashed between its two renames."""
    if folder.exists() or not folder.parent.is_dir():
        return folder
    olds = sorted(
        (p for p in folder.parent.glob(f".{folder.name}.old-*") if is_checkpoint(p)),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if olds:
        warnings.warn(
            f"{folder} is missing after an interrupted save; reading the previous checkpoint {olds[0]}",
            UserWarning,
            stacklevel=3,
        )
        return olds[0]
    return folder


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
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else None
        raise CheckpointError(f"{mpath}: unknown checkpoint format {got!r} (expected {FORMAT})")
    return m


def _load(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any], Path]:
    import orbax.checkpoint as ocp

    folder = _recover(Path(path).absolute())
    m = _read_manifest(folder)
    try:
        arrays = ocp.StandardCheckpointer().restore(folder / "arrays")
    except Exception as e:  # orbax raises many kinds
        raise CheckpointError(f"{folder}: could not read the arrays ({type(e).__name__}: {e})") from None
    try:
        params = _unflatten(arrays, m["leaves"])
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    return params, m, folder


def save_params(params: Any, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
    """Save a nested-dict params tree (arrays and QArrays) to the folder ``path``, atomically.

    ``metadata`` (JSON-serializable) is stored in the manifest under ``"metadata"``. Returns the folder.
    """
    return _write_checkpoint(path, params, {"metadata": metadata or {}})


def load_params(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, metadata)`` from a folder written by :func:`save_params`, :func:`save_module` or
    :func:`save_model`.

    Raises:
      CheckpointError: the folder is missing, incomplete or not a jaxquant checkpoint.
    """
    params, m, _ = _load(path)
    return params, m.get("metadata", {})


# -------------------------------------------------------------------------------------------------
# NNX models
# -------------------------------------------------------------------------------------------------
def _model_state(model: Any) -> tuple[Any, list[dict[str, Any]]]:
    """``(pure dict of every variable but RNG streams, swapped-layer records)`` of an NNX model."""
    from flax import nnx

    from jaxquant.nn.layers import layer_spec
    from jaxquant.nn.swap import _candidates, is_quantized_layer

    state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState)))
    modules = [{"path": list(p), **layer_spec(m)} for p, m in _candidates(model) if is_quantized_layer(m)]
    return state, modules


def _subtree(params: dict[str, Any], path: list[Any]) -> dict[str, Any]:
    d: Any = params
    for k in path:
        if not isinstance(d, dict) or k not in d:
            raise CheckpointError(f"the checkpoint has no values for the layer at {'/'.join(map(str, path))}")
        d = d[k]
    return d


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def _restore_into(skeleton: Any, params: dict[str, Any], modules: list[dict[str, Any]], where: Path) -> Any:
    from flax import nnx

    from jaxquant.nn.layers import layer_from_saved
    from jaxquant.nn.swap import set_submodule

    for rec in modules:
        path = list(rec["path"])
        try:
            layer = layer_from_saved(rec, _subtree(params, path))
            set_submodule(skeleton, path, layer)
        except (ValueError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{where}: cannot rebuild the layer at {'/'.join(map(str, path))}: {e}") from None
    graphdef, state, rest = nnx.split(skeleton, nnx.Not(nnx.RngState), ...)
    is_q = lambda x: isinstance(x, QArray)
    want = {
        jax.tree_util.keystr(p): v
        for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state), is_leaf=is_q)[0]
    }
    got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_q)[0]}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{where}: the checkpoint does not fit the model: missing {missing[:6]}, unexpected {extra[:6]}"
        )
    for k, v in got.items():
        if _shape(v) != _shape(want[k]):
            raise CheckpointError(
                f"{where}: {k} has shape {_shape(v)} in the checkpoint, {_shape(want[k])} in the model"
            )
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)


def save_module(model: Any, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None) -> Path:
    """Save any (quantized) NNX model: every variable (``nnx.Param``, ``QWeight``, ``Stat``; not RNG streams)
    and, for each :mod:`jaxquant.nn` layer, its class and configuration, atomically. Restore with
    :func:`load_module` and the float model's skeleton."""
    state, modules = _model_state(model)
    return _write_checkpoint(path, state, {"metadata": metadata or {}, "modules": modules})


def load_module(path: str | os.PathLike[str], skeleton: Any) -> tuple[Any, dict[str, Any]]:
    """``(model, metadata)`` from a folder written by :func:`save_module` (or :func:`save_model`).

    Args:
      path: the checkpoint folder.
      skeleton: the *float* model's structure, e.g. ``nnx.eval_shape(lambda: MyMLP(nnx.Rngs(0)))`` (no memory
        is allocated for its values). The saved :mod:`jaxquant.nn` layers are rebuilt in it (it is modified),
        then every value is replaced by the stored one; RNG streams keep the skeleton's.

    Raises:
      CheckpointError: unreadable checkpoint, or one that does not fit the skeleton (names the paths).
    """
    params, m, folder = _load(path)
    model = _restore_into(skeleton, params, list(m.get("modules", [])), folder)
    return model, m.get("metadata", {})


def save_model(
    model: Any, path: str | os.PathLike[str], *, tokenizer: Any = None, metadata: dict | None = None
) -> Path:
    """Save a (quantized) :class:`~jaxquant.models.Llama` with its config and tokenizer, atomically.

    Quantized kernels as QArray parameters (``quantize_params`` rules) and swapped :mod:`jaxquant.nn` layers
    (W8A8, BitLinear, LoRA adapters) are both kept. ``jaxquant eval --model PATH`` and :func:`load_model` read
    it back without re-quantizing.
    """
    config = dataclasses.asdict(model.config)
    state, modules = _model_state(model)

    def more(tmp: Path) -> None:
        _write_json(tmp / "config.json", {"jaxquant_llama_config": config})
        if tokenizer is not None:
            tokenizer.save(tmp)

    return _write_checkpoint(path, state, {"metadata": metadata or {}, "modules": modules}, more)


def load_model(path: str | os.PathLike[str]) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer or None, metadata)`` from a folder written by :func:`save_model`."""
    from jaxquant.models import Llama, LlamaConfig, TextTokenizer

    params, m, folder = _load(path)
    try:
        cfg = json.loads((folder / "config.json").read_text())["jaxquant_llama_config"]
        config = LlamaConfig(**cfg)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: missing or corrupt config.json ({e})") from None
    model = _restore_into(Llama.abstract(config), params, list(m.get("modules", [])), folder)
    tok = TextTokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    return model, tok, m.get("metadata", {})


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder written by :func:`save_params` / :func:`save_module` / :func:`save_model`."""
    p = Path(path)
    return (p / "manifest.json").is_file() and (p / "arrays").is_dir()
